"""Benchmarks: everything an SME run reads from data, split the way the paper splits it.

A :class:`Benchmark` holds the edit stream, the evaluation sets that measure it (``train``/``test`` for TrainR and
TestR, ``locality`` for agreement with the pre-edit model), the memory set whose queries the patches must stay silent
on, and a disjoint validation memory used only for the stopping rule. Builders exist for FEVER (classification), zsRE
and CounterFact (generation); the memory and evaluation sets never share an input with each other.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.prompts import PromptFormat
from transformer_patcher.data.loaders import (
    ZSRE_SAMPLE,
    find_data_file,
    load_counterfact,
    load_fever,
    load_zsre,
    to_edit_examples,
)
from transformer_patcher.data.neighbours import neighbours_of, question_template, same_template_records
from transformer_patcher.data.questions import Contrasts, contrasts_over, memory_questions, memory_subjects
from transformer_patcher.data.rewordings import RelationRewordings, relation_rewordings

Pair = tuple[str, Any]
MEMORY_SAMPLE = Path(__file__).with_name("samples") / "memory_sample.json"  # factual prompts; provenance in samples/
VALIDATION_CHUNKS = 400  # WikiText-2 valid chunks held out of the memory for the stopping rule


@dataclass
class Benchmark:
    """An edit stream plus the sets that measure it; ``notes`` says what a metric means here or why it is missing."""

    name: str
    examples: list[EditExample]
    eval_sets: dict[str, list[Pair]]
    memory: list[Pair]
    validation: list[Pair]
    notes: dict[str, str] = field(default_factory=dict)
    extra: dict[str, list[Pair]] = field(default_factory=dict)  # e.g. FEVER's classifier training split
    prompt_format: PromptFormat = field(default_factory=PromptFormat)  # how the edits and evaluation sets are asked
    neighbour_pool: list[tuple[str, str | None]] = field(default_factory=list)  # every record's (question, subject)
    locality_is_neighbourhood: bool = False  # CounterFact: an example's locality prompt is about another subject
    embedded: bool = False  # built from the package's embedded sample, not the shared data
    memory_subjects: list[str] = field(default_factory=list)  # subjects no evaluation asks about (.questions)
    rewordings: RelationRewordings = field(default_factory=RelationRewordings)  # relation wordings (rule 20)

    def head(self, n: int | None) -> Benchmark:
        """The same benchmark with only the first ``n`` edit examples (``None``: all)."""
        if n is None:
            return self
        if n <= 0:
            raise ValueError(f"the number of examples must be positive, got {n}")
        return replace(self, examples=self.examples[:n])

    @property
    def questions(self) -> list[str]:
        """Memory questions the model answers itself (generators): the package templates over ``memory_subjects``."""
        return memory_questions(self.memory_subjects)

    def contrasts(self) -> Contrasts | None:
        """Each edit's question asked of other subjects (``memory_subjects``): what its patch's threshold sits above."""
        return contrasts_over(self.memory_subjects)

    def formatted(self, prompt_format: PromptFormat | str | None) -> Benchmark:
        """The same benchmark asked in another prompt format (raw, chat or a template string)."""
        return replace(self, prompt_format=PromptFormat.coerce(prompt_format))

    def neighbours(self, count: int) -> list[list[str]]:
        """Up to ``count`` near neighbours per example (see :mod:`.neighbours`): the data's own — the neighbourhood
        prompt, other records asking the same question of another subject, never a question of the stream — then the
        example's template filled with other subjects."""
        stream = {e.text for e in self.examples}
        pool = same_template_records(self.neighbour_pool, stream)
        result = []
        for example in self.examples:
            found = [text for text, _ in example.locality] if self.locality_is_neighbourhood else []
            template = question_template(example.text, example.subject) if example.subject else None
            found += pool.get(template, []) if template is not None else []
            result.append(neighbours_of(example.text, example.subject, count, found))
        return result


# ---------------------------------------------------------------------------------------------------- text
def text_chunks(text: str, words: int) -> list[list[str]]:
    """Running text cut into consecutive chunks of exactly ``words`` words (a shorter tail is dropped)."""
    tokens = text.split()
    return [tokens[i : i + words] for i in range(0, len(tokens) - words + 1, words)]


def text_pairs(text: str, words: int = 24) -> list[Pair]:
    """Cut running text into (first word, rest) pairs, so a causal LM's queries at every position join the memory."""
    return [(chunk[0], " ".join(chunk[1:])) for chunk in text_chunks(text, words)]


def wikitext_text(split: str, data_dir: str | Path | None = None) -> str:
    """The raw (tokenised) text of WikiText-2 ``split``: ``valid`` feeds memories and statistics, ``test`` is kept
    for evaluation."""
    return find_data_file(f"wikitext2/{split}.txt", data_dir).read_text(encoding="utf-8")


def wikitext_pairs(split: str = "valid", data_dir: str | Path | None = None, words: int = 24) -> list[Pair]:
    """WikiText-2 ``split`` as memory pairs (see :func:`text_pairs`), without the chunks that hold WikiText's
    ``<unk>`` placeholder: it is no text a model sees, and some tokenizers (Gemma's) read it as their unknown token,
    which no target may contain."""
    pairs = text_pairs(wikitext_text(split, data_dir), words)
    return [(first, rest) for first, rest in pairs if "<unk>" not in f"{first} {rest}"]


def wikitext_texts(split: str = "valid", data_dir: str | Path | None = None, words: int = 96) -> list[str]:
    """WikiText-2 ``split`` as passages of ``words`` words (about 128 tokens): a corpus for key statistics."""
    return [" ".join(chunk) for chunk in text_chunks(wikitext_text(split, data_dir), words)]


def counterfact_memory_pairs(path: str | Path) -> list[Pair]:
    """True facts from a CounterFact file (prompt and paraphrase → ground truth): in-distribution memory for factual
    edits. Use ``counterfact-train.json``, never the file that is edited or scored."""
    rows = load_counterfact(path)
    pairs: list[Pair] = []
    for row in rows:
        pairs += [(row["text"], row["ground_truth"]), (row["rephrase"], row["ground_truth"])]
    return pairs


def sample_memory_pairs() -> list[Pair]:
    """The factual-prompt memory embedded in the package (offline default for zsRE and CounterFact)."""
    return [(r["text"], r["target"]) for r in json.loads(MEMORY_SAMPLE.read_text(encoding="utf-8"))]


def generation_memory(data_dir: str | Path | None = None) -> tuple[list[Pair], list[Pair]]:
    """(memory, validation) for factual generation edits: true facts first, then running text.

    With the shared data available: CounterFact-train facts and WikiText-2 valid text for memory, the last 400
    chunks of WikiText-2 valid (at most a fifth of them) for validation. WikiText-2 test is never used: it belongs
    to the evaluation suite (:mod:`.suite_data`). Otherwise the embedded sample, split in two.
    """
    try:
        facts = counterfact_memory_pairs(find_data_file("counterfact/counterfact-train.json", data_dir))
        text = wikitext_pairs("valid", data_dir)
    except FileNotFoundError:
        return embedded_memory()
    held_out = min(VALIDATION_CHUNKS, len(text) // 5)
    return interleave(facts, text[: len(text) - held_out]), text[len(text) - held_out :]


def embedded_memory() -> tuple[list[Pair], list[Pair]]:
    """(memory, validation) from the sample embedded in the package: its first fifth validates."""
    sample = sample_memory_pairs()
    cut = len(sample) // 5
    return sample[cut:], sample[:cut]


def interleave(first: Sequence[Any], second: Sequence[Any]) -> list[Any]:
    """Alternate two sources, so any prefix (a memory bank cut at a row count, the suite's first N) holds both."""
    out: list[Any] = []
    for i in range(max(len(first), len(second))):
        out += [*first[i : i + 1], *second[i : i + 1]]
    return out


# ---------------------------------------------------------------------------------------------- benchmarks
def zsre_benchmark(
    path: str | Path | None = None, data_dir: str | Path | None = None, target: str = "answers"
) -> Benchmark:
    """zsRE: edit ``src`` → ``answers[0]`` (``target="alt"``: EasyEdit's convention, see :func:`load_zsre`); GR on
    ``rephrase``; locality on the unrelated NQ question ``loc``.

    Without a path the embedded 40-record sample and the embedded memory are used, so the result does not depend on
    what else is installed. Every record is streamed; the runner edits only those the model gets wrong (for
    SmolLM2-135M, nearly all of them).
    """
    rows = load_zsre(path if path is not None else ZSRE_SAMPLE, target=target)
    memory = generation_memory(data_dir) if path is not None else embedded_memory()
    notes = {"locality": "agreement of the answer to the unrelated NQ question with the pre-edit answer"}
    return _generation_benchmark("zsre", rows, memory, notes, data_dir, embedded=path is None)


def counterfact_benchmark(path: str | Path | None = None, data_dir: str | Path | None = None) -> Benchmark:
    """CounterFact: efficacy (SR) on ``prompt`` → ``target_new``, paraphrase (GR), neighbourhood (locality)."""
    if path is None:
        path = find_data_file("counterfact/counterfact-edit-1k.json", data_dir)
    notes = {
        "SR": "efficacy: the new object is the greedy answer",
        "GR": "paraphrase: the new object is the greedy answer to the rephrased prompt",
        "locality": "neighbourhood: a prompt about another subject keeps its pre-edit answer",
    }
    return _generation_benchmark("counterfact", load_counterfact(path), generation_memory(data_dir), notes, data_dir)


def _generation_benchmark(
    name: str,
    rows: Any,
    memory: tuple[list[Pair], list[Pair]],
    notes: dict[str, str],
    data_dir: str | Path | None,
    embedded: bool = False,
) -> Benchmark:
    """Edits with one rephrase each (GR) and one unrelated prompt each (locality), from a loaded dataset; the memory
    questions leave out every subject of the data (:mod:`.questions`)."""
    locality = [(r["loc"], r["loc_ans"]) for r in rows]
    return Benchmark(
        name,
        to_edit_examples(rows, name),
        {"locality": locality},
        *memory,
        notes=notes,
        neighbour_pool=[(r["text"], r["subject"]) for r in rows],
        locality_is_neighbourhood=name == "counterfact",
        embedded=embedded,
        memory_subjects=memory_subjects(data_dir, [r["subject"] for r in rows], embedded),
        rewordings=RelationRewordings() if embedded else relation_rewordings(data_dir, [r["subject"] for r in rows]),
    )


def fever_benchmark(
    data_dir: str | Path | None = None, seed: int = 42, train_eval: int = 1000, test_eval: int = 1000
) -> Benchmark:
    """FEVER (binary) split as in the paper, from the two files we have (the split DATA.md suggests).

    ``paper_dev`` trains the classifier (``extra["finetune"]``); ``train_eval`` of its claims measure TrainR and the
    rest are the memory. ``paper_test`` is halved: the edit stream and the TestR set. Both files are shuffled with
    ``seed`` first. FEVER has no rephrases here, so GR is not available.
    """
    finetune = _shuffled(load_fever(find_data_file("fever/paper_dev.jsonl", data_dir)), seed)
    held_out = _shuffled(load_fever(find_data_file("fever/paper_test.jsonl", data_dir)), seed, exclude=finetune)
    half = len(held_out) // 2
    edit, test = held_out[:half], held_out[half:]
    memory = finetune[train_eval:]
    cut = len(memory) // 10
    return Benchmark(
        "fever",
        [EditExample(text, label) for text, label in edit],
        {"train": finetune[:train_eval], "test": test[:test_eval]},
        memory[cut:],
        memory[:cut],
        notes={"GR": "not available: FEVER has no rephrases in the data we have"},
        extra={"finetune": finetune},
    )


def _shuffled(rows: Any, seed: int, exclude: Sequence[Pair] = ()) -> list[Pair]:
    """Claims in a seeded order, each once (FEVER repeats a claim once per evidence set), none of ``exclude``'s."""
    seen = {text for text, _ in exclude}
    pairs = []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            pairs.append((row["text"], int(row["label"])))
    random.Random(seed).shuffle(pairs)
    return pairs


BENCHMARKS = {"zsre": zsre_benchmark, "counterfact": counterfact_benchmark, "fever": fever_benchmark}
