"""Crash safety, measured: SIGKILL a real ``transformer-patcher sme run`` over and over, resume it each time, and
compare the end result with an uninterrupted run of the same configuration.

Run by ``tests/test_crash_safety.py`` (a few kills on a short stream) and ``bench/reliability.py`` (20 kills on a
200-edit stream, the figures in docs/reliability.md). Kills land at random edits (a random delay into the edit:
mid-training, mid-evaluation or mid-checkpoint) plus one each half-way through writing a checkpoint's tensors, a
checkpoint's pointer, the adapter weights inside ``save_pretrained`` and the fold's record. With ``fallback_swap``
the folder swaps use the two-rename fallback (as where ``renameat2`` is missing) and one more kill lands between its
two renames, as the resume after the fold-record kill saves the patch set over the one already there.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from transformer_patcher.core.atomic import FORCE_FALLBACK_ENV
from workspace import build_workspace

CHILD = Path(__file__).with_name("crash_child.py")
STREAM_POINTS = ("checkpoint-tensors", "checkpoint-pointer")  # armed at a random position of the stream
END_POINTS = ("save-pretrained", "fold-record")  # armed once the stream is done
FALLBACK_END_POINTS = (*END_POINTS, "swap-aside")  # after fold-record: the patch set exists and is saved again
TIMING_FIELDS = ("seconds",)


def child_env(cache: Path, fault: str | None, fallback_swap: bool = False) -> dict[str, str]:
    """The environment of a crash child: offline, one thread, its own cache, the fault armed (if any)."""
    env = dict(os.environ, TRANSFORMER_PATCHER_CACHE=str(cache), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for name in ("FAULT", FORCE_FALLBACK_ENV):
        env.pop(name, None)
    if fault:
        env["FAULT"] = fault
    if fallback_swap:
        env[FORCE_FALLBACK_ENV] = "1"
    return env


def _run(
    args: list[str], cache: Path, fault: str | None, timeout: float, fallback_swap: bool = False
) -> tuple[int, float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(CHILD), *args],
        env=child_env(cache, fault, fallback_swap),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, time.perf_counter() - start, done.stderr[-2000:]


def _position(out: Path, n_examples: int) -> int:
    """How far the crashed run had got: its last durable checkpoint (the stream's end once the fold is recorded)."""
    if (out / "folds" / "fold-0.json").is_file():
        return n_examples
    pointer = out / "checkpoints" / "fold-0.json"
    return json.loads(pointer.read_text())["state"]["position"] if pointer.is_file() else 0


def _records(out: Path) -> list[dict[str, Any]]:
    fold = json.loads((out / "folds" / "fold-0.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in fold["records"]]


def _patched_edits(tensors: dict[str, torch.Tensor]) -> set[int]:
    """The edit ids that own at least one neuron of a saved patch set."""
    return {i for name, t in tensors.items() if name.endswith("edit_ids") for i in t.tolist()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan_kills(
    n_kills: int, n_examples: int, seed: int, end_points: tuple[str, ...] = END_POINTS
) -> list[tuple[str, int, float]]:
    """(point, position, delay) per kill, in stream order: random edits and random checkpoint writes, then the ends."""
    rng = random.Random(seed)
    n_edit = n_kills - len(STREAM_POINTS) - len(end_points)
    if n_edit < 0 or n_kills - len(end_points) > n_examples - 1:
        raise ValueError(f"{n_kills} kills do not fit a stream of {n_examples}")
    positions = sorted(rng.sample(range(1, n_examples), n_kills - len(end_points)))
    points = ["edit"] * n_edit + list(STREAM_POINTS)
    rng.shuffle(points)
    plan = [
        (point, pos, round(rng.uniform(0.0, 0.3), 3) if point == "edit" else 0.0)
        for point, pos in zip(points, positions, strict=True)
    ]
    return plan + [(point, n_examples, 0.0) for point in end_points]


def run_crash_campaign(
    root: Path, n_examples: int, n_kills: int, seed: int = 0, timeout: float = 900, fallback_swap: bool = False
) -> dict:
    """Kill, resume, repeat; then compare with an uninterrupted run. Returns the figures (see the module doc)."""
    workspace = build_workspace(root / "workspace", n_edits=n_examples)
    cache = root / "cache"

    def args(out: Path) -> list[str]:
        return [
            *("sme", "run", "--model", str(workspace["model"]), "--data", str(workspace["zsre"])),
            *("--data-kind", "zsre", "--data-dir", str(workspace["data"]), "--memory-rows", "300"),
            *("--validation-rows", "100", "--schedule", "quick", "--seed", str(seed)),
            *("--out", str(out), "--no-progress", "--resume", "--suite", "small"),
        ]

    reference, crashed = root / "reference", root / "crashed"
    code, reference_seconds, err = _run(args(reference), cache, None, timeout, fallback_swap)
    if code != 0:
        raise RuntimeError(f"the uninterrupted run failed ({code}): {err}")
    kills: list[dict[str, Any]] = []
    end_points = FALLBACK_END_POINTS if fallback_swap else END_POINTS
    for point, position, delay in plan_kills(n_kills, n_examples, seed, end_points):
        before = _position(crashed, n_examples)
        nth = max(position - before, 1) if point in ("edit", *STREAM_POINTS) else 1
        code, seconds, err = _run(args(crashed), cache, f"{point}:{nth}:{delay}", timeout, fallback_swap)
        kills.append(
            {
                "point": point,
                "planned_position": position,
                "delay_s": delay,
                "killed": code == -signal.SIGKILL,
                "exit_code": code,
                "position_before": before,
                "position_after": _position(crashed, n_examples),
                "seconds": round(seconds, 2),
            }
        )
        if code not in (0, -signal.SIGKILL):
            raise RuntimeError(f"a resumed run failed at {point}:{nth} ({code}): {err}")
    code, _, err = _run(args(crashed), cache, None, timeout, fallback_swap)
    if code != 0:
        raise RuntimeError(f"the final resume failed ({code}): {err}")

    reference_records, crashed_records = _records(reference), _records(crashed)
    weights = Path("patches") / "fold-0" / "adapter_model.safetensors"
    ref_tensors, crash_tensors = load_file(reference / weights), load_file(crashed / weights)
    reference_edits, crashed_edits = _patched_edits(ref_tensors), _patched_edits(crash_tensors)
    tensors_equal = ref_tensors.keys() == crash_tensors.keys() and all(
        torch.equal(ref_tensors[k], crash_tensors[k]) for k in ref_tensors
    )
    ref_log = (reference / "patches" / "fold-0" / "edits.jsonl").read_text()
    crash_log = (crashed / "patches" / "fold-0" / "edits.jsonl").read_text()
    ref_summary = json.loads((reference / "results.json").read_text())["summary"]
    crash_summary = json.loads((crashed / "results.json").read_text())["summary"]
    patches = crashed / "patches"
    return {
        "fallback_swap": fallback_swap,
        "examples": n_examples,
        "edits": sum(r["needed"] for r in reference_records),
        "edits_patched": len(reference_edits),
        "kills_planned": len(kills),
        "kills_landed": sum(k["killed"] for k in kills),
        "kills_survived": sum(k["killed"] for k in kills),  # the launch after each kill resumed (else it raised)
        "edits_lost": len(reference_edits - crashed_edits),  # edits whose neurons the final patch set lacks
        "edits_extra": len(crashed_edits - reference_edits),
        "records_lost": len(reference_records) - len(crashed_records),
        "records_identical": reference_records == crashed_records,
        "patches_bit_identical": tensors_equal and _sha256(reference / weights) == _sha256(crashed / weights),
        "edit_log_identical": ref_log == crash_log,
        "metrics_identical": {k: v for k, v in ref_summary.items() if "second" not in k}
        == {k: v for k, v in crash_summary.items() if "second" not in k},
        "leftovers": sorted(
            p.name for p in patches.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")
        ),
        "reference_seconds": round(reference_seconds, 1),
        "kills": kills,
    }
