"""Figures: patch activations on a tiny patched model with a known firing pattern, the curve data, the PNG files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from transformers.activations import ACT2FN

from tiny_models import build
from tiny_tokenizer import EDIT_WORDS, random_pairs, sharp_gpt2, tiny_tokenizer
from transformer_patcher import PatcherLayer, get_patcher_model, init_key
from transformer_patcher.experiments import plots
from transformer_patcher.experiments.plots import (
    CURVE_FIGSIZE,
    DPI,
    LATENCY_FIGSIZE,
    CurvePoints,
    _thinned,
    activation_heatmap,
    curve_points,
    latency_histogram,
    metrics_curve,
    patch_activations,
)
from transformer_patcher.experiments.sme.runner import FoldResult
from transformer_patcher.methods.patcher import EditExample, Task, task_for_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PRE, BIAS = 6.0, -3.0  # pre-activation of a patch on its own read, and everywhere else (its bias)


def patched(base: torch.nn.Module) -> tuple[torch.nn.Module, Task, PatcherLayer]:
    model = get_patcher_model(base).eval()
    return model, task_for_model(model, tiny_tokenizer()), model.base_model.patch_layer()


def drawn_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the plot functions save from now on, to inspect their artists."""
    figures: list[Figure] = []
    save = plots._save

    def keep(figure: Figure, path: str | Path) -> Path:
        figures.append(figure)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG file, after checking its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def add_diagonal_patches(
    model: torch.nn.Module, task: Task, layer: PatcherLayer, examples: list[EditExample], edit_ids: list[int]
) -> None:
    """Patch i reads ``PRE + BIAS`` at the LAST read of example i and exactly ``BIAS`` at every other read (of any
    example): its key is orthogonal to all other reads' queries. The first patch is committed, the second left in
    progress, so both halves of the capture are exercised. Values are zero: the outputs do not change."""
    batch = task.batch_for(model, [(e.text, e.target) for e in examples])
    with torch.no_grad(), layer.capture() as record:
        model(**batch.model_kwargs())
    reads = task.at_reads(record.query, batch).float()
    for i, edit_id in enumerate(edit_ids):
        own = int(torch.nonzero(batch.example == i).max())
        others = torch.cat([reads[:own], reads[own + 1 :]])
        key = init_key(reads[own], preactivation=PRE, silent=others)
        layer.add_patches(key, BIAS, torch.zeros(layer.output_dim), edit_id=edit_id)
        if i == 0:
            layer.commit()


def expected_matrix(layer: PatcherLayer, n_patches: int, n_examples: int) -> torch.Tensor:
    act = ACT2FN[layer.patch_config["default"].patch_activation]
    off, on = act(torch.tensor([BIAS, PRE + BIAS])).tolist()
    expected = torch.full((n_patches, n_examples), off)
    expected[range(n_patches), range(n_patches)] = on
    return expected


# --------------------------------------------------------------------------------------------- activations
def test_patch_activations_recover_the_diagonal_firing_pattern_of_generation_patches() -> None:
    """Two patches, three examples with two reads each: the max over reads picks each patch's own last read."""
    model, task, layer = patched(sharp_gpt2())
    examples = [EditExample(t, a) for t, a in random_pairs(3, seed=4, words=EDIT_WORDS, length=4, target_length=2)]
    add_diagonal_patches(model, task, layer, examples, [11, 22])
    assert layer.num_trainable_patches() == 1  # one committed, one in progress

    model.train()
    matrix, ids = patch_activations(model, task, examples)
    assert all(module.training for module in model.modules())  # modes restored after the eval-mode pass

    assert ids == [11, 22]
    assert matrix.shape == (2, 3)
    expected = expected_matrix(layer, 2, 3)
    torch.testing.assert_close(matrix, expected, atol=1e-3, rtol=1e-3)
    assert matrix[:, :2].argmax(dim=0).tolist() == [0, 1]
    assert expected[0, 1].abs() < 0.01  # off the diagonal the patches are silent
    chunked, _ = patch_activations(model, task, examples, batch_size=1)
    torch.testing.assert_close(chunked, matrix, atol=1e-5, rtol=1e-5)


def test_patch_activations_on_a_classifier_read_one_position_per_example() -> None:
    model, task, layer = patched(build("bert"))
    examples = [EditExample(t, 1) for t, _ in random_pairs(2, seed=5, words=EDIT_WORDS, length=5)]
    add_diagonal_patches(model, task, layer, examples, [3, 4])
    matrix, ids = patch_activations(model, task, examples)
    assert ids == [3, 4]
    torch.testing.assert_close(matrix, expected_matrix(layer, 2, 2), atol=1e-3, rtol=1e-3)


def test_patch_activations_refuse_bad_input() -> None:
    base = sharp_gpt2()
    model, task, layer = patched(base)
    examples = [EditExample(t, a) for t, a in random_pairs(2, seed=4, words=EDIT_WORDS, length=4)]
    matrix, ids = patch_activations(model, task, examples)
    assert matrix.shape == (0, 2) and ids == []  # no patches yet
    with pytest.raises(ValueError, match="no examples"):
        patch_activations(model, task, [])
    with pytest.raises(ValueError, match="get_patcher_model"):
        patch_activations(base.base_model, task, examples)
    add_diagonal_patches(model, task, layer, examples, [1, 2])
    with model.disable_adapter(), pytest.raises(ValueError, match="did not run the 2 patches"):
        patch_activations(model, task, examples)


# ------------------------------------------------------------------------------------------------- heatmap
def test_activation_heatmap_writes_a_png_of_figsize_times_dpi(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "heatmap.png"
    written = activation_heatmap(torch.eye(3), path, edit_ids=[5, 6, 7], figsize=(5, 3), dpi=50)
    assert written == path
    assert png_size(path) == (250, 150)
    many = activation_heatmap(torch.rand(120, 300), tmp_path / "many.png", example_labels=[f"x{i}" for i in range(300)])
    assert png_size(many) == (1600, 1200)  # the default size grows with the matrix, capped at 16×12 in


@pytest.mark.parametrize(
    ("activations", "kwargs", "match"),
    [
        (torch.ones(3), {}, "2-D"),
        (torch.zeros(0, 4), {}, "empty"),
        (torch.tensor([[1.0, float("nan")]]), {}, "NaN"),
        (torch.ones(2, 3), {"edit_ids": [1]}, "1 edit ids for 2"),
        (torch.ones(2, 3), {"example_labels": ["a", "b"]}, "2 example labels for 3"),
    ],
)
def test_activation_heatmap_refuses_bad_input_without_writing(
    tmp_path: Path, activations: torch.Tensor, kwargs: dict, match: str
) -> None:
    path = tmp_path / "out" / "bad.png"
    with pytest.raises(ValueError, match=match):
        activation_heatmap(activations, path, **kwargs)
    assert not path.exists()


def test_ticks_are_thinned_to_at_most_twenty() -> None:
    assert _thinned(5) == [0, 1, 2, 3, 4]
    assert _thinned(100) == list(range(0, 100, 5))
    assert len(_thinned(301)) <= 20


# ---------------------------------------------------------------------------------------------- SME curves
def evaluation(edits: int, **metrics: float | None) -> dict:
    return {"edits": edits, "examples": edits + 1, "metrics": metrics}


FOLD_A = {
    "fold": 0,
    "records": [],
    "evaluations": [
        evaluation(1, SR=1.0, GR=0.5),
        evaluation(2, SR=0.5, ER=None),
        evaluation(3, SR=1.0),
        evaluation(3, SR=0.0),  # the final evaluation repeats the count: the last value counts
    ],
}
FOLD_B = {"fold": 1, "records": [], "evaluations": [evaluation(2, SR=1.0, ER=1.0), evaluation(3, SR=0.5, GR=0.0)]}


def test_curve_points_average_the_edit_counts_every_fold_reports() -> None:
    assert curve_points([FOLD_A, FOLD_B], "SR") == CurvePoints([2, 3], [0.75, 0.25], [0.5, 0.0], [1.0, 0.5])
    assert curve_points([FOLD_A, FOLD_B], "GR") == CurvePoints([], [], [], [])  # edits 1 vs 3: nothing shared
    assert curve_points([FOLD_A, FOLD_B], "ER") == CurvePoints([], [], [], [])  # None (NaN in JSON) is no value
    assert curve_points([FOLD_A], "SR") == CurvePoints([1, 2, 3], [1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [1.0, 0.5, 0.0])
    as_objects = [FoldResult(f["fold"], f["records"], f["evaluations"]) for f in (FOLD_A, FOLD_B)]
    assert curve_points(as_objects, "SR") == curve_points({"folds": [FOLD_A, FOLD_B]}, "SR")
    assert curve_points(as_objects, "SR").mean == [0.75, 0.25]


def test_metrics_curve_writes_a_png(tmp_path: Path) -> None:
    path = metrics_curve({"folds": [FOLD_A, FOLD_B]}, tmp_path / "curves" / "sme.png")
    assert png_size(path) == (round(CURVE_FIGSIZE[0] * DPI), round(CURVE_FIGSIZE[1] * DPI))
    single = metrics_curve([FOLD_A], tmp_path / "one.png", metrics=("SR", "GR"), figsize=(4, 3), dpi=40)
    assert png_size(single) == (160, 120)


def test_coinciding_curves_all_stay_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SR = ER = 1.0 at every point: ER is drawn above SR but thinner, in another dash pattern and with a smaller
    marker of another shape, so SR still shows around it."""
    figures = drawn_figures(monkeypatch)
    perfect = {"records": [], "evaluations": [evaluation(n, SR=1.0, GR=0.5, ER=1.0) for n in (1, 2, 3)]}
    metrics_curve([perfect], tmp_path / "metrics.png")
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    assert list(lines) == ["SR", "GR", "ER"]
    sr, er = lines["SR"], lines["ER"]
    assert er.get_zorder() > sr.get_zorder()
    assert er.get_linewidth() < sr.get_linewidth() and er.get_markersize() < sr.get_markersize()
    assert len({line.get_linestyle() for line in lines.values()}) == 3
    assert len({line.get_marker() for line in lines.values()}) == 3


@pytest.mark.parametrize(
    ("folds", "metrics", "match"),
    [
        ([], ("SR",), "no folds"),
        ([{"fold": 0, "records": [], "evaluations": []}], ("SR",), "no evaluations"),
        ([{"fold": 0, "records": []}], ("SR",), "no 'evaluations'"),
        ([FOLD_A, FOLD_B], ("TestR", "GR"), "none of the metrics"),
        ([FOLD_A, FOLD_B], (), "no metrics"),
        ([{"evaluations": [evaluation(1, neurons=3)]}], ("neurons",), "outside \\[0, 2.0\\]"),
    ],
)
def test_metrics_curve_refuses_bad_input_without_writing(
    tmp_path: Path, folds: list, metrics: tuple[str, ...], match: str
) -> None:
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=match):
        metrics_curve(folds, path, metrics=metrics)
    assert not path.exists()


# ------------------------------------------------------------------------------------------------- latency
def record(needed: bool, seconds: float | None = 0.0, steps: int = 0, success: bool = True) -> dict:
    return {"edit_id": 0, "needed": needed, "success": success, "steps": steps, "seconds": seconds, "neurons": 0}


def test_latency_histogram_writes_a_png(tmp_path: Path) -> None:
    folds = [
        {"records": [record(True, 8.1, 120), record(False), record(True, 2.5, 40, success=False)], "evaluations": []},
        {"records": [record(True, 4.0, 80)], "evaluations": []},
    ]
    path = latency_histogram(folds, tmp_path / "lat" / "latency.png")
    assert png_size(path) == (round(LATENCY_FIGSIZE[0] * DPI), round(LATENCY_FIGSIZE[1] * DPI))


def test_latency_bars_have_edges_so_adjacent_bins_stay_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = drawn_figures(monkeypatch)
    folds = [{"records": [record(True, s, int(10 * s)) for s in (1.0, 2.0, 2.0, 3.0)], "evaluations": []}]
    latency_histogram(folds, tmp_path / "latency.png", bins=3)
    bars = [bar for ax in figures[0].axes for bar in ax.patches]
    assert len(bars) == 6  # 3 bins in each panel (seconds, steps), side by side
    for bar in bars:
        assert bar.get_linewidth() > 0 and bar.get_edgecolor()[3] > 0
        assert bar.get_edgecolor()[:3] != bar.get_facecolor()[:3]


@pytest.mark.parametrize(
    ("records", "match"),
    [([], "no record has needed=true"), ([record(False)], "needed=true"), ([record(True, None)], "'seconds'")],
)
def test_latency_histogram_refuses_bad_input_without_writing(tmp_path: Path, records: list, match: str) -> None:
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=match):
        latency_histogram([{"records": records, "evaluations": []}], path)
    assert not path.exists()
