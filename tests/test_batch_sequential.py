"""``batch run --mode sequential``: batches written one after another into one model, a record after each, resumable."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from transformer_patcher.cli import main
from transformer_patcher.experiments.sme.batch_experiment import BatchExperimentConfig, load_cases, run_batch_experiment
from transformer_patcher.experiments.sme.run_state import load_checkpoint
from transformer_patcher.methods.pmet import PMETEditor
from workspace import add_counterfact_edits, build_workspace

TINY_PMET = {"layers": [0], "mom2_update_weight": 1, "v_num_grad_steps": 40, "v_lr": 5, "clamp_norm_factor": 4}
TINY_SUITE = {"generation": 4, "perplexity_tokens": 256, "window": 64}
TIMINGS = ("seconds", "seconds_per_fact", "evaluation_seconds")
DELTA_UP = "transformer.h.0.mlp.c_proj.up"  # the MEMIT delta's factor at the edited layer: d_out × rank


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT-2 workspace with a CounterFact-format edit file (tests/workspace.py)."""
    return add_counterfact_edits(build_workspace(tmp_path_factory.mktemp("sequential")))


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMER_PATCHER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def given_targets(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor | None]:
    """The target values each ``edit_batch`` call is given (None: it optimises its own), in call order."""
    given: list[torch.Tensor | None] = []
    original = PMETEditor.edit_batch

    def edit_batch(editor: PMETEditor, requests, targets=None):
        given.append(None if targets is None else targets.values)
        return original(editor, requests, targets)

    monkeypatch.setattr(PMETEditor, "edit_batch", edit_batch)
    return given


def _config(ws: dict[str, Path], editor: str = "memit", **overrides: Any) -> BatchExperimentConfig:
    """Six cases in three sequential batches of two."""
    settings: dict[str, Any] = {
        "model": str(ws["model"]),
        "data": str(ws["counterfact"]),
        "data_kind": "counterfact",
        "data_dir": str(ws["data"]),
        "cases": 6,
        "batch_sizes": (2,),
        "editors": (editor,),
        "mode": "sequential",
        "pmet_options": TINY_PMET,
        "suite_options": TINY_SUITE,
        "memory_rows": 300,
    }
    return BatchExperimentConfig(**(settings | overrides))


class Killed(Exception):
    """The run stopped from outside."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, call: int) -> tuple[list[int], list[int]]:
    """Make ``PMETEditor.edit_batch`` raise :class:`Killed` at its ``call``-th call; returns the batch sizes it was
    called with and the calls it crashes at (clear it to let a resumed run through)."""
    calls: list[int] = []
    crash_at = [call]
    original = PMETEditor.edit_batch

    def edit_batch(editor: PMETEditor, requests, targets=None):
        calls.append(len(requests))
        if len(calls) in crash_at:
            raise Killed
        return original(editor, requests, targets)

    monkeypatch.setattr(PMETEditor, "edit_batch", edit_batch)
    return calls, crash_at


def _records(out: Path, editor: str = "memit") -> list[dict[str, Any]]:
    return [json.loads((out / "parts" / f"{editor}-b2-seq{k}.json").read_text()) for k in (1, 2, 3)]


def _with_targets_of(run: Path, out: Path) -> Path:
    """A new run folder holding ``run``'s saved targets, as a user copies them."""
    out.mkdir()
    for name in ("targets-memit.safetensors", "targets-memit.json"):
        shutil.copy(run / name, out / name)
    return out


def _without_timings(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMINGS}


def test_sequential_batches_build_on_one_model_and_record_each_batch(workspace, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = run_batch_experiment(_config(workspace), out, progress=False)
    records = _records(out)
    assert [r["batch_index"] for r in records] == [1, 2, 3] and [r["edited"] for r in records] == [2, 4, 6]
    assert {r["mode"] for r in records} == {"sequential"} and {r["batch_size"] for r in records} == {2}
    unedited = results["rows"][0]
    assert unedited["editor"] == "unedited" and unedited["efficacy_acc"] == 0.0
    # batch 1's facts are still in the model after batch 2: it was not reset
    assert [b["batch_index"] for b in records[1]["earlier_batches"]] == [1, 2]
    assert records[1]["earlier_batches"][0]["efficacy_acc"] == 1.0
    assert all("efficacy_score" in b for b in records[2]["earlier_batches"])  # CounterFact has true answers
    final = records[2]
    assert final["efficacy_acc"] == pytest.approx(sum(b["efficacy_acc"] for b in final["earlier_batches"]) / 3)
    for key in ("paraphrase_acc", "neighborhood_acc", "neighborhood_score", "seconds", "seconds_per_fact"):
        assert key in final
    assert final["null_space"] is False
    # general ability against the unedited model: the same reference every time, a changed model after the edits
    assert {r["perplexity.before"] for r in records} == {records[0]["perplexity.before"]}
    assert final["perplexity.perplexity"] != final["perplexity.before"] and final["generation-raw.n"] == 4
    assert 0 <= final["generation-raw.token"] < 1
    # one adapter grows by a rank per fact; targets come from the model as each batch found it, never the cache
    tensors, state = load_checkpoint(out / "checkpoints", "memit-b2")
    assert tensors[DELTA_UP].shape[1] == 6 and state["position"] == 3
    assert not list(out.glob("targets-*"))
    assert [(r["mode"], r.get("batch_index")) for r in results["rows"][1:]] == [("sequential", k) for k in (1, 2, 3)]
    report = (out / "results.md").read_text()
    assert "| sequential | 2 | 3 | 6 |" in report and "| after batch | batch 1 | batch 2 | batch 3 |" in report


def test_t_patcher_keeps_its_patches_across_batches(workspace, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_batch_experiment(_config(workspace, "patcher", suite="none"), out, progress=False)
    records = _records(out, "patcher")
    assert [b["efficacy_acc"] for b in records[2]["earlier_batches"]] == [1.0, 1.0, 1.0]
    assert records[2]["null_space"] is None and "perplexity.change" not in records[2]
    tensors, _ = load_checkpoint(out / "checkpoints", "patcher-b2")
    patched = {int(i) for i in tensors["patch_frozen_edit_ids"].tolist()}
    assert patched == set(range(6))  # every case's patch, from all three batches, is in the one model


def test_an_interrupted_sequential_run_resumes_after_its_last_batch(workspace, tmp_path, monkeypatch) -> None:
    """With the null space on, the resumed run must restore the earlier batches' keys too to match a straight run."""
    config = _config(workspace, pmet_options={**TINY_PMET, "null_space": True, "null_space_threshold": 0.5})
    straight = tmp_path / "straight"
    run_batch_experiment(config, straight, progress=False)
    calls, crash_at = _crash_at(monkeypatch, 2)  # in the middle of batch 2
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_batch_experiment(config, out, progress=False)
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["memit-b2-seq1.json"]
    first = (out / "parts" / "memit-b2-seq1.json").read_text()
    (out / "parts" / "memit-b2-seq1.json").unlink()  # as if killed after the checkpoint, before the record
    calls.clear()
    crash_at.clear()
    run_batch_experiment(config, out, progress=False)
    assert calls == [2, 2]  # batches 2 and 3 only
    assert (out / "parts" / "memit-b2-seq1.json").read_text() == first  # restored from the checkpoint
    assert [_without_timings(r) for r in _records(out)] == [_without_timings(r) for r in _records(straight)]
    assert _records(out)[2]["null_space"] is True and _records(out)[2]["null_space_threshold"] == 0.5
    resumed, _ = load_checkpoint(out / "checkpoints", "memit-b2")
    expected, _ = load_checkpoint(straight / "checkpoints", "memit-b2")
    assert resumed.keys() == expected.keys() and "null_space.0.earlier" in resumed
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor)


def test_a_rewritten_run_holds_one_write_of_every_fact_and_resumes_it(workspace, tmp_path, monkeypatch) -> None:
    """With ``rewrite_written`` each batch replaces the adapter's factors by one write of every fact so far, and an
    interrupted run resumes with the written facts from its checkpoint, as a straight run."""
    config = _config(workspace, pmet_options={**TINY_PMET, "rewrite_written": True}, suite="none")
    straight = tmp_path / "straight"
    run_batch_experiment(config, straight, progress=False)
    records = _records(straight)
    assert all(r["rewrite_written"] is True for r in records)
    assert [b["efficacy_acc"] for b in records[2]["earlier_batches"]] == [1.0, 1.0, 1.0]
    _, crash_at = _crash_at(monkeypatch, 3)  # in the middle of batch 3
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_batch_experiment(config, out, progress=False)
    crash_at.clear()
    run_batch_experiment(config, out, progress=False)
    assert [_without_timings(r) for r in _records(out)] == [_without_timings(r) for r in records]
    resumed, _ = load_checkpoint(out / "checkpoints", "memit-b2")
    expected, _ = load_checkpoint(straight / "checkpoints", "memit-b2")
    assert resumed[DELTA_UP].shape[1] == 6 and resumed["rewritten_facts.values"].shape[1] == 6
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor)


def test_the_first_batch_reuses_targets_an_independent_run_saved_for_these_cases(
    workspace, tmp_path, given_targets
) -> None:
    """Batch 1 finds the model unedited, so the original targets are its own; later batches optimise theirs."""
    independent = tmp_path / "independent"
    run_batch_experiment(_config(workspace, mode="independent", suite="none"), independent, progress=False)
    saved = load_file(str(independent / "targets-memit.safetensors"))
    given = given_targets
    given.clear()  # the independent run's own calls
    out = _with_targets_of(independent, tmp_path / "run")
    run_batch_experiment(_config(workspace, suite="none"), out, progress=False)
    assert len(given) == 3 and given[1] is None and given[2] is None
    torch.testing.assert_close(given[0], saved["values"][:2])
    seconds = json.loads((out / "targets-memit.json").read_text())["seconds_per_request"]
    assert _records(out)[0]["seconds"] >= 2 * seconds  # the saved targets' time is counted
    # targets saved for another number of cases are not these cases': batch 1 optimises its own
    given.clear()
    again = _with_targets_of(independent, tmp_path / "again")
    run_batch_experiment(_config(workspace, suite="none", cases=4), again, progress=False)
    assert given == [None, None]


def test_original_targets_are_optimised_once_and_written_by_every_batch(workspace, tmp_path, given_targets) -> None:
    given = given_targets
    out = tmp_path / "run"
    run_batch_experiment(_config(workspace, suite="none", sequential_targets="original"), out, progress=False)
    saved = load_file(str(out / "targets-memit.safetensors"))["values"]
    assert len(given) == 3
    for k, values in enumerate(given):
        torch.testing.assert_close(values, saved[2 * k : 2 * k + 2])
    assert json.loads((out / "config.json").read_text())["sequential_targets"] == "original"
    with pytest.raises(ValueError, match="sequential_targets"):
        _config(workspace, sequential_targets="stale")
    with pytest.raises(ValueError, match="mode 'sequential' only"):
        _config(workspace, mode="independent", sequential_targets="original")


def test_a_folder_written_before_modes_existed_still_resumes(workspace, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = _config(workspace, mode="independent", cases=4)
    run_batch_experiment(config, out, progress=False)
    old = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k not in ("mode", "suite")}
    (out / "config.json").write_text(json.dumps({**old, "suite_options": {}}))
    part = out / "parts" / "memit-b2.json"
    part.write_text(json.dumps({k: v for k, v in json.loads(part.read_text()).items() if k != "mode"}))
    written = part.stat().st_mtime_ns
    results = run_batch_experiment(replace(config, suite_options={}), out, progress=False)
    assert part.stat().st_mtime_ns == written and results["rows"][1]["batches"] == 2  # nothing was recomputed
    with pytest.raises(ValueError, match="other settings"):
        run_batch_experiment(replace(config, mode="sequential"), out, progress=False)


def test_a_bad_mode_or_suite_option_is_refused_before_anything_is_written(workspace, tmp_path: Path) -> None:
    config = _config(workspace)
    with pytest.raises(ValueError, match="mode must be one of"):
        replace(config, mode="stream")
    with pytest.raises(ValueError, match="unknown suite option"):
        replace(config, suite_options={"unrelated": 10})
    out = tmp_path / "run"
    argv = ["batch", "run", "--model", str(workspace["model"]), "--mode", "stream", "--out", str(out)]
    assert main(argv) == 2
    assert main([*argv[:-3], "--suite-set", "unrelated=10", "--out", str(out)]) == 2
    assert not out.exists()


def test_cli_sequential_mode_end_to_end(workspace: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["batch", "run", "--model", str(workspace["model"]), "--data", str(workspace["counterfact"])]
    argv += ["--data-kind", "counterfact", "--data-dir", str(workspace["data"]), "--cases", "4", "--batch-sizes", "2"]
    argv += ["--editor", "memit", "--mode", "sequential", "--suite", "none"]
    argv += [arg for key, value in TINY_PMET.items() for arg in ("--pmet-set", f"{key}={json.dumps(value)}")]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| sequential | 2 | 2 | 4 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["mode"] == "sequential" and [r.get("edited") for r in results["rows"]] == [None, 2, 4]


def test_a_data_file_needs_its_kind_and_a_short_benchmark_names_the_full_one(workspace, tmp_path: Path) -> None:
    config = _config(workspace)
    with pytest.raises(ValueError, match="is a file: say what it holds with --data-kind"):
        replace(config, data_kind=None)
    named = tmp_path / "data" / "counterfact"
    named.mkdir(parents=True)
    shutil.copy(workspace["counterfact"], named / "counterfact-edit-1k.json")
    records = len(json.loads(Path(workspace["counterfact"]).read_text()))
    short = replace(config, data="counterfact", data_kind=None, data_dir=str(tmp_path / "data"), cases=records)
    assert len(load_cases(short)) == records
    with pytest.raises(ValueError, match=f"has {records} records.*counterfact-edit.json holds 10,000"):
        load_cases(replace(short, cases=records + 1))
    with pytest.raises(ValueError, match=rf"has {records} records, fewer than cases={records + 1}$"):
        load_cases(replace(config, cases=records + 1))
