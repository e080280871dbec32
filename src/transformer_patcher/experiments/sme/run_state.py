"""Atomic, resumable fold checkpoints: a safetensors file of tensors plus a JSON state that names it.

Each save writes a new tensors file (named by position), then atomically replaces the JSON pointing to it, then
deletes older tensor files. A crash at any moment leaves a JSON that names a complete tensors file, whose SHA-256 is
checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from transformer_patcher.core.atomic import save_safetensors_atomic, write_text_atomic
from transformer_patcher.core.errors import AdapterFileError

FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    directory: str | os.PathLike[str], name: str, tensors: dict[str, torch.Tensor], state: dict
) -> None:
    """Save ``tensors`` and JSON-able ``state`` for checkpoint ``name`` (e.g. ``fold-0``) atomically."""
    directory = Path(directory)
    tensor_file = directory / f"{name}.{state['position']:06d}.safetensors"
    save_safetensors_atomic(tensors, tensor_file)
    record = {"format": FORMAT_VERSION, "tensors": tensor_file.name, "sha256": _sha256(tensor_file), "state": state}
    write_text_atomic(directory / f"{name}.json", json.dumps(record, indent=1))
    for old in directory.glob(f"{name}.*.safetensors*"):  # older positions and a killed write's .tmp
        if old != tensor_file:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: str | os.PathLike[str], name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The last saved (tensors, state) of ``name``, or None if it was never saved. Corruption raises."""
    directory = Path(directory)
    pointer = directory / f"{name}.json"
    if not pointer.exists():
        return None
    try:
        record: Any = json.loads(pointer.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise AdapterFileError(f"cannot resume from checkpoint {pointer}: {error}") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise AdapterFileError(f"{pointer}: unsupported checkpoint format {found!r}")
    file_name, checksum, state = record.get("tensors"), record.get("sha256"), record.get("state")
    # only a tensors file of this checkpoint, in this folder: the pointer must not lead elsewhere
    if not (
        isinstance(file_name, str)
        and file_name.startswith(f"{name}.")
        and file_name.endswith(".safetensors")
        and "\x00" not in file_name
        and Path(file_name).name == file_name
    ):
        raise AdapterFileError(f"{pointer} names {file_name!r}, not a tensors file of checkpoint '{name}'")
    if not isinstance(checksum, str) or not isinstance(state, dict):
        raise AdapterFileError(f"{pointer} lacks a sha256 string or a state object")
    tensor_file = directory / file_name
    try:
        digest = _sha256(tensor_file)
        tensors = load_file(str(tensor_file)) if digest == checksum else None
        non_finite = [k for k, t in (tensors or {}).items() if t.is_floating_point() and not torch.isfinite(t).all()]
    except (OSError, SafetensorError, ValueError, RuntimeError) as error:
        raise AdapterFileError(f"cannot resume from checkpoint {pointer}: {error}") from error
    if tensors is None:
        raise AdapterFileError(f"{tensor_file} does not match the checksum recorded in {pointer}")
    if non_finite:
        raise AdapterFileError(f"{tensor_file}: tensors {non_finite} hold NaN or inf; the run cannot resume from it")
    return tensors, state
