"""Rule 20: an edit's relation worded as a training set words it, as views of the edit at every answer read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from test_key_views import answer_queries, edit_with_subject
from test_suite import chat_tokenizer
from tiny_models import build
from tiny_tokenizer import random_pairs, sharp_gpt2
from transformer_patcher import get_patcher_model
from transformer_patcher.cli import main
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import CausalLMTask, task_for_model
from transformer_patcher.data.rewordings import (
    RelationRewordings,
    last_sentence,
    load_rewordings,
    relation_rewordings,
)
from transformer_patcher.experiments.registry import build_trainer
from transformer_patcher.experiments.session import EditSession
from transformer_patcher.experiments.sme.experiment import ExperimentConfig, config_editor, load_benchmark
from transformer_patcher.methods.patcher import EditConfig, EditExample
from transformer_patcher.methods.patcher.views import EditViews
from workspace import build_workspace

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
    bank = RelationRewordings.from_records(RECORDS, cut=last_sentence)
    assert bank.templates == {
        "{} plays the": ("{} is incredible at", "{} is known for"),  # 3 and 2 (the random sentence cut off)
        "{} is located in": ("{}'s surroundings include",),
    }
    assert bank("Miles Davis plays the", "Miles Davis") == ["Miles Davis is incredible at", "Miles Davis is known for"]
    assert bank("Miles Davis plays the", None) == []
    assert bank("Who taught Miles Davis?", "Miles Davis") == []  # a template the bank does not hold
    assert RelationRewordings.from_records(RECORDS, count=1).templates["{} plays the"] == ("{} is incredible at",)
    uncut = RelationRewordings.from_records(RECORDS).templates["{} plays the"]  # a user's rephrases are kept whole
    assert uncut == ("{} is incredible at", "{} is known for", "(2011). {} is known for")


def test_the_bank_leaves_out_the_records_of_excluded_subjects(tmp_path: Path) -> None:
    excluded = ["toko yasuda", "John Lennon", "Paul Simon"]
    bank = RelationRewordings.from_records(RECORDS, exclude=excluded, cut=last_sentence)
    assert bank.templates["{} plays the"] == ("{} is known for",)
    rows = [{"prompt": p, "rephrase_prompt": r, "subject": s, "target_new": "x", "ground_truth": "y",
             "locality_prompt": "Who?", "locality_ground_truth": "z"} for p, r, s in RECORDS]  # fmt: skip
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "counterfact-train.json").write_text(json.dumps(rows))
    assert relation_rewordings(tmp_path) == RelationRewordings.from_records(RECORDS, cut=last_sentence)
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
    bank = RelationRewordings.from_records(RECORDS, cut=last_sentence)
    assert build_trainer(model, task, pairs, rewordings=bank, progress=False).views.rewordings is bank
    off = EditConfig(relation_views=False)
    assert build_trainer(model, task, pairs, edit_config=off, rewordings=bank, progress=False).views.rewordings is None


USER_FILE = [  # a user's own examples: how their prompts get reworded
    {"text": "w70 w71 w72", "rephrase": "w73 w70 w74", "subject": "w70"},
    {"text": "w75 w71 w72", "rephrase": "w73 w75 w74", "subject": "w75"},
    {"text": "w76 w71 w72", "rephrase": "w76 w77", "subject": "w76"},
    {"text": "w76 w71 w72", "rephrase": "w78 w76", "subject": "w76"},
    {"text": "What is the capital of France?", "rephrase": "France's capital city is", "subject": "France"},
]


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_users_file_is_a_bank_that_keeps_every_rewording(tmp_path: Path) -> None:
    many = [{"text": "w70 w71", "rephrase": f"w{80 + i} w70", "subject": "w70"} for i in range(7)]
    bank = load_rewordings(_jsonl(tmp_path / "own.jsonl", USER_FILE + many))
    assert bank.templates["{} w71 w72"] == ("w73 {} w74", "{} w77", "w78 {}")  # 2, 1, 1: most frequent first
    assert len(bank.templates["{} w71"]) == 7  # no cap: the user chose them
    assert bank("What is the capital of Peru?", "Peru") == ["Peru's capital city is"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "w70 w71", "subject": "w70"}\n', "line 1: expected {'text'"),
        ('{"text": "w70 w71", "rephrase": "w72 w70", "subject": " "}\n', "line 1: expected {'text'"),
        ('\n{"text": "w70 w71", "rephrase": "w72 w73", "subject": "w70"}\n', "line 2: the subject 'w70' must occur"),
        ('{"text": "w70 w71", "rephrase": " w70 w71 ", "subject": "w70"}\n', "line 1: the rephrase words the text"),
        ('{"text": "w70 w71", "rephrase": "w72 w70"', "line 1: invalid JSON"),
        ("\n\n", "holds no rewordings"),
        (b'\n{"text": "w70 \xff"}', "line 2: not valid UTF-8"),
    ],
)
def test_a_bad_rewordings_file_is_refused_with_its_line(tmp_path: Path, content: str | bytes, message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=r"bad\.jsonl") as error:
        load_rewordings(bad)
    assert message in str(error.value)


def test_a_merged_bank_puts_the_users_rewordings_first_without_repeats() -> None:
    own = RelationRewordings({"{} plays the": ("{} is known for", "{} excels at"), "{} w71": ("w72 {}",)})
    merged = own.merged(RelationRewordings.from_records(RECORDS, cut=last_sentence))
    assert merged.templates == {
        "{} plays the": ("{} is known for", "{} excels at", "{} is incredible at"),
        "{} w71": ("w72 {}",),
        "{} is located in": ("{}'s surroundings include",),
    }
    assert RelationRewordings().merged(own) == own and own.merged(RelationRewordings()) == own


def test_the_edit_command_reads_a_rewordings_file_into_the_views(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRANSFORMER_PATCHER_CACHE", str(tmp_path / "cache"))
    ws = build_workspace(tmp_path / "ws", n_edits=1)
    own = _jsonl(tmp_path / "own.jsonl", USER_FILE)
    rows = dict(memory_rows=200, question_rows=0, progress=False)
    opened = dict(model=str(ws["model"]), folder=None, memory="zsre", data_dir=ws["data"], **rows)
    with EditSession.open(**opened, rewordings=own) as session:
        assert session.trainer.views.rewordings("w79 w71 w72", "w79") == ["w73 w79 w74", "w79 w77", "w78 w79"]
    with EditSession.open(**opened) as session:  # no file, and no training set's bank in this data
        assert session.trainer.views.rewordings is None
    patches = tmp_path / "patches"
    args = ["edit", "--model", str(ws["model"]), "--patches", str(patches), "--data-dir", str(ws["data"])]
    edit = [*args, "--memory-rows", "200", "--question-rows", "0", "--no-progress"]
    edit += ["--text", "w79 w71 w72", "--target", "w90", "--subject", "w79"]
    assert main([*edit, "--rewordings", str(own)]) == 0
    assert (patches / "edits.jsonl").is_file()
    capsys.readouterr()
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "w70", "rephrase": "w71", "subject": "w70"}])
    assert main([*edit, "--patches", str(tmp_path / "other"), "--rewordings", str(bad)]) == 2
    assert "line 1: the subject 'w70' must occur" in capsys.readouterr().err
    for idle in (["--set", "relation_views=false"], ["--schedule", "quick"], ["--memory", "none"]):
        assert main([*edit, "--patches", str(tmp_path / "idle"), "--rewordings", str(own), *idle]) == 2
        assert "it would change nothing" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() and not (tmp_path / "idle").exists()  # refused before any write


def test_a_rewordings_file_is_refused_for_a_classifier(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    build("bert").save_pretrained(folder)
    own = _jsonl(tmp_path / "own.jsonl", USER_FILE)
    with pytest.raises(ValueError, match="it would change nothing"):
        EditSession.open(str(folder), None, memory="none", progress=False, rewordings=own)


def test_an_sme_run_puts_a_rewordings_file_before_the_benchmarks_bank(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRANSFORMER_PATCHER_CACHE", str(tmp_path / "cache"))
    ws = build_workspace(tmp_path / "ws", n_edits=2)
    own = _jsonl(tmp_path / "own.jsonl", USER_FILE)
    sizes = dict(memory_rows=200, question_rows=0, suite="none", max_examples=2)
    config = ExperimentConfig(str(ws["model"]), str(ws["zsre"]), "zsre", data_dir=str(ws["data"]), **sizes)
    benchmark = load_benchmark(config)
    model, tokenizer = load_model(config.model, config.model_kind)
    task = task_for_model(model, tokenizer, prompt_format=config.format())
    with_file = replace(config, rewordings_file=str(own))
    views = config_editor(with_file, benchmark, model, task, progress=False).views
    assert views.rewordings("w79 w71 w72", "w79") == ["w73 w79 w74", "w79 w77", "w78 w79"]
    for idle in ({"editor": "pmet"}, {"schedule": "quick"}, {"edit_options": {"key_views": 0}}):
        with pytest.raises(ValueError, match="it would change nothing"):
            replace(with_file, **idle)
    out = tmp_path / "run"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "w70 w71"}])
    args = ["sme", "run", "--model", str(ws["model"]), "--data", str(ws["zsre"]), "--data-kind", "zsre"]
    assert main([*args, "--out", str(out), "--rewordings", str(bad), "--no-progress"]) == 2
    assert "bad.jsonl: line 1: expected" in capsys.readouterr().err and not out.exists()
