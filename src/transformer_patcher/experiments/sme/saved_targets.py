"""Mass-editor target vectors saved in a run folder, piece by piece, so an interrupted optimisation resumes.

Targets do not depend on λ or on how the layer loop writes them, so a run computes them once per variant and every
batch size, later run and tuning script reuses them: ``targets-<name>.safetensors`` (values, pre-edit values and
PMET's attention deltas) beside ``targets-<name>.json`` (steps, probabilities, seconds per request).

They are the slow part of a big batch (2–3 s a fact on 2 CPU cores, 1,000 facts ≈ 45 min; 10,000 on an H200 ≈
19 min), so they are computed :data:`TARGET_PIECE` requests at a time and each finished piece is saved under
``targets-<name>.partial.*``: a killed run, or one cut off by a time limit, starts again at the first piece not saved.
The finished file replaces the partial one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors.torch import load_file
from tqdm.auto import tqdm

from transformer_patcher.core.atomic import save_safetensors_atomic, write_text_atomic
from transformer_patcher.methods.pmet import Targets

TARGET_PIECE = 200  # requests per saved piece: ≈ 9 min on 2 CPU cores, ≈ 20 s on an H200


def _paths(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _read(folder: Path, name: str) -> tuple[Targets, dict] | None:
    tensor_file, meta_file = _paths(folder, name)
    if not tensor_file.is_file() or not meta_file.is_file():
        return None
    saved = load_file(str(tensor_file))
    meta = json.loads(meta_file.read_text())
    targets = Targets(saved["values"], saved["init"], meta["steps"], meta["probabilities"], saved.get("attention"))
    if not len(targets.steps) == len(targets.probabilities) == targets.values.shape[0] == targets.init.shape[0]:
        raise ValueError(f"{tensor_file} and {meta_file} disagree on how many requests they hold")
    return targets, meta


def _write(folder: Path, name: str, targets: Targets, meta: dict) -> None:
    tensor_file, meta_file = _paths(folder, name)
    tensors = {"values": targets.values, "init": targets.init}
    if targets.attention is not None:
        tensors["attention"] = targets.attention
    save_safetensors_atomic(tensors, tensor_file)
    write_text_atomic(meta_file, json.dumps({"steps": targets.steps, "probabilities": targets.probabilities, **meta}))


def read_saved_targets(folder: Path, name: str, requests: int | None = None) -> tuple[Targets, float] | None:
    """``folder/targets-<name>.*`` (targets and seconds per request), or None when not saved there (or only in
    part) or, given ``requests``, saved for another number of requests."""
    read = _read(folder, f"targets-{name}")
    if read is None or (requests is not None and len(read[0].steps) != requests):
        return None
    return read[0], read[1]["seconds_per_request"]


def saved_targets(
    folder: Path,
    name: str,
    requests: int,
    compute: Callable[[Sequence[int]], Targets],
    piece: int = TARGET_PIECE,
    progress: bool = False,
) -> tuple[Targets, float]:
    """The targets of requests ``0 … requests − 1`` and their seconds per request: read from
    ``folder/targets-<name>.*`` when saved there, else computed (``compute(indices)``) a piece at a time, each piece
    saved as it finishes, and resumed from the pieces an earlier, interrupted call saved. ``progress``: a bar over
    the saved requests (a resumed call starts it where the saved pieces end)."""
    if requests < 1 or piece < 1:
        raise ValueError(f"need requests >= 1 and piece >= 1, got {requests} and {piece}")
    saved = read_saved_targets(folder, name, requests)
    if saved is not None:
        return saved
    if read_saved_targets(folder, name) is not None:
        raise ValueError(f"{folder}/targets-{name}.* holds the targets of another number of requests than {requests}")
    partial = _read(folder, f"targets-{name}.partial")
    if partial is not None and partial[1]["requests"] != requests:
        saved_for = partial[1]["requests"]
        raise ValueError(f"{folder}/targets-{name}.partial.* was saved for {saved_for} requests, not {requests}")
    pieces, seconds = ([], 0.0) if partial is None else ([partial[0]], partial[1]["seconds"])
    done = sum(len(p.steps) for p in pieces)
    bar = tqdm(total=requests, initial=done, desc=f"{name} targets saved", unit="req", disable=not progress)
    with bar:
        for start in range(done, requests, piece):
            began = time.perf_counter()
            pieces.append(compute(range(start, min(start + piece, requests))))
            seconds += time.perf_counter() - began
            if start + piece < requests:
                pieces = [Targets.concatenated(pieces)]
                _write(folder, f"targets-{name}.partial", pieces[0], {"requests": requests, "seconds": seconds})
            bar.update(min(piece, requests - start))
    targets = Targets.concatenated(pieces)
    _write(folder, f"targets-{name}", targets, {"seconds_per_request": seconds / requests})
    for path in _paths(folder, f"targets-{name}.partial"):
        path.unlink(missing_ok=True)
    return targets, seconds / requests
