"""``eval --patches DIR`` without data: does a patch set fix what it was made for, and what else does it change?

The patch set's edit log names every fix (its input, target, the prompt format it was made in, and when known its
subject and rephrases). Each is scored as a user sees it — greedy generation writes the target and stops — next to
the evaluation suite (unrelated questions raw and chat, near neighbours of each fix, free generation, perplexity),
for the base model (patches switched off) and the patched one side by side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformer_patcher.core.atomic import recover_folder
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.core.pretrained import load_model, model_kind
from transformer_patcher.core.prompts import PromptFormat
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import CausalLMTask, position_limit, task_for_model
from transformer_patcher.data.neighbours import neighbours_of, subject_of
from transformer_patcher.data.suite_data import subject_questions, suite_sources
from transformer_patcher.experiments.evaluation import (
    EvaluationSuite,
    SuiteConfig,
    greedy_continuations,
    label_part,
    locality_parts,
    neighbours_from_file,
)
from transformer_patcher.methods.patcher.replay import ForwardReplay
from transformer_patcher.tuners.patcher.model import PatcherModel
from transformer_patcher.tuners.patcher.patch_set import EDIT_LOG, read_edit_log


@dataclass
class PatchSetReport:
    """Measures per part for the base and the patched model, and each fix's greedy answer before and after."""

    base: dict[str, dict[str, float]]
    patched: dict[str, dict[str, float]]
    edits: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leaks: list[dict[str, Any]] = field(default_factory=list)  # neighbours whose greedy answer changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "patched": self.patched,
            "edits": self.edits,
            "leaks": self.leaks,
            "notes": self.notes,
        }


def evaluate_patch_set(
    model: str,
    patches: str | os.PathLike[str],
    suite: SuiteConfig | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> PatchSetReport:
    """Score the fixes in ``patches``' edit log and run ``suite`` (None: the fixes only) on ``model`` with and
    without the patches. A patch set without an edit log is refused: nothing says what it was meant to fix."""
    folder = Path(patches)
    recover_folder(folder)  # a crash between the fallback swap's renames must not hide the patch set
    log = read_edit_log(folder)
    if not log:
        raise AdapterFileError(
            f"{folder} has no edit log ({EDIT_LOG}), so there are no fixes to score; pass --data to score a data set "
            "with and without these patches instead"
        )
    base, tokenizer = load_model(model, model_kind(model))
    patched = PatcherModel.from_pretrained(base, folder)
    task = task_for_model(patched, tokenizer)
    if not isinstance(task, CausalLMTask):
        return _classifier_report(patched, task, log)
    tasks = [task.formatted(PromptFormat.coerce(entry.get("prompt_format"))) for entry in log]
    rows = [(t, entry["text"], str(entry["target"])) for t, entry in zip(tasks, log, strict=True)]
    parts = [label_part("edits", rows), label_part("easyedit-rewrite", rows, end_token=False)]
    rephrased = [
        (t, text, str(e["target"])) for t, e in zip(tasks, log, strict=True) for text in e.get("rephrases", [])
    ]
    if rephrased:
        parts.append(label_part("rephrases", rephrased))
    notes: list[str] = []
    neighbours: list[list[str]] = []
    about: list[list[str]] = []
    if suite is not None:
        texts = [entry["text"] for entry in log]
        named = [subject_of(entry["text"], entry.get("subject")) for entry in log]
        if suite.neighbour_file is not None:
            neighbours = neighbours_from_file(suite.neighbour_file, texts)
        else:
            neighbours = [neighbours_of(t, s, suite.neighbours) for t, s in zip(texts, named, strict=True)]
            if None in named:
                unnamed = named.count(None)
                notes.append(f"{unnamed} fix(es) name no subject and none could be guessed: they have no neighbours")
        about = subject_questions(named, suite.subjects, [{e["text"], *e.get("rephrases", [])} for e in log])
        sources = suite_sources(data_dir, exclude=texts, questions_file=suite.locality_file)
        parts += locality_parts(task, sources, suite, neighbours, position_limit(patched.config), about)
        notes.append(f"unrelated questions and perplexity text: {sources.origin} data")
    layer = patched.base_model.patch_layer()
    batch_size = suite.batch_size if suite is not None else 32
    with patched.disable_adapter():
        scored = EvaluationSuite(patched, parts, task.pad_id, batch_size, ForwardReplay(patched, layer), progress)
        before = _answers(patched, tasks, log, batch_size)
    after = _answers(patched, tasks, log, batch_size)
    patched_scores = scored.evaluate()
    fixed = [row == 1.0 for row in scored.row_agreement("edits")]
    edits = [
        {"edit_id": e["edit_id"], "text": e["text"], "target": e["target"], "format": t.prompt_format.name}
        | {"base": b, "patched": a, "fixed": f}
        for e, t, b, a, f in zip(log, tasks, before, after, fixed, strict=True)
    ]
    asked = {} if suite is None else {"neighbours": (neighbours, suite.neighbours), "subject": (about, suite.subjects)}
    leaks = _leaks(patched, scored, asked, task)
    return PatchSetReport(scored.reference_scores(), patched_scores, edits, notes, leaks)


def _leaks(
    model: Any, suite: EvaluationSuite, asked: dict[str, tuple[list[list[str]], int]], task: CausalLMTask
) -> list[dict[str, Any]]:
    """The near neighbours and subject questions whose greedy answer the patches changed: the question, the answer
    before and after. ``asked``: per part kind, the questions per edit and how many of each the parts ask."""
    leaks = []
    for part in suite.parts:
        kind = part.name.rsplit("-", 1)[0]
        if kind not in asked:
            continue
        per_edit, count = asked[kind]
        questions = [text for texts in per_edit for text in texts[:count]]  # the rows of each such part
        rows = [row for row, agreement in enumerate(suite.row_agreement(part.name)) if agreement < 1.0]
        if not rows:
            continue
        prompts = [part.prompts[row] for row in rows]
        after = greedy_continuations(model, prompts, part.stop_ids, part.max_new_tokens, suite.pad_id)
        before = [suite.continuations(part.name)[row] for row in rows]
        leaks += [
            {"part": part.name, "question": questions[row], "base": task.decode(b), "patched": task.decode(a)}
            for row, b, a in zip(rows, before, after, strict=True)
        ]
    return leaks


def _answers(model: Any, tasks: list[CausalLMTask], log: list[dict[str, Any]], batch_size: int) -> list[str]:
    """Each fix's greedy answer (what a user reads), in its own prompt format, up to its stop token; one batched
    ``generate`` per format, as long as the longest target plus 8 tokens."""
    answers = [""] * len(log)
    by_format: dict[Any, list[int]] = {}
    for index, task in enumerate(tasks):
        by_format.setdefault(task.prompt_format, []).append(index)
    for indices in by_format.values():
        task = tasks[indices[0]]
        prompts = [task.prompt_tokens(log[i]["text"]) for i in indices]
        longest = max(len(task.answer_tokens(str(log[i]["target"]))) for i in indices)
        outputs = greedy_continuations(model, prompts, task.prompter.stop_ids, longest + 8, task.pad_id, batch_size)
        for i, tokens in zip(indices, outputs, strict=True):
            answers[i] = task.decode(tokens)
    return answers


def _classifier_report(model: Any, task: Any, log: list[dict[str, Any]]) -> PatchSetReport:
    """A classifier's fixes: accuracy on its log with and without the patches (no generation, no suite)."""
    pairs = [(entry["text"], int(entry["target"])) for entry in log]
    with model.disable_adapter():
        before = score_pairs(model, task, pairs)
    after = score_pairs(model, task, pairs)

    def accuracy(outcomes: list[Any]) -> dict[str, dict[str, float]]:
        return {"edits": {"exact": sum(o.correct for o in outcomes) / len(outcomes), "n": len(outcomes)}}

    edits = [
        {"edit_id": e["edit_id"], "text": e["text"], "target": e["target"], "format": "raw"}
        | {"base": b.prediction, "patched": a.prediction, "fixed": a.correct}
        for e, b, a in zip(log, before, after, strict=True)
    ]
    note = "a classifier's patch set: the locality suite (generation, perplexity) applies to generative models only"
    return PatchSetReport(accuracy(before), accuracy(after), edits, [note])
