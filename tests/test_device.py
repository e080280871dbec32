"""Where the model runs: ``load_model(device=...)``, ``batch run --device``, and batch runs on CUDA (skipped without a
GPU; the same runs on the CPU check the tests themselves)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from transformer_patcher.cli import main
from transformer_patcher.core.pretrained import check_device, load_model, resolve_device
from transformer_patcher.experiments.sme.batch_experiment import BatchExperimentConfig, run_batch_experiment
from transformer_patcher.experiments.sme.run_state import load_checkpoint
from transformer_patcher.methods.pmet import NullSpace, PMETEditor
from workspace import add_counterfact_edits, build_workspace

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
TINY_PMET = {"layers": [0], "mom2_update_weight": 1, "v_num_grad_steps": 40, "v_lr": 5, "clamp_norm_factor": 4}
TINY_SUITE = {"generation": 4, "perplexity_tokens": 256, "window": 64}
TIMINGS = ("seconds", "seconds_per_fact", "evaluation_seconds", "seconds_per_batch", "seconds_per_edit")
CUDA_ROUNDING = {"rtol": 1e-3, "atol": 1e-3}  # CUDA's kernels do not repeat a run bit for bit (atomic adds)
BAD_DEVICES = ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "mps", "", " cpu", "cuda:0:1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT-2 workspace with a CounterFact-format edit file (tests/workspace.py)."""
    return add_counterfact_edits(build_workspace(tmp_path_factory.mktemp("device")))


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMER_PATCHER_CACHE", str(tmp_path / "cache"))


def _config(ws: dict[str, Path], **overrides: Any) -> BatchExperimentConfig:
    """Four cases in batches of two, PMET and its MEMIT ablation."""
    settings: dict[str, Any] = {
        "model": str(ws["model"]),
        "data": str(ws["counterfact"]),
        "data_kind": "counterfact",
        "data_dir": str(ws["data"]),
        "cases": 4,
        "batch_sizes": (2,),
        "editors": ("pmet", "memit"),
        "pmet_options": TINY_PMET,
        "suite_options": TINY_SUITE,
    }
    return BatchExperimentConfig(**(settings | overrides))


class Killed(Exception):
    """The run stopped from outside."""


def _without_timings(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMINGS}


def _parts(out: Path) -> dict[str, dict[str, Any]]:
    return {p.name: _without_timings(json.loads(p.read_text())) for p in sorted((out / "parts").iterdir())}


def _assert_same_records(got: Any, expected: Any, device: str) -> None:
    """Equal on the CPU; on CUDA, whose kernels (atomic adds in backward passes) do not repeat a run bit for bit,
    equal up to float rounding (1e-3) with the same structure, strings and counts."""
    if device == "cpu":
        assert got == expected
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys()
        for key in expected:
            _assert_same_records(got[key], expected[key], device)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_same_records(a, b, device)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=CUDA_ROUNDING["rtol"], abs=CUDA_ROUNDING["atol"])
    else:
        assert got == expected


# ------------------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("device", BAD_DEVICES)
def test_a_bad_device_is_a_value_error_before_anything_loads(device: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device must be"):
        check_device(device)
    with pytest.raises(ValueError, match="device must be"):
        load_model(str(tmp_path / "no-such-model"), "generation", device=device)  # refused before the model is read
    with pytest.raises(ValueError, match="device must be"):
        BatchExperimentConfig(model="m", device=device)


def test_devices_resolve_to_what_the_machine_has() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if CUDA else "cpu")
    if CUDA:
        assert resolve_device("cuda:0") == "cuda:0"
        with pytest.raises(ValueError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        for device in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="no CUDA"):
                resolve_device(device)


@pytest.mark.parametrize("device", ["cpu", "auto", pytest.param("cuda", marks=needs_cuda)])
def test_load_model_places_the_model(workspace: dict[str, Path], device: str) -> None:
    model, _ = load_model(str(workspace["model"]), "generation", device=device)
    expected = resolve_device(device)
    assert {p.device.type for p in model.parameters()} == {torch.device(expected).type}
    assert not model.training


def test_load_model_without_a_device_leaves_the_model_on_the_cpu(workspace: dict[str, Path]) -> None:
    model, _ = load_model(str(workspace["model"]), "generation")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_cli_device_option(workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["batch", "run", "--model", str(workspace["model"]), "--data", str(workspace["counterfact"])]
    argv += ["--data-kind", "counterfact", "--data-dir", str(workspace["data"]), "--cases", "2", "--batch-sizes", "2"]
    argv += ["--editor", "memit", "--no-progress", "--out", str(out)]
    argv += [arg for key, value in TINY_PMET.items() for arg in ("--pmet-set", f"{key}={json.dumps(value)}")]
    assert main([*argv, "--device", "gpu"]) == 2
    assert "device must be" in capsys.readouterr().err and not out.exists()
    if not CUDA:  # asked for a GPU the machine lacks: refused before the folder is made
        assert main([*argv, "--device", "cuda:0"]) == 2
        assert "no CUDA" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["device"] == "cpu" and "device" not in json.loads((out / "config.json").read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["batch", "run", "--help"])
    assert "--device" in capsys.readouterr().out


def test_a_run_resumes_on_another_device(workspace: dict[str, Path], tmp_path: Path) -> None:
    """The device is not a setting of the run: the folder resumes, and nothing finished is recomputed."""
    out = tmp_path / "run"
    config = _config(workspace, editors=("memit",), device="cpu")
    run_batch_experiment(config, out, progress=False)
    part = out / "parts" / "memit-b2.json"
    written = part.stat().st_mtime_ns
    results = run_batch_experiment(replace(config, device="auto"), out, progress=False)
    assert part.stat().st_mtime_ns == written and results["config"]["device"] == "auto"


# ------------------------------------------------------------------------------------------ runs on a device
@pytest.mark.parametrize("device", DEVICES)
def test_null_space_state_round_trips_through_the_cpu(device: str) -> None:
    torch.manual_seed(0)
    moment = torch.randn(6, 6, dtype=torch.float64)
    space = NullSpace.from_moments({0: (moment @ moment.T).to(device)}, threshold=0.5, l2=1.0)
    keys, residuals = torch.randn(6, 2, device=device), torch.randn(3, 2, device=device)
    delta = space.solve(0, keys, residuals)
    space.commit()
    assert delta.down.device.type == device and space.earlier[0].device.type == device
    state = space.state_tensors()
    assert {t.device.type for t in state.values()} == {"cpu"}
    other = NullSpace.from_moments({0: (moment @ moment.T).to(device)}, threshold=0.5, l2=1.0)
    other.load_state_tensors(state)
    assert other.earlier[0].device.type == device
    torch.testing.assert_close(other.earlier[0].cpu(), space.earlier[0].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_sequential_null_space_run_resumes_on_the_device(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """PMET and MEMIT in sequential batches with AlphaEdit's projection: key statistics computed on the device (then
    read back from the cache), the suite on the device, and a run killed in batch 2 resumed from its CPU checkpoint to
    the same records as a straight run."""
    pmet = {**TINY_PMET, "null_space": True, "null_space_threshold": 0.5}
    config = _config(workspace, mode="sequential", pmet_options=pmet, device=device)
    straight = tmp_path / "straight"
    run_batch_experiment(config, straight, progress=False)
    records = _parts(straight)
    assert sorted(records) == [f"{e}-b2-seq{k}.json" for e in ("memit", "pmet") for k in (1, 2)]
    final = records["pmet-b2-seq2.json"]
    assert final["null_space"] is True and final["edited"] == 4 and "perplexity.change" in final
    assert records["memit-b2-seq2.json"]["earlier_batches"][0]["batch_index"] == 1

    calls: list[int] = []
    crash_at = [2]
    original = PMETEditor.edit_batch

    def edit_batch(editor: PMETEditor, requests, targets=None):
        assert {p.device.type for p in editor.model.parameters()} == {device}
        calls.append(len(requests))
        if len(calls) in crash_at:
            raise Killed  # in the middle of PMET's batch 2
        return original(editor, requests, targets)

    monkeypatch.setattr(PMETEditor, "edit_batch", edit_batch)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_batch_experiment(config, out, progress=False)
    calls.clear()
    crash_at.clear()
    run_batch_experiment(config, out, progress=False)
    assert calls == [2, 2, 2]  # PMET's batch 2 (batch 1 came from its checkpoint), then MEMIT's two
    _assert_same_records(_parts(out), records, device)
    for editor in ("pmet", "memit"):
        resumed, _ = load_checkpoint(out / "checkpoints", f"{editor}-b2")
        expected, _ = load_checkpoint(straight / "checkpoints", f"{editor}-b2")
        assert resumed.keys() == expected.keys() and "null_space.0.earlier" in resumed
        for key, tensor in expected.items():
            torch.testing.assert_close(resumed[key], tensor, **({} if device == "cpu" else CUDA_ROUNDING))


@pytest.mark.parametrize("device", DEVICES)
def test_independent_run_on_the_device(workspace: dict[str, Path], tmp_path: Path, device: str) -> None:
    """PMET and MEMIT batches from the original model; a lost part is recomputed from the saved (CPU) targets."""
    out = tmp_path / "run"
    config = _config(workspace, device=device)
    results = run_batch_experiment(config, out, progress=False)
    rows = {row["editor"]: row for row in results["rows"]}
    assert rows["unedited"]["efficacy_acc"] == 0.0
    assert {row["batches"] for row in results["rows"][1:]} == {2}
    assert all(row["efficacy_acc"] > 0 for row in results["rows"][1:])
    first = _parts(out)
    (out / "parts" / "pmet-b2.json").unlink()
    run_batch_experiment(config, out, progress=False)
    _assert_same_records(_parts(out), first, device)
