"""Sequential batches: a batch experiment's batches written one after another into the same model, never reset.

Independent batches show what one batch costs; a stream of batches shows what builds up — earlier facts overwritten,
neighbours drifting, the model's general ability wearing down (the collapse AlphaEdit's null-space projection is
meant to prevent). After batch ``k`` the model is scored on every case edited so far and a record is written
(``parts/<editor>-b<size>-seq<k>.json``): the fact metrics over all of them, the efficacy of each earlier batch on
its own (so batch 1's decay reads across the records), and general ability from the evaluation suite's free
generation and WikiText-2 perplexity against the unedited model.

Targets are computed per batch against the model as it is then; only batch 1, which finds the model unedited, may
take the original-model targets an independent run saved (``batch_experiment``). After each batch the editor's state
(the DELTA factors and the null space's earlier keys, or T-Patcher's patches) is checkpointed with the batch's record
(``checkpoints/<editor>-b<size>``), so an interrupted run reloads it and continues with the next batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from transformer_patcher.core.atomic import write_text_atomic
from transformer_patcher.core.editor import Editor
from transformer_patcher.core.scoring import Outcome
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.experiments.evaluation import EvaluationSuite, flatten
from transformer_patcher.experiments.registry import DISPLAY_NAMES
from transformer_patcher.experiments.sme.fact_scores import FactCase, fact_metrics, score_cases
from transformer_patcher.experiments.sme.run_state import load_checkpoint, save_checkpoint

EFFICACY = ("efficacy_acc", "efficacy_score")


@dataclass
class SequentialJob:
    """One editor's sequential batches. ``edit`` writes the cases at the given indices into the model as it is and
    returns its seconds; ``settings`` (the null-space setting) are copied into every record."""

    name: str
    editor: Editor
    edit: Callable[[list[int]], float]
    task: CausalLMTask
    cases: Sequence[FactCase]
    before: Sequence[dict[str, Outcome]]
    out: Path
    suite: EvaluationSuite | None
    settings: dict[str, Any]
    progress: bool


def batch_slices(cases: int, size: int) -> list[range]:
    """The case indices of each batch, in editing order."""
    return [range(start, min(start + size, cases)) for start in range(0, cases, size)]


def part_file(out: Path, name: str, size: int, index: int) -> Path:
    """The record written after batch ``index`` (1-based)."""
    return out / "parts" / f"{name}-b{size}-seq{index}.json"


def run_sequential(job: SequentialJob, size: int) -> None:
    """Edit the cases in batches of ``size`` one after another, from the last checkpoint when there is one."""
    batches = batch_slices(len(job.cases), size)
    checkpoint = f"{job.name}-b{size}"
    job.editor.reset()
    done = _resume(job, size, checkpoint)
    bar = tqdm(total=len(batches), initial=done, desc=f"{job.name} b={size} sequential", disable=not job.progress)
    for index in range(done, len(batches)):
        seconds = job.edit(list(batches[index]))
        record = _record(job, size, batches[: index + 1], seconds)
        state = {"position": index + 1, "record": record}
        save_checkpoint(job.out / "checkpoints", checkpoint, job.editor.state_tensors(), state)
        write_text_atomic(part_file(job.out, job.name, size, index + 1), json.dumps(record, indent=1))
        bar.update(1)
    bar.close()
    job.editor.reset()


def _resume(job: SequentialJob, size: int, checkpoint: str) -> int:
    """Load the editor's state after the last finished batch; return how many batches are done. The checkpoint is
    saved before the batch's record, so a record lost to a crash between the two is written from it."""
    saved = load_checkpoint(job.out / "checkpoints", checkpoint)
    if saved is None:
        return 0
    tensors, state = saved
    job.editor.load_state_tensors(tensors)
    done = state["position"]
    last = part_file(job.out, job.name, size, done)
    if not last.is_file():
        write_text_atomic(last, json.dumps(state["record"], indent=1))
    return done


def _record(job: SequentialJob, size: int, batches: Sequence[range], seconds: float) -> dict[str, Any]:
    """Scores after the last of ``batches``, over every case edited so far."""
    started = time.perf_counter()
    edited = [i for batch in batches for i in batch]
    label = f"scoring the {len(edited)} facts edited so far" if job.progress else None
    after = score_cases(job.editor.model, job.task, [job.cases[i] for i in edited], progress=label)
    before = [job.before[i] for i in edited]
    general = flatten(job.suite.evaluate()) if job.suite is not None else {}
    return {
        "editor": DISPLAY_NAMES[job.name],
        "batch_size": size,
        "mode": "sequential",
        "batch_index": len(batches),
        "edited": len(edited),
        **fact_metrics(after, before),
        "earlier_batches": _per_batch(after, before, batches),
        **general,
        "seconds": seconds,
        "seconds_per_fact": seconds / len(batches[-1]),
        "evaluation_seconds": time.perf_counter() - started,  # scoring and the suite, not counted in ``seconds``
        **job.settings,
    }


def _per_batch(
    after: Sequence[dict[str, Outcome]], before: Sequence[dict[str, Outcome]], batches: Sequence[range]
) -> list[dict[str, Any]]:
    """The efficacy of each batch's cases on their own (``after`` / ``before`` hold the batches in order)."""
    rows, position = [], 0
    for number, batch in enumerate(batches, 1):
        span = slice(position, position + len(batch))
        metrics = fact_metrics(after[span], before[span])
        rows.append({"batch_index": number, **{k: metrics[k] for k in EFFICACY if k in metrics}})
        position += len(batch)
    return rows


def decay_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per batch index, the efficacy acc of each earlier batch after it (how batch 1 decays)."""
    width = max(row["batch_index"] for row in rows)
    columns = [f"batch {j}" for j in range(1, width + 1)]
    header = "| after batch | " + " | ".join(columns) + " |\n|---:|" + "---:|" * width + "\n"
    lines = []
    for row in rows:
        cells = [f"{b['efficacy_acc']:.3f}" for b in row["earlier_batches"]] + [""] * (width - row["batch_index"])
        lines.append(f"| {row['batch_index']} | " + " | ".join(cells) + " |\n")
    return header + "".join(lines)
