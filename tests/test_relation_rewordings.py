"""Rule 20: an edit's relation worded as a training set words it, as views of the edit at every answer read."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from test_key_views import answer_queries, edit_with_subject
from test_suite import chat_tokenizer
from tiny_tokenizer import random_pairs, sharp_gpt2
from transformer_patcher import get_patcher_model
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.data.rewordings import RelationRewordings, relation_rewordings
from transformer_patcher.experiments.registry import build_trainer
from transformer_patcher.methods.patcher import EditConfig, EditExample
from transformer_patcher.methods.patcher.views import EditViews

RECORDS = [  # (prompt, rephrase, subject)
    ("Toko Yasuda plays the", "Toko Yasuda is incredible at", "Toko Yasuda"),
    ("John Lennon plays the", "John Lennon is incredible at", "John Lennon"),
    ("Ringo Starr plays the", "Ringo Starr is known for", "Ringo Starr"),
    ("Yoko Ono plays the", "(2011). Yoko Ono is known for", "Yoko Ono"),  # behind a random sentence
    ("Paul Simon plays the", "Paul Simon is incredible at", "Paul Simon"),
    ("Paris is located in", "Paris's surroundings include", "Paris"),
    ("Berlin is located in", "Where is it? Rome", "Berlin"),  # a rephrase without the subject teaches nothing
]


def test_the_bank_ranks_each_templates_rewordings_by_how_often_the_records_use_them() -> None:
    bank = RelationRewordings.from_records(RECORDS)
    assert bank.templates == {
        "{} plays the": ("{} is incredible at", "{} is known for"),  # 3 and 2 (the random sentence cut off)
        "{} is located in": ("{}'s surroundings include",),
    }
    assert bank("Miles Davis plays the", "Miles Davis") == ["Miles Davis is incredible at", "Miles Davis is known for"]
    assert bank("Miles Davis plays the", None) == []
    assert bank("Who taught Miles Davis?", "Miles Davis") == []  # a template the bank does not hold
    assert RelationRewordings.from_records(RECORDS, count=1).templates["{} plays the"] == ("{} is incredible at",)


def test_the_bank_leaves_out_the_records_of_excluded_subjects(tmp_path: Path) -> None:
    bank = RelationRewordings.from_records(RECORDS, exclude=["toko yasuda", "John Lennon", "Paul Simon"])
    assert bank.templates["{} plays the"] == ("{} is known for",)
    rows = [{"prompt": p, "rephrase_prompt": r, "subject": s, "target_new": "x", "ground_truth": "y",
             "locality_prompt": "Who?", "locality_ground_truth": "z"} for p, r, s in RECORDS]  # fmt: skip
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "counterfact-train.json").write_text(json.dumps(rows))
    assert relation_rewordings(tmp_path).templates == RelationRewordings.from_records(RECORDS).templates
    assert relation_rewordings(tmp_path, exclude=["Paris"]).templates.keys() == {"{} plays the"}


def test_rewordings_are_views_at_every_answer_read() -> None:
    model, task, layer, example = edit_with_subject()
    text, target, subject = example.text, example.target, example.subject
    other = [f"w30 {subject} w31", f"{subject} w32 w33 w34"]
    reworded = lambda t, s: other if (t, s) == (text, subject) else []  # noqa: E731
    plain = EditViews(["w10 w11"], subject_first=False).queries(model, layer, task, example)
    found = EditViews(["w10 w11"], subject_first=False, rewordings=reworded).queries(model, layer, task, example)
    read = [answer_queries(model, task, t, target) for t in other]
    assert found[0].shape == (1 + 2 + 1, layer.query_dim)  # the prefix, the two rewordings, then chat
    assert torch.equal(found[0][:1], plain[0][:1]) and torch.equal(found[0][3:], plain[0][1:])
    assert torch.allclose(found[0][1:3], torch.stack([r[0] for r in read]), atol=1e-5)
    for i in (1, 2):  # every later read: behind the prefix, then the rewordings
        assert torch.equal(found[i][:1], plain[i])
        assert torch.allclose(found[i][1:], torch.stack([r[i] for r in read]), atol=1e-5)
    none = EditViews(["w10 w11"], subject_first=False, rewordings=reworded).queries(
        model, layer, task, EditExample(text, target)
    )
    assert [v.shape[0] for v in none] == [v.shape[0] for v in plain]  # no subject: no rewordings


def test_the_trainer_words_relations_unless_told_not_to() -> None:
    model = get_patcher_model(sharp_gpt2())
    task = CausalLMTask(chat_tokenizer())
    pairs = random_pairs(30, seed=1)
    bank = RelationRewordings.from_records(RECORDS)
    assert build_trainer(model, task, pairs, rewordings=bank, progress=False).views.rewordings is bank
    off = EditConfig(relation_views=False)
    assert build_trainer(model, task, pairs, edit_config=off, rewordings=bank, progress=False).views.rewordings is None
