"""The standard parts of the evaluation suite, built from texts and a causal-LM task.

The locality suite (:func:`locality_parts`), each part reported on its own:

- ``unrelated-raw`` / ``unrelated-chat``: questions unrelated to any edit (NQ items, other CounterFact cases), read
  raw and through the chat template, each answered greedily (``answer_tokens`` at most);
- ``neighbours-raw`` / ``neighbours-chat``: the edits' near neighbours (same question, another subject), counted
  once their edit is made;
- ``subject-raw`` / ``subject-chat``: other questions about each edit's own subject (held-out templates,
  :func:`~transformer_patcher.data.suite_data.subject_questions`), counted once their edit is made: what a subject
  gate lets through;
- ``generation-raw`` / ``generation-chat``: free generation, ``generation_tokens`` greedy tokens after WikiText-2
  test openings (raw) and after plain chat questions (chat);
- ``perplexity``: WikiText-2 test perplexity over ``perplexity_tokens`` tokens in windows of ``window``.

Parts read against labels (:func:`label_part`) score the edits themselves: with the end token, ``exact`` is our SR
(greedy generation writes the answer and stops); without it, ``token`` is EasyEdit's rewrite/rephrase accuracy.
:func:`easyedit_locality_part` is EasyEdit's locality: the unchanged argmax tokens of ``loc + " " + loc_ans``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from transformer_patcher.core.prompts import CHAT, RAW, PromptFormat
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.core.validation import check_int
from transformer_patcher.data.benchmarks import Benchmark
from transformer_patcher.data.loaders import load_neighbours
from transformer_patcher.data.neighbours import subject_of
from transformer_patcher.data.suite_data import SuiteSources, subject_questions, suite_sources
from transformer_patcher.experiments.evaluation.suite import LABELS, PERPLEXITY, REFERENCE, Part

FORMATS = (RAW, CHAT)


@dataclass(frozen=True)
class SuiteConfig:
    """How much of each part to ask. The default is the full suite (about 1,000 questions, 100 free generations,
    50k tokens of perplexity); :meth:`preset` also knows ``small`` (a quick look) and ``none``."""

    unrelated: int = 500  # unrelated questions per prompt format
    neighbours: int = 2  # near neighbours per edit, per prompt format
    subjects: int = 2  # other questions about each edit's subject, per prompt format
    generation: int = 100  # free-generation prompts: half WikiText-2 openings (raw), half chat questions
    generation_tokens: int = 32
    answer_tokens: int = 16  # greedy tokens of a question's answer
    perplexity_tokens: int = 50_000
    window: int = 512
    formats: tuple[str, ...] = FORMATS
    batch_size: int = 32
    locality_file: str | None = None  # your own unrelated questions (``{"text": ...}`` per record) instead of ours
    neighbour_file: str | None = None  # your own neighbours (``{"text": edit, "neighbours": [...]}`` per record)

    def __post_init__(self) -> None:
        for item in fields(self):
            if item.name not in ("formats", "locality_file", "neighbour_file"):
                check_int(item.name, getattr(self, item.name), minimum=0 if item.name != "batch_size" else 1)
        for name in ("generation_tokens", "answer_tokens"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("window", self.window, minimum=2)
        object.__setattr__(self, "formats", tuple(self.formats))
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"suite formats must be among {FORMATS}, got {list(self.formats)}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SuiteConfig | None:
        """``full`` (the default sizes), ``small`` (100 questions per format, 32 generations, 8k tokens of
        perplexity: about a minute on SmolLM2) or ``none`` (no suite: returns None)."""
        if name == "none":
            return None
        if name not in PRESETS:
            raise ValueError(f"suite must be one of {(*PRESETS, 'none')}, got {name!r}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    "full": SuiteConfig(),
    "small": SuiteConfig(unrelated=100, neighbours=1, subjects=1, generation=32, perplexity_tokens=8192),
}


def available_formats(task: CausalLMTask, wanted: Sequence[str]) -> list[str]:
    """``wanted`` without ``chat`` when the tokenizer has no chat template (a base model is asked raw only)."""
    return [f for f in wanted if f != CHAT or getattr(task.tokenizer, "chat_template", None)]


def locality_parts(
    task: CausalLMTask,
    sources: SuiteSources,
    config: SuiteConfig,
    neighbours: Sequence[Sequence[str]] = (),
    max_positions: int | None = None,
    subjects: Sequence[Sequence[str]] = (),
) -> list[Part]:
    """Parts a–d of the locality suite; ``neighbours[i]`` are the near neighbours of edit ``i`` and ``subjects[i]``
    other questions about its subject (group ``i``). ``max_positions`` (the model's position limit, when it has one)
    caps prompt + answer and perplexity windows."""
    formats = available_formats(task, config.formats)
    parts = []
    for fmt in formats:
        formatted = task.formatted(PromptFormat(fmt))
        questions = sources.unrelated[: config.unrelated]
        if questions:
            parts.append(_questions(f"unrelated-{fmt}", formatted, questions, config.answer_tokens, max_positions))
        for name, per_edit, count in (
            ("neighbours", neighbours, config.neighbours),
            ("subject", subjects, config.subjects),
        ):
            rows = [(group, text) for group, texts in enumerate(per_edit) for text in texts[:count]]
            if rows:
                texts = [t for _, t in rows]
                part = _questions(f"{name}-{fmt}", formatted, texts, config.answer_tokens, max_positions)
                parts.append(replace(part, groups=[g for g, _ in rows]))
    chat = CHAT in formats
    n_chat = min(config.generation // 2, len(sources.chat_questions)) if chat else 0
    for fmt, texts in ((RAW, sources.openings[: config.generation - n_chat]), (CHAT, sources.chat_questions[:n_chat])):
        if texts:
            formatted = task.formatted(PromptFormat(fmt))
            parts.append(_questions(f"generation-{fmt}", formatted, texts, config.generation_tokens, max_positions))
    window = min(config.window, max_positions or config.window)
    windows = perplexity_windows(task.tokenizer, sources.perplexity_text, config.perplexity_tokens, window)
    if windows:
        parts.append(Part(PERPLEXITY, [w[:1] for w in windows], [w[1:] for w in windows], against=PERPLEXITY))
    return parts


def _questions(
    name: str, task: CausalLMTask, texts: Sequence[str], max_new_tokens: int, max_positions: int | None
) -> Part:
    """Questions answered greedily; a prompt too long for the model keeps its last tokens (the question's end and,
    in chat, the assistant header)."""
    room = None if max_positions is None else max(max_positions - max_new_tokens, 1)
    prompts = [task.prompt_tokens(text)[-room:] if room else task.prompt_tokens(text) for text in texts]
    return Part(name, prompts, against=REFERENCE, max_new_tokens=max_new_tokens, stop_ids=task.prompter.stop_ids)


def perplexity_windows(tokenizer: Any, text: str, tokens: int, window: int) -> list[list[int]]:
    """The first ``tokens`` tokens of ``text`` cut into windows of ``window`` (a last window under 2 is dropped)."""
    if tokens == 0 or not text.strip():
        return []
    ids = tokenizer(text[: tokens * 12], add_special_tokens=False)["input_ids"][:tokens]  # ~4 characters a token
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]


def label_part(
    name: str,
    rows: Sequence[tuple[CausalLMTask, str, str]],
    groups: Sequence[int] | None = None,
    end_token: bool = True,
) -> Part:
    """(task, input, target) rows read against their targets, each in its task's prompt format. With
    ``end_token`` the format's end token is part of the target (``exact`` = greedy generation writes the target and
    stops); without it the rows are EasyEdit's ``prompt + target``."""
    prompts = [task.prompt_tokens(text) for task, text, _ in rows]
    targets = [_answer(task, target, end_token) for task, _, target in rows]
    return Part(name, prompts, targets, against=LABELS, groups=None if groups is None else list(groups))


def _answer(task: CausalLMTask, target: str, end_token: bool) -> list[int]:
    """The target's tokens, with the format's end token or (EasyEdit's way) without it."""
    answer = task.answer_tokens(target)
    return answer if end_token or not task.prompter.end_ids else answer[: -len(task.prompter.end_ids)]


def easyedit_locality_part(task: CausalLMTask, pairs: Sequence[tuple[str, str]]) -> Part:
    """EasyEdit's locality: the argmax tokens over ``loc + " " + loc_ans`` compared with the reference model's."""
    prompts = [task.prompt_tokens(text) for text, _ in pairs]
    answers = [_answer(task, answer, end_token=False) for _, answer in pairs]
    return Part("easyedit-locality", prompts, answers, against=REFERENCE)


def benchmark_parts(
    task: CausalLMTask,
    benchmark: Benchmark,
    config: SuiteConfig,
    data_dir: str | None = None,
    max_positions: int | None = None,
) -> list[Part]:
    """The locality suite for a benchmark's stream (group ``i`` = example ``i``), plus EasyEdit's rewrite and
    rephrase accuracy over the examples streamed so far and its locality over the benchmark's locality pairs.
    Unrelated questions come from the shared data unless the benchmark is the embedded sample; none is an edit."""
    stream = [e.text for e in benchmark.examples]
    sources = suite_sources(data_dir, benchmark.embedded, stream, config.locality_file)
    if config.neighbour_file is not None:
        neighbours = neighbours_from_file(config.neighbour_file, stream)
    else:
        neighbours = benchmark.neighbours(config.neighbours)
    examples = benchmark.examples
    subjects = subject_questions(
        [subject_of(e.text, e.subject) for e in examples],
        config.subjects,
        [{e.text, *e.rephrases} for e in examples],
    )
    parts = locality_parts(task, sources, config, neighbours, max_positions, subjects)
    if examples and all(isinstance(e.target, str) for e in examples):
        rewrite = [(task, e.text, str(e.target)) for e in examples]
        parts.append(label_part("easyedit-rewrite", rewrite, groups=range(len(examples)), end_token=False))
        rephrase = [(i, (task, text, str(e.target))) for i, e in enumerate(examples) for text in e.rephrases]
        if rephrase:
            rows = [row for _, row in rephrase]
            parts.append(label_part("easyedit-rephrase", rows, groups=[i for i, _ in rephrase], end_token=False))
    locality = benchmark.eval_sets.get("locality", [])
    if locality:
        parts.append(easyedit_locality_part(task, [(text, str(answer)) for text, answer in locality]))
    return parts


def neighbours_from_file(path: str, texts: Sequence[str]) -> list[list[str]]:
    """The neighbours a neighbour file gives each of ``texts`` (none for a text it does not list)."""
    found = load_neighbours(path)
    return [found.get(text, []) for text in texts]


def flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"unrelated-raw": {"exact": 1.0, ...}}`` as ``{"unrelated-raw.exact": 1.0, ...}`` (no timings)."""
    return {
        f"{part}.{key}": value for part, values in results.items() for key, value in values.items() if key != "seconds"
    }
