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

from ..atomic import save_safetensors_atomic, write_text_atomic
from ..errors import AdapterFileError

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
    for old in directory.glob(f"{name}.*.safetensors"):
        if old != tensor_file:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: str | os.PathLike[str], name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The last saved (tensors, state) of ``name``, or None if it was never saved. Corruption raises."""
    directory = Path(directory)
    pointer = directory / f"{name}.json"
    if not pointer.exists():
        return None
    try:
        record: dict[str, Any] = json.loads(pointer.read_text())
        tensor_file = directory / record["tensors"]
        if record.get("format") != FORMAT_VERSION:
            raise AdapterFileError(f"{pointer}: unsupported checkpoint format {record.get('format')!r}")
        if _sha256(tensor_file) != record["sha256"]:
            raise AdapterFileError(f"{tensor_file} does not match the checksum recorded in {pointer}")
        return load_file(str(tensor_file)), record["state"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as error:
        raise AdapterFileError(f"cannot resume from checkpoint {pointer}: {error}") from error
