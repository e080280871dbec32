"""One process of the crash-safety campaign: ``transformer-patcher <args>`` with a SIGKILL armed at one point.

``FAULT=<point>:<n>[:<delay>]`` (unset: run normally), counted within this process:

- ``edit``: ``delay`` seconds after the n-th edit starts (mid-training, or wherever the run is by then);
- ``checkpoint-tensors``: the n-th checkpoint's tensor file, half written;
- ``checkpoint-pointer``: the n-th checkpoint's JSON pointer, half written (its new tensor file is complete);
- ``save-pretrained``: the n-th adapter weights file written by ``save_pretrained``, half written;
- ``fold-record``: the n-th ``folds/fold-K.json``, half written;
- ``swap-aside``: right after the n-th folder swap moved the old folder aside to ``.NAME.previous``, before the new
  one is renamed in (the two-rename fallback only: set ``TRANSFORMER_PATCHER_FORCE_FALLBACK_SWAP=1``).

The kill is a real ``SIGKILL`` of this process: no ``finally`` blocks, no flushing, as in an OOM kill or power cut.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft.peft_model
import safetensors.torch

import transformer_patcher.experiments.sme.experiment as experiment
import transformer_patcher.experiments.sme.run_state as checkpoint
from transformer_patcher.cli import main
from transformer_patcher.methods.patcher.trainer import PatchTrainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_half_written(path: Path, data: bytes) -> None:
    """Leave ``path`` (the temporary file a write goes through) half written, flushed to disk, then die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    die()


def on_nth_call(
    owner: Any, name: str, n: int, action: Callable[..., Any], when: Callable[..., bool] = lambda *_: True
) -> None:
    """Replace ``owner.name`` so that the n-th call for which ``when(*args)`` holds runs ``action`` instead."""
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if when(*args):
            calls += 1
            if calls == n:
                return action(original, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def arm(point: str, n: int, delay: float) -> None:
    if point == "edit":

        def start_then_die(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            threading.Timer(delay, die).start()
            return original(*args, **kwargs)

        on_nth_call(PatchTrainer, "edit", n, start_then_die)
    elif point == "checkpoint-tensors":
        on_nth_call(
            checkpoint,
            "save_safetensors_atomic",
            n,
            lambda _, tensors, path, metadata=None: die_half_written(
                path.with_name(path.name + ".tmp"), safetensors.torch.save(tensors, metadata)
            ),
        )
    elif point in ("checkpoint-pointer", "fold-record"):
        on_nth_call(
            checkpoint if point == "checkpoint-pointer" else experiment,
            "write_text_atomic",
            n,
            lambda _, path, text: die_half_written(path.with_name(path.name + ".tmp"), text.encode()),
            when=lambda path, _text: path.name.startswith("fold-"),
        )
    elif point == "save-pretrained":
        on_nth_call(
            peft.peft_model,
            "safe_save_file",
            n,
            lambda _, tensors, path, metadata=None: die_half_written(
                Path(path), safetensors.torch.save(tensors, metadata)
            ),
        )
    elif point == "swap-aside":

        def rename_then_die(original: Callable[..., Any], src: Any, dst: Any) -> None:
            original(src, dst)
            die()

        on_nth_call(os, "rename", n, rename_then_die, when=lambda _src, dst, *_: str(dst).endswith(".previous"))
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    fault = os.environ.get("FAULT")
    if fault:
        point, n, *delay = fault.split(":")
        arm(point, int(n), float(delay[0]) if delay else 0.0)
    sys.exit(main(sys.argv[1:]))
