"""Keys built over an edit's views: the LDA key, the self-written prefixes and the trainer that uses them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from test_suite import chat_tokenizer
from tiny_tokenizer import EDIT_WORDS, random_pairs, sharp_gpt2
from transformer_patcher import PatcherConfig, get_patcher_model
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.experiments.registry import build_trainer
from transformer_patcher.methods.patcher import EditConfig, EditExample, MemoryBank, PatchTrainer
from transformer_patcher.methods.patcher.memory import collect_queries
from transformer_patcher.methods.patcher.views import OPENINGS, EditViews, subject_first_texts, written_prefixes
from transformer_patcher.tuners.patcher.keys import discriminant


def memory_statistics(dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(2000, dim, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3.0, dim).double()
    covariance = torch.cov(rows.T)
    return rows.mean(0), covariance, torch.linalg.inv(covariance)


def test_views_key_is_two_class_lda_scaled_to_the_query() -> None:
    mean, covariance, precision = memory_statistics()
    generator = torch.Generator().manual_seed(1)
    query = mean + 2.0
    views = query + 0.5 * torch.randn(5, len(mean), generator=generator, dtype=torch.float64)
    for scatter in (0.25, 1.0, 4.0):
        readings = torch.cat([query[None], views])
        centred = readings - readings.mean(0)
        direct = torch.linalg.solve(covariance + scatter * centred.T @ centred / len(readings), readings.mean(0) - mean)
        w = discriminant(query, mean, precision, views=views, scatter=scatter)
        assert float(w @ (query - mean)) == pytest.approx(1.0)
        assert torch.allclose(w, direct / (direct @ (query - mean)), atol=1e-10)
    point = discriminant(query, mean, precision)
    assert torch.equal(discriminant(query, mean, precision, views=torch.zeros(0, len(mean))), point)


def test_a_reading_moved_the_way_the_views_move_keeps_the_edits_score() -> None:
    """The memory barely varies along its first axis, so the point key leans on it; views that differ along it (the
    wording around the edit) take that weight off, and a rephrase moved along it keeps most of the edit's score."""
    mean, _, precision = memory_statistics()
    axis = torch.zeros(len(mean), dtype=torch.float64)
    axis[0] = 1.0
    query = mean + 1.0
    views = query + torch.tensor([-0.6, -0.3, 0.3, 0.6], dtype=torch.float64)[:, None] * axis
    rephrase = query - 0.8 * axis
    point = discriminant(query, mean, precision)
    lda = discriminant(query, mean, precision, views=views)
    assert float(point @ (rephrase - mean)) < 0.5
    assert float(lda @ (rephrase - mean)) > 0.7


def test_written_prefixes_are_the_same_every_time_and_ignore_the_patches() -> None:
    model = get_patcher_model(sharp_gpt2(), PatcherConfig(patch_activation="relu6"))
    tokenizer = chat_tokenizer()
    first = written_prefixes(model, tokenizer, 3)
    assert len(first) == 3 and all(text.endswith(".") and len(text) > 1 for text in first)
    assert written_prefixes(model, tokenizer, 3) == first
    layer = model.base_model.patch_layer()
    d = layer.query_dim
    layer.add_patches(torch.ones(2, d), torch.full((2,), 50.0), 100 * torch.randn(2, layer.output_dim), 0)
    layer.commit()
    assert written_prefixes(model, tokenizer, 3) == first
    assert written_prefixes(model, tokenizer, 0) == []
    with pytest.raises(ValueError, match="key_views"):
        written_prefixes(model, tokenizer, len(OPENINGS) + 1)


def answer_queries(model: torch.nn.Module, task: CausalLMTask, text: str, target: str) -> torch.Tensor:
    batch = task.batch_for(model, [(text, target)])
    layer = model.base_model.patch_layer()
    with torch.no_grad(), layer.capture() as record:
        model(**batch.model_kwargs())
    return task.at_reads(record.query, batch)


def test_edit_views_read_where_the_answer_starts_behind_each_prefix_and_in_the_other_format() -> None:
    model = get_patcher_model(sharp_gpt2())
    task = CausalLMTask(chat_tokenizer())
    layer = model.base_model.patch_layer()
    text, target = random_pairs(1, seed=3, words=EDIT_WORDS, length=4, target_length=3)[0]
    prefixes = ["w10 w11 w12", "w20 w21"]
    found = EditViews(prefixes).queries(model, layer, task, EditExample(text, target))
    behind = [answer_queries(model, task, f"{p} {text}", target) for p in prefixes]
    assert len(found) == len(behind[0]) == 3  # one entry per answer read
    assert found[0].shape == (3, layer.query_dim)  # the first read: two prefixes, then chat
    chat = answer_queries(model, task.formatted("chat"), text, target)[0]
    assert torch.allclose(found[0], torch.stack([b[0] for b in behind] + [chat]), atol=1e-5)
    for read in (1, 2):  # a later read: behind the prefixes only
        assert torch.allclose(found[read], torch.stack([b[read] for b in behind]), atol=1e-5)
    alone = EditViews([]).queries(model, layer, task, EditExample(text, target))
    assert [v.shape[0] for v in alone] == [1, 0, 0]


def test_the_trainer_builds_its_keys_over_the_views() -> None:
    """With views the first answer token's key is the LDA over the edit's readings there: the edit is fixed as before,
    and the views fire on most of those patches, where the point keys' patches stay silent on most views."""
    model = get_patcher_model(sharp_gpt2(), PatcherConfig(patch_activation="relu6"))
    task = CausalLMTask(chat_tokenizer())
    layer = model.base_model.patch_layer()
    rows = collect_queries(model, layer, task, random_pairs(60, seed=1), 10_000, progress=False)
    views = EditViews([" ".join(f"w{i + j}" for j in range(4)) for i in range(10, 90, 10)])
    fired = {}
    for name, given in (("views", views), ("point", None)):
        trainer = PatchTrainer(
            model, task, EditConfig(contrast_spread=0.0, key_views=16), MemoryBank(rows.clone()), views=given
        )
        scores = []
        for i, (text, target) in enumerate(random_pairs(16, seed=5, words=EDIT_WORDS, length=4)):
            example = EditExample(text, target)
            batch = task.batch_for(model, [(text, target)])
            with torch.no_grad():
                wrong = (~task.correct(task.read_logits(model(**batch.model_kwargs()), batch), batch.labels)).nonzero()
            readings = views.queries(model, layer, task, example)[0]
            record = trainer.edit(example, edit_id=i)
            assert record.success and trainer.check(example)[0] and record.neurons == len(wrong)
            keys, bias = layer.committed()["patch_frozen_keys"], layer.committed()["patch_frozen_bias"]
            for j, read in enumerate(wrong.flatten().tolist()):
                if read:  # views key the first answer token only
                    continue
                patch = len(keys) - record.neurons + j
                scores.append(readings @ keys[patch] + bias[patch])
        fired[name] = torch.cat(scores)
        trainer.reset()
    assert len(fired["views"]) >= 40
    share = {name: float((scores > 0).float().mean()) for name, scores in fired.items()}
    assert share["views"] >= 0.7 and share["views"] >= share["point"] + 0.4  # measured: 0.76 and 0.10


def test_with_views_the_contrasts_are_asked_in_every_format_the_key_reaches() -> None:
    model = get_patcher_model(sharp_gpt2())
    task = CausalLMTask(chat_tokenizer())
    layer = model.base_model.patch_layer()
    rows = MemoryBank(collect_queries(model, layer, task, random_pairs(30, seed=1), 10_000, progress=False))
    text, target = random_pairs(1, seed=3, words=EDIT_WORDS, length=4)[0]
    example = EditExample(text, target, keep=("w10 w11 w12", "w20 w21 w22"))  # kept inputs join the contrasts
    plain = PatchTrainer(model, task, EditConfig(), rows)._contrast_queries(example)
    views = EditViews(["w30 w31"])
    viewed = PatchTrainer(model, task, EditConfig(key_views=1), rows, views=views)._contrast_queries(example)
    assert plain is not None and viewed is not None and plain.shape == (2, layer.query_dim)
    assert viewed.shape == (4, layer.query_dim) and torch.equal(viewed[:2], plain)
    chat = task.formatted("chat")
    batch = chat.batch_for(model, [(t, target) for t in example.keep])
    with torch.no_grad(), layer.capture() as record:
        model(**batch.model_kwargs())
    assert torch.allclose(viewed[2:], chat.at_reads(record.query, batch)[batch.first_reads()], atol=1e-5)


def test_key_views_are_checked_and_built_for_generators_only() -> None:
    with pytest.raises(ValueError, match="key_views"):
        EditConfig(key_views=17)
    with pytest.raises(ValueError, match="key_views"):
        EditConfig(key_views=-1)
    model = get_patcher_model(sharp_gpt2())
    task = CausalLMTask(chat_tokenizer())
    pairs = random_pairs(30, seed=1)
    trainer = build_trainer(model, task, pairs, edit_config=EditConfig(key_views=2), progress=False)
    assert trainer.views is not None and len(trainer.views.prefixes) == 2
    assert len(build_trainer(model, task, pairs, progress=False).views.prefixes) == 16  # on by default
    assert build_trainer(model, task, pairs, edit_config=EditConfig(key_views=0), progress=False).views is None


def test_subject_first_texts_open_with_the_subject_and_need_it_named() -> None:
    texts = subject_first_texts("What is the product made by UniFirst?", "UniFirst")
    assert texts == [
        "UniFirst: What is the product made by UniFirst?",
        "UniFirst. What is the product made by UniFirst?",
        "About UniFirst, what is the product made by UniFirst?",
        "UniFirst - What is the product made by it?",
    ]
    assert subject_first_texts("Who wrote it?", "UniFirst") == []
    assert subject_first_texts("Who wrote it?", None) == []


def edit_with_subject() -> tuple[torch.nn.Module, CausalLMTask, Any, EditExample]:
    """A patch-wrapped tiny GPT-2, its task, patched layer, and an edit whose second word is its subject."""
    model = get_patcher_model(sharp_gpt2())
    text, target = random_pairs(1, seed=3, words=EDIT_WORDS, length=4, target_length=3)[0]
    example = EditExample(text, target, subject=text.split()[1])
    return model, CausalLMTask(chat_tokenizer()), model.base_model.patch_layer(), example


def test_subject_first_views_join_the_first_answer_tokens_views_unless_turned_off() -> None:
    model, task, layer, example = edit_with_subject()
    text, target, subject = example.text, example.target, example.subject
    plain = EditViews(["w10 w11"], subject_first=False).queries(model, layer, task, example)
    found = EditViews(["w10 w11"]).queries(model, layer, task, example)
    assert found[0].shape == (2 + 4, layer.query_dim)  # the prefix, chat, then the four rewordings
    assert torch.equal(found[0][:2], plain[0])
    reworded = [answer_queries(model, task, t, target)[0] for t in subject_first_texts(text, subject)]
    assert torch.allclose(found[0][2:], torch.stack(reworded), atol=1e-5)
    assert [v.shape[0] for v in found[1:]] == [v.shape[0] for v in plain[1:]]  # later reads: behind the prefixes
    unnamed = EditViews(["w10 w11"]).queries(model, layer, task, EditExample(text, target))
    assert unnamed[0].shape[0] == 2
    pairs = random_pairs(30, seed=1)
    assert build_trainer(model, task, pairs, progress=False).views.subject_first  # on by default
    off = EditConfig(subject_first_views=False)
    assert not build_trainer(model, task, pairs, edit_config=off, progress=False).views.subject_first
