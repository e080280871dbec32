"""Figures of a patched model and of sequential-editing runs: the paper's Fig. 5 (which patch fires on which edit),
Fig. 7 (metrics vs number of edits) and a histogram of per-edit latency.

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas, never through ``pyplot``: nothing
global (current figure, backend) changes, so the functions are safe inside notebooks, servers and test runs. Each
writes one PNG, creating its parent folders, and returns the path written. Inputs are validated before anything is
written, so a bad call leaves no half-made file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from transformers.activations import ACT2FN

from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.modes import eval_mode
from transformer_patcher.core.tasks import Task

DPI = 100
CURVE_FIGSIZE = (7.0, 4.5)
LATENCY_FIGSIZE = (10.0, 4.0)
MAX_TICKS = 20  # beyond this many rows/columns, label only every k-th so labels stay readable
MAX_RATE = 2.0
DEFAULT_METRICS = ("SR", "GR", "ER", "TrainR", "TestR", "locality")
# Curves often coincide (SR = ER = 1.0): each later one is drawn on top, thinner, dashed differently and with a
# smaller marker of another shape, so every curve shows around the ones above it.
CURVE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
CURVE_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


# --------------------------------------------------------------------------------------------- activations
@torch.no_grad()
def patch_activations(
    model: nn.Module,
    task: Task,
    examples: Sequence[EditExample],
    adapter_name: str = "default",
    batch_size: int = 32,
) -> tuple[torch.Tensor, list[int]]:
    """``act(q·k + b)`` of every patch on every example's input: an (n_patches, n_examples) matrix and the edit ids.

    Each entry is the maximum over the example's read positions, since a patch "fires for" an input if it fires at
    any position the task judges. Rows follow ``layer.edit_ids`` (committed patches first, then in-progress ones).
    ``model`` is the PEFT model of ``get_patcher_model``; it runs in eval mode (its modes are restored afterwards).
    """
    tuner = getattr(model, "base_model", None)
    if not hasattr(tuner, "patch_layer"):
        raise ValueError("model must be a patched PEFT model, as returned by transformer_patcher.get_patcher_model")
    if not examples:
        raise ValueError("no examples: patch_activations needs at least one input")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layer = tuner.patch_layer(adapter_name)
    edit_ids = [int(i) for i in layer.edit_ids(adapter_name).tolist()]
    n_patches = len(edit_ids)
    if n_patches == 0:
        return torch.zeros(0, len(examples)), edit_ids
    activation = ACT2FN[layer.patch_config[adapter_name].patch_activation]
    columns: list[torch.Tensor] = []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = task.batch_for(model, [(e.text, e.target) for e in chunk])
            with layer.capture(adapter_name) as record:
                model(**batch.model_kwargs())
            parts = [p for p in (record.frozen_preactivations, record.preactivations) if p is not None]
            pre = torch.cat(parts, dim=-1) if parts else None
            if pre is None or pre.shape[-1] != n_patches:
                raise ValueError(
                    f"the forward pass did not run the {n_patches} patches of adapter {adapter_name!r}; "
                    "make it the active adapter and do not disable adapters"
                )
            acts = activation(task.at_reads(pre, batch)).float().cpu()  # (n_reads, n_patches)
            best = torch.full((len(chunk), n_patches), -math.inf)
            index = batch.example.cpu()[:, None].expand_as(acts)
            best.scatter_reduce_(0, index, acts, reduce="amax", include_self=True)
            columns.append(best)
    return torch.cat(columns).T.contiguous(), edit_ids


# -------------------------------------------------------------------------------------------------- figures
def _new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas: PNG output without pyplot or a global backend
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png", dpi=figure.dpi)  # no bbox_inches: the pixel size is figsize × dpi
    return target


def _thinned(n: int, max_ticks: int = MAX_TICKS) -> list[int]:
    """Tick positions 0, k, 2k, ... with at most ``max_ticks`` of them."""
    step = max(1, math.ceil(n / max_ticks))
    return list(range(0, n, step))


def _as_matrix(activations: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    if isinstance(activations, torch.Tensor):
        activations = activations.detach().float().cpu().numpy()
    try:
        matrix = np.asarray(activations, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"activations must be a numeric (n_patches, n_examples) matrix: {error}") from error
    if matrix.ndim != 2:
        raise ValueError(f"activations must be a 2-D (n_patches, n_examples) matrix, got shape {matrix.shape}")
    if matrix.size == 0:
        raise ValueError(f"activations is empty (shape {matrix.shape}): there are no patches or no examples to show")
    if not np.isfinite(matrix).all():
        raise ValueError("activations contain NaN or inf")
    return matrix


def activation_heatmap(
    activations: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    path: str | Path,
    edit_ids: Sequence[int] | None = None,
    example_labels: Sequence[str] | None = None,
    title: str = "Patch activations on edit inputs",
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = DPI,
) -> Path:
    """The paper's Fig. 5: rows are patches, columns edit inputs. A clean diagonal (each patch lit only on its own
    mistake) shows patches that fix their edit without firing elsewhere.

    ``figsize`` defaults to one that grows with the matrix, within 6×4 to 16×12 inches.
    """
    matrix = _as_matrix(activations)
    n_rows, n_cols = matrix.shape
    if edit_ids is not None and len(edit_ids) != n_rows:
        raise ValueError(f"{len(edit_ids)} edit ids for {n_rows} patch rows")
    if example_labels is not None and len(example_labels) != n_cols:
        raise ValueError(f"{len(example_labels)} example labels for {n_cols} example columns")
    if figsize is None:
        figsize = (min(16.0, max(6.0, 2.5 + 0.3 * n_cols)), min(12.0, max(4.0, 1.5 + 0.3 * n_rows)))
    figure = _new_figure(figsize, dpi)
    ax = figure.add_subplot()
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(image, ax=ax, label="act(q·k + b), max over read positions")
    rows, cols = _thinned(n_rows), _thinned(n_cols)
    ax.set_yticks(rows, [f"#{edit_ids[i]}" for i in rows] if edit_ids is not None else [str(i) for i in rows])
    column_labels = [str(example_labels[i]) for i in cols] if example_labels is not None else [str(i) for i in cols]
    ax.set_xticks(cols, column_labels, rotation=90 if example_labels is not None else 0)
    ax.set_xlabel("edit input")
    ax.set_ylabel("patch (edit id)" if edit_ids is not None else "patch")
    ax.set_title(title)
    figure.tight_layout()
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------- SME curves
class CurvePoints(NamedTuple):
    """One metric across folds: at each edit count present in every fold, the mean, minimum and maximum."""

    edits: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


def _fold_list(folds: Any) -> list[Any]:
    """Accept a run file's dict (``{"folds": [...]}``), fold dicts or ``FoldResult`` objects."""
    if isinstance(folds, Mapping):
        if "folds" not in folds:
            raise ValueError("expected a sequence of folds or a run dict with a 'folds' list")
        folds = folds["folds"]
    if isinstance(folds, (str, bytes)) or not isinstance(folds, Iterable):
        raise ValueError(f"folds must be a sequence of fold results, got {type(folds).__name__}")
    folds = list(folds)
    if not folds:
        raise ValueError("no folds given")
    return folds


def _field(fold: Any, name: str) -> list[dict[str, Any]]:
    value = fold.get(name) if isinstance(fold, Mapping) else getattr(fold, name, None)
    if value is None:
        raise ValueError(f"a fold has no {name!r} list; expected SME fold results")
    return list(value)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, non-numeric or NaN values (JSON writes NaN as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def curve_points(folds: Any, metric: str) -> CurvePoints:
    """``metric`` vs number of edits, averaged over folds; empty when no edit count has it in every fold.

    Only edit counts reported (with a finite value) by every fold are kept, so each mean is over the same folds. A
    fold reporting one count twice (the final evaluation after trailing correct examples) contributes its last value.
    """
    per_fold: list[dict[int, float]] = []
    for fold in _fold_list(folds):
        values: dict[int, float] = {}
        for evaluation in _field(fold, "evaluations"):
            value = _number(evaluation.get("metrics", {}).get(metric))
            if value is not None:
                values[int(evaluation["edits"])] = value
        per_fold.append(values)
    common = sorted(set.intersection(*(set(values) for values in per_fold)))
    columns = [[values[edits] for values in per_fold] for edits in common]
    return CurvePoints(
        common,
        [sum(c) / len(c) for c in columns],
        [min(c) for c in columns],
        [max(c) for c in columns],
    )


def metrics_curve(
    folds: Any,
    path: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    title: str | None = None,
    figsize: tuple[float, float] = CURVE_FIGSIZE,
    dpi: int = DPI,
) -> Path:
    """The paper's Fig. 7: each rate vs number of edits, the mean over folds with a min–max band when >1 fold.

    ``folds`` are SME fold dicts (or ``FoldResult``s, or a run dict holding ``"folds"``). Metrics no fold reports are
    skipped. Only rates are accepted (values in [0, 2]: retention ratios such as TrainR exceed 1 when editing fixes
    other examples too), not counts such as ``neurons``.
    """
    fold_list = _fold_list(folds)
    if not metrics:
        raise ValueError("no metrics requested")
    if not any(_field(fold, "evaluations") for fold in fold_list):
        raise ValueError("the folds hold no evaluations: there is nothing to plot")
    curves = {metric: curve_points(fold_list, metric) for metric in metrics}
    curves = {metric: curve for metric, curve in curves.items() if curve.edits}
    if not curves:
        raise ValueError(f"none of the metrics {list(metrics)} is reported at an edit count shared by every fold")
    for metric, curve in curves.items():
        if min(curve.low) < 0 or max(curve.high) > MAX_RATE:
            raise ValueError(f"metric {metric!r} has values outside [0, {MAX_RATE}]; metrics_curve plots rates only")
    figure = _new_figure(figsize, dpi)
    ax = figure.add_subplot()
    for i, (metric, curve) in enumerate(curves.items()):
        (line,) = ax.plot(
            curve.edits,
            curve.mean,
            label=metric,
            marker=CURVE_MARKERS[i % len(CURVE_MARKERS)] if len(curve.edits) <= 30 else None,
            markersize=max(3.0, 9.0 - 1.2 * i),
            linestyle=CURVE_LINESTYLES[i % len(CURVE_LINESTYLES)],
            linewidth=max(1.0, 3.0 - 0.4 * i),
            zorder=2 + i,
        )
        if len(fold_list) > 1:
            ax.fill_between(curve.edits, curve.low, curve.high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_ylim(0, max(1.0, *(max(curve.high) for curve in curves.values())) + 0.05)  # room for markers at 1.0
    ax.set_xlabel("number of edits")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("rate")
    band = f"mean of {len(fold_list)} folds, band = min–max" if len(fold_list) > 1 else "1 fold"
    ax.set_title(title or f"Metrics during sequential editing ({band})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    figure.tight_layout()
    return _save(figure, path)


def _needed_records(folds: Any) -> list[dict[str, Any]]:
    return [r for fold in _fold_list(folds) for r in _field(fold, "records") if r.get("needed")]


def latency_histogram(
    folds: Any,
    path: str | Path,
    *,
    bins: int | str = "auto",
    figsize: tuple[float, float] = LATENCY_FIGSIZE,
    dpi: int = DPI,
) -> Path:
    """Histogram of the wall-clock seconds of every edit that was needed, median marked; a second panel shows the
    optimisation steps, since a slow edit is either many steps or slow steps."""
    needed = _needed_records(folds)
    if not needed:
        raise ValueError("no record has needed=true: no edit ran, so there is no latency to plot")
    seconds = [_number(r.get("seconds")) for r in needed]
    if any(s is None or s < 0 for s in seconds):
        raise ValueError("every needed record must have a finite, non-negative 'seconds' value")
    steps = [_number(r.get("steps")) for r in needed]
    panels: list[tuple[str, str, list[float]]] = [("seconds", "s", [float(s) for s in seconds if s is not None])]
    if all(s is not None for s in steps):
        panels.append(("optimisation steps", "steps", [float(s) for s in steps if s is not None]))
    figure = _new_figure(figsize, dpi)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, unit, values) in zip(axes, panels, strict=True):
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8, edgecolor="white", linewidth=1.0)  # bins stay apart
        median = float(np.median(values))
        ax.axvline(median, color="tab:red", linestyle="--", label=f"median {median:.3g} {unit}")
        ax.set_xlabel(label)
        ax.set_ylabel("edits")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best")
    failed = sum(1 for r in needed if r.get("success") is False)
    axes[0].set_title(f"Per-edit latency ({len(needed)} edits, {failed} failed)")
    figure.tight_layout()
    return _save(figure, path)
