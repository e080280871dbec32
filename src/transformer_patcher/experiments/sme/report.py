"""Results of SME runs as numbers a reader compares: means over folds, and a markdown table across editors."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

METRIC_COLUMNS = ("SR", "GR", "ER", "TrainR", "TestR", "locality", "locality_acc")
EXTRA_COLUMNS = ("edits", "folds", "seconds_per_edit")
# Batch (mass) editing: ROME-style probability scores, then accuracies, whole-answer and per token (sme.fact_scores),
# then sequential batches' general ability (free generation unchanged, token share; relative perplexity change).
FACT_COLUMNS = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "efficacy_acc",
    "paraphrase_acc",
    "neighborhood_acc",
    "efficacy_token_acc",
    "paraphrase_token_acc",
    "neighborhood_token_acc",
    "generation-raw.token",
    "generation-chat.token",
    "perplexity.change",
)
FACT_EXTRAS = (
    "mode",
    "batch_size",
    "batch_index",
    "edited",
    "cases",
    "seconds_per_batch",
    "seconds_per_edit",
    "seconds_per_fact",
)


def summarize_folds(folds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean final metrics over folds (as the paper reports), plus edit counts and the median seconds per edit.

    SR and GR pool every edit of every fold (each fold's SR is a mean over its edits); the rest average the folds'
    final evaluations, skipping folds where a metric is undefined.
    """
    if not folds:
        raise ValueError("no folds to summarise")
    needed = [r for fold in folds for r in fold["records"] if r["needed"]]
    summary: dict[str, Any] = {
        "folds": len(folds),
        "examples": sum(len(fold["records"]) for fold in folds),
        "edits": len(needed),
        "neurons": sum(r["neurons"] for fold in folds for r in fold["records"]),
    }
    if needed:
        summary["SR"] = statistics.fmean(r["edit_correct"] for r in needed)
        rephrases = [flag for r in needed for flag in r["rephrase_correct"]]
        if rephrases:
            summary["GR"] = statistics.fmean(rephrases)
        summary["seconds_per_edit"] = statistics.median(r["seconds"] for r in needed)
        summary["steps_per_edit"] = statistics.median(r["steps"] for r in needed)
    finals = [fold["evaluations"][-1]["metrics"] for fold in folds if fold["evaluations"]]
    suite_keys = dict.fromkeys(key for final in finals for key in final if "." in key)  # "unrelated-raw.exact"...
    for key in ("ER", "TrainR", "TestR", "locality", "locality_acc", *suite_keys):
        values = [m[key] for m in finals if _finite(m.get(key))]
        if values:
            summary[key] = statistics.fmean(values)
    return summary


def markdown_table(
    rows: Sequence[dict[str, Any]],
    label: str = "editor",
    metric_columns: Sequence[str] = METRIC_COLUMNS,
    extra_columns: Sequence[str] = EXTRA_COLUMNS,
) -> str:
    """One row per run: ``rows`` are ``{label: name, **summary}``; columns appear when any row has them."""
    if not rows:
        raise ValueError("no rows for the table")
    metrics = [m for m in metric_columns if any(m in row for row in rows)]
    extras = [c for c in extra_columns if any(c in row for row in rows)]
    header = [label, *metrics, *extras]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [str(row.get(label, ""))]
        cells += [_cell(row.get(m), 3) for m in metrics]
        cells += [_cell(row.get(c), 2) for c in extras]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SUITE_MEASURES = ("exact", "token", "n", "before", "perplexity", "change")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def suite_table(summary: dict[str, Any]) -> str:
    """The evaluation suite's parts from a summary's ``part.measure`` keys: one row per part, perplexity as
    "before → after (change)" (empty: no suite)."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in summary.items():
        part, dot, measure = key.rpartition(".")
        if dot and measure in SUITE_MEASURES:
            parts.setdefault(part, {})[measure] = value
    rows = []
    for name, values in parts.items():
        row: dict[str, Any] = {"part": name, "n": round(values.get("n", 0))}
        if "perplexity" in values:
            row["perplexity"] = f"{values['before']:.3f} → {values['perplexity']:.3f} ({100 * values['change']:+.2f} %)"
        else:
            row |= {"exact": values.get("exact"), "token": values.get("token")}
        rows.append(row)
    if not rows:
        return ""
    return markdown_table(rows, label="part", metric_columns=("exact", "token"), extra_columns=("n", "perplexity"))


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
