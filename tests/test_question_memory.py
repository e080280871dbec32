"""The question memory (the model's own answers to questions, raw and chat) and per-edit contrasts (issue 15)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from test_suite import chat_tokenizer
from tiny_tokenizer import EDIT_WORDS, random_pairs, sentence, sharp_gpt2, tiny_tokenizer
from transformer_patcher import PatcherConfig, get_patcher_model
from transformer_patcher.core.decoding import greedy_continuations
from transformer_patcher.core.prompts import CHAT, RAW, PromptFormat
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.data.benchmarks import zsre_benchmark
from transformer_patcher.data.neighbours import subject_pool
from transformer_patcher.data.questions import (
    Contrasts,
    contrast_questions,
    memory_subjects,
    question_templates,
    subject_contrasts,
    template_questions,
)
from transformer_patcher.methods.patcher import EditConfig, EditExample, MemoryBank, PatchTrainer
from transformer_patcher.methods.patcher.contexts import TokenContexts
from transformer_patcher.methods.patcher.memory import answered_queries, build_memory, collect_queries, question_formats
from transformer_patcher.methods.patcher.subjects import SubjectIndex


def chat_model() -> tuple[torch.nn.Module, CausalLMTask]:
    return get_patcher_model(sharp_gpt2()), CausalLMTask(chat_tokenizer())


def test_answered_queries_read_the_question_end_and_each_answer_token_in_every_format() -> None:
    """Rows are the FFN queries of prompt + the model's own greedy answer at the positions that predict each answer
    token, raw then chat per question: the same vectors a plain forward pass over that text shows."""
    model, task = chat_model()
    layer = model.base_model.patch_layer()
    questions = [q for q, _ in random_pairs(3, seed=4, length=5)]
    assert question_formats(task) == [PromptFormat(RAW), PromptFormat(CHAT)]
    rows = answered_queries(model, layer, task, questions, 10_000, max_new_tokens=4, progress=False)
    expected = []
    for question in questions:
        for fmt in (RAW, CHAT):
            asked = task.formatted(fmt)
            prompt = asked.prompt_tokens(question)
            (answer,) = greedy_continuations(model, [prompt], asked.prompter.stop_ids, 4, asked.pad_id)
            assert 1 <= len(answer) <= 4
            with torch.no_grad(), layer.capture() as record:
                model(input_ids=torch.tensor([prompt + answer]))
            expected.append(record.query[0, len(prompt) - 1 : len(prompt) - 1 + len(answer)])
    assert torch.allclose(rows, torch.cat(expected), atol=1e-5)
    capped = answered_queries(model, layer, task, questions, 5, max_new_tokens=4, progress=False)
    assert torch.equal(capped, rows[:5])


def test_a_base_model_is_asked_raw_only_and_a_template_task_in_its_own_format_too() -> None:
    task = CausalLMTask(tiny_tokenizer())
    assert question_formats(task) == [PromptFormat(RAW)]
    assert question_formats(task.formatted("Q: {text} A:")) == [PromptFormat("Q: {text} A:"), PromptFormat(RAW)]


def test_memory_subjects_leave_out_the_benchmark_and_the_neighbour_pool() -> None:
    """No memory question is about a subject the evaluation asks about: the data's own or the neighbour pool's."""
    pool = {s.casefold() for kind in subject_pool().values() for s in kind}
    embedded = memory_subjects(embedded=True)
    assert len(embedded) > 1000 and not pool & {s.casefold() for s in embedded}
    banned = embedded[:10]
    kept = memory_subjects(embedded=True, exclude=[s.upper() for s in banned])
    assert kept == embedded[10:]
    benchmark = zsre_benchmark()  # the embedded sample
    subjects = {example.subject for example in benchmark.examples}
    assert not subjects & set(benchmark.memory_subjects)
    assert all(not any(s in q for s in subjects) for q in benchmark.questions)


def test_template_questions_use_every_template_and_fill_one_subject() -> None:
    templates = question_templates()
    assert all(t.count("{}") == 1 for t in templates)
    subjects = [f"<{i}>" for i in range(200)]
    questions = template_questions(subjects, 150, seed=3)
    assert len(questions) == 150 and len(set(questions)) == 150
    assert {q.replace(next(s for s in subjects if s in q), "{}") for q in questions} == set(templates)
    assert template_questions(subjects, 150, seed=3) == questions  # seeded
    assert len(template_questions(subjects[:7], 150)) == 7  # each subject at most once


def test_contrasts_ask_the_edit_question_of_other_subjects() -> None:
    subjects = ("Lyon", "Oslo", "Quito", "Perth", "Cairo")
    asked = contrast_questions("What is the capital of {Paris}? Paris!", "Paris", subjects, 3)
    assert len(asked) == 3 and all(q.startswith("What is the capital of {") and "Paris!" in q for q in asked)
    assert {q.split("{")[1].split("}")[0] for q in asked} <= set(subjects)
    assert contrast_questions("Who wrote it?", "Paris", subjects, 3) == []  # the subject is not in the text
    assert contrast_questions("Who wrote it?", None, subjects, 3) == []
    example = EditExample("Where was Ada Lovelace born?", "London", subject="Ada Lovelace")
    assert Contrasts(subjects, count=2)(example) == contrast_questions(example.text, "Ada Lovelace", subjects, 2)


def contrast_trainer(contrasts: Contrasts | None, spread: float = 0.0) -> PatchTrainer:
    model = get_patcher_model(sharp_gpt2(), PatcherConfig(patch_activation="relu"))
    task = CausalLMTask(chat_tokenizer())
    layer = model.base_model.patch_layer()
    rows = collect_queries(model, layer, task, random_pairs(40, seed=1), 10_000, progress=False)
    return PatchTrainer(model, task, EditConfig(contrast_spread=spread), MemoryBank(rows), contrasts=contrasts)


def first_read_preactivation(trainer: PatchTrainer, texts: list[str], target: str) -> torch.Tensor:
    batch = trainer.task.batch_for(trainer.model, [(text, target) for text in texts])
    with torch.no_grad(), trainer.layer.capture() as record:
        trainer.model(**batch.model_kwargs())
    return trainer.task.at_reads(record.frozen_preactivations, batch)[batch.first_reads()]


def test_contrasted_edit_stays_below_its_threshold_on_its_question_about_other_subjects() -> None:
    """The first read's patch sets its threshold above the contrasts: with a ReLU patch each gets exactly 0 (the
    highest sits 1 below the threshold, and `contrast_spread` sd further), while the edit is fixed as before; without
    contrasts some of them fire."""
    text, target = random_pairs(1, seed=3, words=EDIT_WORDS, length=4)[0]
    subject = text.split()[-1]  # the question ends with its subject: the first read sees it at once
    others = tuple(sentence(i) for i in range(EDIT_WORDS[0] + 20, EDIT_WORDS[0] + 30))
    contrasts = Contrasts(others, count=4)
    example = EditExample(text, target, subject=subject)
    asked = contrasts(example)
    assert len(asked) == 4
    trainer = contrast_trainer(contrasts)
    record = trainer.edit(example, edit_id=0)
    assert record.success and trainer.check(example)[0]
    first = first_read_preactivation(trainer, asked, target)[:, 0]
    assert float(first.max()) == pytest.approx(-1.0, abs=1e-3)
    assert float(first_read_preactivation(trainer, [text], target)[0, 0]) > 0
    spread = contrast_trainer(contrasts, spread=0.5)  # the default: half a standard deviation above the highest
    assert spread.edit(example, edit_id=0).success
    scores = first_read_preactivation(spread, asked, target)[:, 0]
    gap = -1 - float(scores.max())  # in pre-activation units: 0.5 sd of the contrasts' scores
    assert gap > 0 and gap == pytest.approx(0.5 * float(scores.std()), rel=2e-2)
    plain = contrast_trainer(None)
    assert plain.edit(example, edit_id=0).success
    assert (first_read_preactivation(plain, asked, target)[:, 0] > 0).any()


def test_patch_activation_of_a_new_patch_set_is_checked() -> None:
    with pytest.raises(ValueError, match="no default memory margins"):
        EditConfig(patch_activation="sigmoid")
    assert EditConfig(patch_activation="relu6").margins("relu6") == (0.0, 0.0)


def test_question_memory_is_cached_with_its_questions(tmp_path: Path) -> None:
    """Memory rows over pairs, then over answered questions; the cache file is named by both."""
    model, task = chat_model()
    layer = model.base_model.patch_layer()
    pairs = random_pairs(5, seed=1)
    questions = [q for q, _ in random_pairs(4, seed=6)]
    bank = build_memory(model, layer, task, pairs, 20, tmp_path, questions=questions, question_rows=12, progress=False)
    assert len(bank) == 5 * 2 + 12  # every pair's 2 answer tokens, then 12 rows of answered questions
    again = build_memory(model, layer, task, pairs, 20, tmp_path, questions=questions, question_rows=12, progress=False)
    assert torch.equal(again.rows(), bank.rows())
    other = build_memory(
        model, layer, task, pairs, 20, tmp_path, questions=questions[:2], question_rows=12, progress=False
    )
    assert len(list(tmp_path.iterdir())) == 2 and len(other) <= 32


def test_later_answer_tokens_are_gated_harder_than_the_first() -> None:
    """ReLU6 patches of a two-token answer: the first token's threshold sits 1 above the top memory row, a later
    token's `answer_gate` of the way from it to the edit (slack 12 for a pre-activation of 12 at the edit)."""
    model = get_patcher_model(sharp_gpt2(), PatcherConfig(patch_activation="relu6"))
    task = CausalLMTask(chat_tokenizer())
    layer = model.base_model.patch_layer()
    rows = collect_queries(model, layer, task, random_pairs(40, seed=1), 10_000, progress=False)
    for example in [EditExample(t, y) for t, y in random_pairs(6, seed=3, words=EDIT_WORDS, length=4)]:
        trainer = PatchTrainer(model, task, EditConfig(), MemoryBank(rows))
        record = trainer.edit(example, edit_id=0)
        committed = layer.committed()
        if record.neurons == 2 and record.steps == 0:  # both tokens patched by the solve alone
            break
        trainer.reset()
    else:
        pytest.fail("no example needed a patch on both answer tokens")
    keys, bias = committed["patch_frozen_keys"], committed["patch_frozen_bias"]
    top = (rows @ keys.T + bias).max(0).values
    assert top.tolist() == pytest.approx([-1.0, -12.0], abs=0.1)  # t_max comes from the bfloat16 first pass
    assert EditConfig.faithful().patch_activation_for("causal_lm") is None  # the FFN's own
    assert EditConfig().patch_activation_for("causal_lm") == "relu6"
    assert EditConfig().patch_activation_for("classification") is None
    assert EditConfig(patch_activation="gelu").patch_activation_for("classification") == "gelu"
    with pytest.raises(ValueError, match="answer_gate"):
        EditConfig(answer_gate=1.0)


def test_weak_lead_also_patches_the_reads_the_edit_gets_right_by_a_hair() -> None:
    """`weak_lead`: an answer read the model already gets right, but by less than that logit lead, gets a patch too
    (a rephrase flips such a read), solved to lead like the wrong ones; `max_patches` keeps room for the wrong reads
    first. Without it only the wrong reads are patched."""
    model = get_patcher_model(sharp_gpt2(), PatcherConfig(patch_activation="relu6"))
    task = CausalLMTask(chat_tokenizer())
    layer = model.base_model.patch_layer()
    rows = collect_queries(model, layer, task, random_pairs(40, seed=1), 10_000, progress=False)

    def logits(example: EditExample) -> torch.Tensor:
        batch = task.batch_for(model, [(example.text, example.target)])
        with torch.no_grad():
            return task.read_logits(model(**batch.model_kwargs()), batch)

    def margins(example: EditExample) -> torch.Tensor:
        batch = task.batch_for(model, [(example.text, example.target)])
        return task.margins(logits(example), batch.labels)

    text, first = random_pairs(1, seed=3, words=EDIT_WORDS, length=4)[0][0], "w100 w101"
    second = int(logits(EditExample(text, first))[1].argmax())  # the word the model itself says after w100
    example = EditExample(text, f"w100 w{second}")
    before = margins(example)
    assert before[0] <= 0 < before[1]  # the first read wrong, the second right
    wrong, right = int((before <= 0).sum()), (before > 0).nonzero().flatten()
    for config, patched in (
        (EditConfig(), wrong),
        (EditConfig(weak_lead=float(before.max()) + 1), len(before)),
        (EditConfig(weak_lead=float(before.max()) + 1, max_patches=wrong), wrong),
    ):
        trainer = PatchTrainer(model, task, config, MemoryBank(rows))
        record = trainer.edit(example, edit_id=0)
        assert record.success and record.mistakes == wrong and record.neurons == patched
        after = margins(example)
        assert (after > 0).all()
        if patched == len(before):  # the right reads got patches solved to lead further than they did
            assert (after[right] > before[right] + 1).all()
        trainer.reset()
    with pytest.raises(ValueError, match="weak_lead"):
        EditConfig(weak_lead=-1.0)


def test_token_contexts_are_windows_ending_at_the_token_spread_over_its_occurrences() -> None:
    contexts = TokenContexts([[5, 6, 7, 6], [6, 8, 9, 6, 10], [7]], per_token=2, window=3)
    assert contexts.occurrences(6) == 3  # a sequence's first token has no context and is not an occurrence
    assert contexts.windows(6) == [[5, 6], [8, 9, 6]]  # the first and last of 3 occurrences, at most 3 tokens
    assert contexts.windows(7) == [[5, 6, 7]] and contexts.windows(5) == [] and contexts.windows(99) == []
    assert TokenContexts([[5, 6]] * 10, per_token=4).windows(6) == [[5, 6]] * 4
    with pytest.raises(ValueError, match="per_token"):
        TokenContexts([], per_token=0)


def test_a_later_answer_token_stays_below_running_text_that_ends_in_its_token() -> None:
    """The patch on an answer's second token reads at its first. Text that ends in that token comes close to the
    edit there; with token contexts the patch's threshold sits `answer_gate` of the way from the top context to the
    edit, so every context gets pre-activation <= -12 while the edit is fixed; without them some score far higher."""
    model = get_patcher_model(sharp_gpt2(), PatcherConfig(patch_activation="relu6"))
    task = CausalLMTask(chat_tokenizer())
    layer = model.base_model.patch_layer()
    rows = collect_queries(model, layer, task, random_pairs(40, seed=1), 10_000, progress=False)
    others = random_pairs(30, seed=9, length=5)
    found = []
    for example in [EditExample(t, y) for t, y in random_pairs(8, seed=3, words=EDIT_WORDS, length=4)]:
        token = task.answer_tokens(example.target)[0]
        texts = [f"{text} {task.tokenizer.decode([token])}" for text, _ in others]
        contexts = TokenContexts.from_texts(task.tokenizer, texts, per_token=8)
        (queries,) = contexts.queries(model, layer, [token], task.pad_id)
        assert queries is not None and queries.shape == (8, layer.query_dim)
        top = {}
        for name, given in (("contexts", contexts), ("plain", None)):
            trainer = PatchTrainer(model, task, EditConfig(), MemoryBank(rows), contexts=given)
            record = trainer.edit(example, edit_id=0)
            keys, bias = layer.committed()["patch_frozen_keys"], layer.committed()["patch_frozen_bias"]
            if record.neurons == 2 and record.success:
                top[name] = float((queries @ keys[1] + bias[1]).max())
            trainer.reset()
        if len(top) == 2:
            found.append(top)
    assert found, "no example needed a patch on both answer tokens"
    assert all(top["contexts"] <= min(top["plain"], -12 + 0.1) for top in found)
    assert sum(top["plain"] > -10 for top in found) >= 2  # the same patches without contexts


def test_subject_index_finds_the_subjects_whose_embeddings_are_nearest() -> None:
    """Cosine of mean input embeddings; the subject itself and subjects containing it (or contained in it) are never
    its neighbours."""
    tokenizer = tiny_tokenizer()
    embeddings = torch.zeros(128, 4)
    embeddings[10] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    embeddings[11] = torch.tensor([0.9, 0.1, 0.0, 0.0])
    embeddings[12] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    embeddings[13] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    embeddings[14] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    pool = ["w13", "w12", "w10 w14", "w11", "w10"]
    index = SubjectIndex(embeddings, tokenizer, pool)
    assert index.nearest("w10", 2) == ["w11", "w12"]
    assert index.nearest("w10", 10) == ["w11", "w12", "w13"]
    assert index.nearest("w10", 0) == [] and SubjectIndex(embeddings, tokenizer, []).nearest("w10", 3) == []


def test_contrasts_ask_the_nearest_subjects_first_then_random_ones() -> None:
    subjects = [f"Person {i}" for i in range(40)]
    text = "Where was Ada Lovelace born?"
    near = ["Person 7", "Ada Lovelace", "Person 3", "Person 7"]
    asked = contrast_questions(text, "Ada Lovelace", subjects, 6, nearest=near)
    assert asked[:2] == ["Where was Person 7 born?", "Where was Person 3 born?"]
    assert len(asked) == len(set(asked)) == 6 and all("Ada" not in q for q in asked)
    random_only = contrast_questions(text, "Ada Lovelace", subjects, 6)
    assert asked[2:] == [q for q in random_only if q not in asked[:2]][:4]


def test_nearest_contrasts_and_kept_inputs_hold_the_patch_below_them() -> None:
    """With `nearest_contrasts`, the trainer asks the subjects its index finds nearest first; every `keep` input
    joins the contrasts, so the first read's patch stays below it too (exactly 0 for a ReLU patch)."""
    text, target = random_pairs(1, seed=3, words=EDIT_WORDS, length=4)[0]
    subject = text.split()[-1]
    others = tuple(sentence(i) for i in range(EDIT_WORDS[0] + 20, EDIT_WORDS[0] + 30))
    first, *rest = text.split()
    keep = (" ".join([f"w{int(first[1:]) + 1}", *rest]),)  # one word away: the plain patch fires on it
    fired = {}
    for kept in ((), keep):
        trainer = contrast_trainer(Contrasts(others, count=4))
        trainer.config = replace(trainer.config, nearest_contrasts=4)
        trainer.subjects = SubjectIndex.from_model(trainer.model, trainer.task.tokenizer, others)
        example = EditExample(text, target, subject=subject, keep=kept)
        texts = trainer._contrast_texts(example)
        near = trainer.subjects.nearest(subject, trainer.config.nearest_contrasts)
        assert len(near) == 4 and texts[:4] == [text.replace(subject, s) for s in near] and texts[4:] == list(kept)
        assert trainer.edit(example, edit_id=0).success
        assert float(first_read_preactivation(trainer, [text], target)[0, 0]) > 0
        fired[kept] = float(first_read_preactivation(trainer, list(keep), target)[0, 0])
    assert fired[()] > 0 > fired[keep]


def test_subject_contrasts_ask_the_subject_other_questions_from_the_package_templates() -> None:
    text = "Who founded Acme Widgets?"
    asked = subject_contrasts(text, "Acme Widgets", 12)
    assert len(asked) == len(set(asked)) == 12 and text not in asked
    assert all("Acme Widgets" in a for a in asked)
    assert asked == subject_contrasts(text, "Acme Widgets", 12)  # the same draw for the same edit
    templates = {t.format("Acme Widgets") for t in question_templates()}
    assert set(subject_contrasts(text, "Acme Widgets", 1000)) == templates - {text}
