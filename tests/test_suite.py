"""The evaluation suite on tiny models: its measures against hand computations, teacher forcing against real
generation, replayed evaluations against full ones, and a leaky versus an exactly silent patch."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from tiny_models import build
from tiny_tokenizer import EDIT_WORDS, random_pairs, random_sentence, sharp_gpt2, tiny_tokenizer
from transformer_patcher import PatcherConfig, get_patcher_model
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.data.suite_data import SuiteSources, subject_questions
from transformer_patcher.experiments.evaluation import (
    EvaluationSuite,
    ForcedReads,
    Part,
    SuiteConfig,
    easyedit_locality_part,
    greedy_continuations,
    label_part,
    locality_parts,
)
from transformer_patcher.methods.patcher.replay import ForwardReplay

# user turns start with w4, assistant turns with w6, every turn ends with w5 (the end-of-turn token)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'w4' if m['role'] == 'user' else 'w6' }} {{ m['content'] }} w5 {% endfor %}"
    "{% if add_generation_prompt %}w6 {% endif %}"
)
SMALL = SuiteConfig(unrelated=12, neighbours=2, generation=8, generation_tokens=6, answer_tokens=4, window=16)


def chat_tokenizer() -> tf.PreTrainedTokenizerFast:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def sources(seed: int = 0) -> SuiteSources:
    generator = torch.Generator().manual_seed(seed)
    sentence = lambda n: random_sentence(generator, n)  # noqa: E731
    return SuiteSources(
        unrelated=[sentence(5) for _ in range(12)],
        openings=[sentence(6) for _ in range(4)],
        chat_questions=[sentence(4) for _ in range(4)],
        perplexity_text=sentence(200),
        origin="test",
    )


def neighbours() -> list[list[str]]:
    return [[q for q, _ in random_pairs(2, seed=10 + i, words=EDIT_WORDS, length=5)] for i in range(3)]


def patched(seed: int = 0, **config: object) -> tuple[torch.nn.Module, CausalLMTask]:
    model = get_patcher_model(sharp_gpt2(seed), PatcherConfig(**config))
    return model, CausalLMTask(chat_tokenizer())


def make_suite(model: torch.nn.Module, task: CausalLMTask, replay: bool = True) -> EvaluationSuite:
    parts = locality_parts(task, sources(), SMALL, neighbours(), max_positions=64)
    parts.append(easyedit_locality_part(task, random_pairs(6, seed=5, length=4)))
    layer = model.base_model.patch_layer()
    return EvaluationSuite(model, parts, task.pad_id, 4, ForwardReplay(model, layer) if replay else None, False)


def add_patch(model: torch.nn.Module, bias: float, scale: float, seed: int = 0) -> None:
    layer = model.base_model.patch_layer()
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(1, layer.output_dim, generator=generator) * scale
    layer.add_patches(torch.zeros(1, layer.query_dim), torch.tensor([bias]), value, edit_id=1)
    layer.commit()


# ------------------------------------------------------------------------------------------- hand computations
def test_reads_match_an_unbatched_forward_pass() -> None:
    """Batched, sorted, right-padded reads with logits_to_keep equal one plain forward pass per sequence."""
    model = sharp_gpt2()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 128, (n,), generator=generator).tolist() for n in (3, 7, 2, 5, 9)]
    continuations = [torch.randint(4, 128, (n,), generator=generator).tolist() for n in (4, 1, 6, 2, 3)]
    reads = ForcedReads(prompts, continuations, pad_id=0, batch_size=2).run(model)
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        ids = torch.tensor([prompt + continuation[:-1]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 :].float()
        expected = torch.log_softmax(logits, -1)[torch.arange(len(continuation)), torch.tensor(continuation)]
        assert reads.argmax_of(i).tolist() == logits.argmax(-1).tolist()
        got = reads.log_probs[reads.offsets[i] : reads.offsets[i + 1]]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_label_and_perplexity_measures_equal_hand_computed_values() -> None:
    model, task = patched()
    rows = [(task, text, target) for text, target in random_pairs(5, seed=7, words=EDIT_WORDS, length=4)]
    windows_text = random_sentence(torch.Generator().manual_seed(8), 40)
    windows = [task.tokenizer(windows_text, add_special_tokens=False)["input_ids"][i : i + 16] for i in (0, 16, 32)]
    parts = [
        label_part("edits", rows),
        Part("perplexity", [w[:1] for w in windows], [w[1:] for w in windows], against="perplexity"),
    ]
    suite = EvaluationSuite(model, parts, task.pad_id, 2, None, False)
    measured = suite.reference_scores()

    fractions, nll = [], []
    for _, text, target in rows:
        prompt, answer = task.prompt_tokens(text), task.answer_tokens(target)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer[:-1]])).logits[0, len(prompt) - 1 :]
        fractions.append(
            sum(int(p == a) for p, a in zip(logits.argmax(-1).tolist(), answer, strict=True)) / len(answer)
        )
    for window in windows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0, :-1].float()
        nll += (-torch.log_softmax(logits, -1)[torch.arange(len(window) - 1), torch.tensor(window[1:])]).tolist()
    assert measured["edits"]["exact"] == pytest.approx(sum(f == 1.0 for f in fractions) / len(fractions))
    assert measured["edits"]["token"] == pytest.approx(sum(fractions) / len(fractions))
    assert measured["perplexity"]["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    assert measured["perplexity"]["change"] == 0.0


def test_exact_from_teacher_forcing_is_exactly_unchanged_greedy_generation() -> None:
    """Per row, "exact" (every read argmax unchanged) holds exactly when a real generate() reproduces the output."""
    model, task = patched()
    suite = make_suite(model, task)
    add_patch(model, bias=1.0, scale=0.8)
    suite.evaluate()
    for name in ("unrelated-raw", "unrelated-chat", "generation-raw"):
        part = next(p for p in suite.parts if p.name == name)
        after = greedy_continuations(model, part.prompts, part.stop_ids, part.max_new_tokens, task.pad_id)
        unchanged = [a == b for a, b in zip(after, suite.continuations(name), strict=True)]
        assert [r == 1.0 for r in suite.row_agreement(name)] == unchanged
        assert 0 < sum(unchanged) < len(unchanged), name  # the check saw both kinds of row


# ------------------------------------------------------------------------------------------ leaks and silence
def test_a_patch_that_fires_on_everything_leaks_in_every_part() -> None:
    model, task = patched()
    suite = make_suite(model, task)
    add_patch(model, bias=10.0, scale=5.0)
    results = suite.evaluate()
    expected = {f"{p}-{f}" for p in ("unrelated", "neighbours", "generation") for f in ("raw", "chat")}
    assert expected | {"perplexity", "easyedit-locality"} == set(results)
    for name, measures in results.items():
        if name == "perplexity":
            assert abs(measures["change"]) > 0.05
        else:
            assert measures["exact"] < 0.5 and measures["token"] < 0.9, name


def test_an_exactly_silent_patch_changes_nothing() -> None:
    model, task = patched(patch_activation="relu")
    suite = make_suite(model, task)
    add_patch(model, bias=-1e4, scale=5.0)  # relu(q·0 - 1e4) = 0 on every input
    for name, measures in suite.evaluate().items():
        if name == "perplexity":
            assert measures["change"] == 0.0
        else:
            assert measures["exact"] == measures["token"] == 1.0, name


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma3_text", "opt"])
def test_replayed_evaluations_equal_full_forward_passes(name: str) -> None:
    torch.manual_seed(0)
    model = get_patcher_model(build(name))
    task = CausalLMTask(chat_tokenizer())
    replayed, full = make_suite(model, task, replay=True), make_suite(model, task, replay=False)
    for seed in (0, 1):  # two patch states: the second evaluation replays the recordings of the first
        add_patch(model, bias=0.5, scale=2.0, seed=seed)
        assert measures(replayed.evaluate()) == measures(full.evaluate())
        for part in replayed.parts:
            if part.name != "perplexity":
                assert replayed.row_agreement(part.name) == full.row_agreement(part.name)


def measures(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Results without their timings."""
    return {part: {k: v for k, v in values.items() if k != "seconds"} for part, values in results.items()}


def test_grouped_parts_count_only_the_edits_made() -> None:
    model, task = patched()
    suite = make_suite(model, task)
    assert suite.evaluate(groups=[])["unrelated-raw"]["n"] == 12
    assert "neighbours-raw" not in suite.evaluate(groups=[])
    assert suite.evaluate(groups=[0, 2])["neighbours-raw"]["n"] == 4  # 2 neighbours each of edits 0 and 2


def test_the_reference_saves_and_is_refused_for_other_prompts() -> None:
    model, task = patched()
    suite = make_suite(model, task)
    state = suite.state_tensors()
    add_patch(model, bias=10.0, scale=5.0)
    restored = EvaluationSuite(model, suite.parts, task.pad_id, 4, None, False, state=state)  # no regeneration
    assert measures(restored.evaluate()) == measures(suite.evaluate())
    for name in ("unrelated-chat", "generation-raw"):
        assert restored.continuations(name) == suite.continuations(name)
        assert restored.row_agreement(name) == suite.row_agreement(name)
    other = [
        p if p.name != "unrelated-raw" else Part(p.name, p.prompts[::-1], stop_ids=p.stop_ids) for p in suite.parts
    ]
    with pytest.raises(ValueError, match="other prompts"):
        EvaluationSuite(model, other, task.pad_id, 4, None, False, state=state)


def test_parts_skip_chat_for_a_tokenizer_without_a_template() -> None:
    task = CausalLMTask(tiny_tokenizer())
    names = [p.name for p in locality_parts(task, sources(), SMALL, neighbours(), max_positions=64)]
    assert names == ["unrelated-raw", "neighbours-raw", "generation-raw", "perplexity"]


def test_subject_questions_ask_each_edit_s_subject_something_else() -> None:
    """Edit i takes the held-out templates in turn from i·count; its own text and rephrases are skipped; an edit
    without a subject gets none."""
    first, second, none = subject_questions(["Ada", "Bo", None], 2, [set(), {"What country does Bo come from?"}])
    assert first == ["Which year was Ada born in?", "What country does Ada come from?"]
    assert second == ["What was the profession of Bo?", "Where did Bo grow up?"]
    assert none == []
    skipped = subject_questions(["Bo"], 2, [{"Which year was Bo born in?"}])[0]
    assert skipped == ["What country does Bo come from?", "What was the profession of Bo?"]


def test_subject_parts_are_grouped_by_their_edit() -> None:
    _, task = patched()
    about = [["w1 w2 w3", "w2 w3 w1"], [], ["w3 w1 w2"]]
    config = SuiteConfig(unrelated=2, neighbours=0, subjects=1, generation=0, perplexity_tokens=0)
    parts = {p.name: p for p in locality_parts(task, sources(), config, max_positions=64, subjects=about)}
    assert sorted(parts) == ["subject-chat", "subject-raw", "unrelated-chat", "unrelated-raw"]
    assert parts["subject-raw"].groups == [0, 2]
    assert parts["subject-raw"].prompts == [task.prompt_tokens("w1 w2 w3"), task.prompt_tokens("w3 w1 w2")]


def test_prompts_and_windows_fit_the_model_positions() -> None:
    _, task = patched()
    parts = locality_parts(task, sources(), SMALL, neighbours(), max_positions=12)
    for part in parts:
        longest = max(len(p) for p in part.prompts) + (part.max_new_tokens if part.continuations is None else 0)
        assert longest <= 12 or part.name == "perplexity"
    windows = next(p for p in parts if p.name == "perplexity")
    assert max(1 + len(c) for c in windows.continuations or []) <= 12


def test_easyedit_measures_equal_hand_computed_values() -> None:
    """Rewrite accuracy: target tokens (no end-of-turn) argmax-correct; locality: loc_ans argmax tokens unchanged."""
    model, task = patched()
    chat = task.formatted("chat")
    rows = [(chat, text, target) for text, target in random_pairs(4, seed=21, words=EDIT_WORDS, length=3)]
    loc = random_pairs(5, seed=22, length=4)
    parts = [label_part("easyedit-rewrite", rows, end_token=False), easyedit_locality_part(chat, loc)]
    suite = EvaluationSuite(model, parts, task.pad_id, 3, ForwardReplay(model, model.base_model.patch_layer()), False)

    def argmax(prompt: list[int], answer: list[int]) -> list[int]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer[:-1]])).logits[0, len(prompt) - 1 :]
        return logits.argmax(-1).tolist()

    answers = [(chat.prompt_tokens(text), chat.answer_tokens(target)[:-1]) for _, text, target in rows]
    assert all(5 not in answer for _, answer in answers)  # EasyEdit's target carries no end-of-turn token
    locality = [(chat.prompt_tokens(q), chat.answer_tokens(a)[:-1]) for q, a in loc]
    before = [argmax(p, a) for p, a in locality]
    add_patch(model, bias=2.0, scale=3.0)
    results = suite.evaluate()
    rewrite = [sum(x == y for x, y in zip(argmax(p, a), a, strict=True)) / len(a) for p, a in answers]
    unchanged = [
        sum(x == y for x, y in zip(argmax(p, a), b, strict=True)) / len(a)
        for (p, a), b in zip(locality, before, strict=True)
    ]
    assert results["easyedit-rewrite"]["token"] == pytest.approx(sum(rewrite) / len(rewrite))
    assert results["easyedit-locality"]["token"] == pytest.approx(sum(unchanged) / len(unchanged))
    assert results["easyedit-locality"]["exact"] == pytest.approx(sum(u == 1.0 for u in unchanged) / len(unchanged))
    assert 0 < results["easyedit-locality"]["token"] < 1  # the patch changed some loc_ans tokens, not all
