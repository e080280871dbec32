"""A saved patch set as files: what it holds, its edit log, and undoing one edit — without loading the base model.

A patch-set folder is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) plus, when it was
written by the CLI, the edit log ``edits.jsonl`` (``tuners.edit_log``) and a model card. Every change is validated first
and written atomically; a failed undo leaves the folder as it was. Each reader and writer first recovers the folder from
a crash mid-swap (:func:`~transformer_patcher.core.atomic.recover_folder`), reads regular files only (a FIFO would hang
it), and a writer refuses a folder holding links or special files.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from transformer_patcher.core.atomic import (
    check_plain_folder,
    recover_folder,
    replace_folder_atomic,
    require_regular_file,
    write_text_atomic,
)
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.core.folder_lock import sibling_lock
from transformer_patcher.tuners.adapter_file import config_targets, read_adapter_file
from transformer_patcher.tuners.edit_log import EDIT_LOG, edit_log_entry, read_edit_log, write_edit_log
from transformer_patcher.tuners.model_card import CARD_NAME, model_card
from transformer_patcher.tuners.patcher.config import PatcherConfig
from transformer_patcher.tuners.patcher.patch_file import group_patch_tensors
from transformer_patcher.tuners.patcher.schema import EDIT_IDS, SPECS, edit_ids_for

__all__ = [  # the edit log's names too: callers read and write it through this module
    "EDIT_LOG",
    "PatchSetInfo",
    "describe_patch_set",
    "edit_log_entry",
    "read_edit_log",
    "remove_edit_from_files",
    "save_adapter_folder",
    "write_edit_log",
    "write_log_and_card",
]


@dataclass
class PatchSetInfo:
    """What ``info`` prints: the base model, the patched module, and the neurons of each edit."""

    path: Path
    base_model: str | None
    target_module: str
    activation: str | None
    fingerprint: dict[str, Any]
    neurons_per_edit: dict[int, int]
    file_bytes: int
    edits: dict[int, dict[str, Any]]  # edit log entries by id (empty when there is no log)

    @property
    def num_patches(self) -> int:
        return sum(self.neurons_per_edit.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "base_model": self.base_model,
            "target_module": self.target_module,
            "activation": self.activation,
            "num_patches": self.num_patches,
            "file_bytes": self.file_bytes,
            "fingerprint": self.fingerprint,
            "edits": [
                {"edit_id": i, "neurons": n, **{k: v for k, v in self.edits.get(i, {}).items() if k != "edit_id"}}
                for i, n in self.neurons_per_edit.items()
            ],
        }


def _load(path: Path) -> tuple[PatcherConfig, dict[str, torch.Tensor], Path]:
    weights = path / SAFETENSORS_WEIGHTS_NAME
    for file in (path / CONFIG_NAME, weights):  # before the loaders open them: a FIFO would hang them
        if file.exists():
            require_regular_file(file)
    if not (path / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{path} is not a patch-set folder: it has no {CONFIG_NAME}")
    config = PatcherConfig.from_pretrained(str(path))  # validates the weights against the config
    if not weights.is_file():
        raise AdapterFileError(f"{path} has no {SAFETENSORS_WEIGHTS_NAME}")
    return config, read_adapter_file(weights), weights


def write_log_and_card(folder: Path, config: PatcherConfig, entries: list[dict[str, Any]]) -> None:
    """The edit log (when there are edits) and the model card that describes the folder's patches and edits."""
    if entries:
        write_edit_log(folder, entries)
    write_text_atomic(folder / CARD_NAME, model_card(config, entries))


def save_adapter_folder(model: Any, path: str | os.PathLike[str], entries: list[dict[str, Any]]) -> None:
    """``model.save_pretrained(path)`` plus the edit log, swapped in as one atomic step: a crash mid-save leaves the
    previous adapter folder whole, never new weights beside an old config or log."""

    def write(staging: Path) -> None:
        model.save_pretrained(staging, save_embedding_layers=False)  # never embeddings; no Hub lookup of the base
        write_log_and_card(staging, model.peft_config[model.active_adapter], entries)

    replace_folder_atomic(Path(path), write)


def describe_patch_set(path: str | os.PathLike[str]) -> PatchSetInfo:
    """Read a patch-set folder (validated, safetensors only) and say what it holds."""
    folder = Path(path)
    recover_folder(folder)
    config, tensors, weights = _load(folder)
    ids = torch.cat([t for key, t in tensors.items() if _tensor_name(key) in EDIT_IDS])
    counts: dict[int, int] = {}
    for edit_id in ids.tolist():
        counts[edit_id] = counts.get(edit_id, 0) + 1
    return PatchSetInfo(
        folder,
        config.base_model_name_or_path,
        ", ".join(map(str, config_targets(config))),
        config.patch_activation,
        dict(config.fingerprint or {}),
        dict(sorted(counts.items())),
        weights.stat().st_size,
        {e["edit_id"]: e for e in read_edit_log(folder)},
    )


def remove_edit_from_files(path: str | os.PathLike[str], edit_id: int) -> int:
    """Delete every neuron of ``edit_id`` from a saved patch set (and its log line); return how many were removed."""
    folder = Path(path)
    with sibling_lock(folder):  # an edit session saving meanwhile would bring the edit back
        recover_folder(folder, locked=True)
        check_plain_folder(folder)  # before reading: nothing is read through a link into the new folder
        return _remove_edit(folder, edit_id)


def _remove_edit(folder: Path, edit_id: int) -> int:
    config, tensors, weights = _load(folder)
    kept: dict[str, torch.Tensor] = {}
    removed = 0
    for key, tensor in tensors.items():
        module, _, name = key.rpartition(".")
        if not SPECS[name].per_row:  # the gate frame belongs to no edit
            kept[key] = tensor
            continue
        labels = tensors[f"{module}.{edit_ids_for(name)}"]
        keep = labels != edit_id
        kept[key] = tensor[keep]
        if name in EDIT_IDS:
            removed += int((~keep).sum())
    if removed == 0:
        raise KeyError(f"{folder} has no patches for edit id {edit_id}")
    _, shapes = group_patch_tensors(kept, str(weights))  # the result must still be a valid adapter file
    in_progress = sum(shape.n_trainable for shape in shapes.values())
    config = dataclasses.replace(config, num_patches=config.num_patches - removed, num_trainable_patches=in_progress)
    log = read_edit_log(folder)

    def write(staging: Path) -> None:
        save_file(kept, str(staging / weights.name), metadata={"format": "pt"})
        config.save_pretrained(str(staging))
        write_log_and_card(staging, config, [e for e in log if e["edit_id"] != edit_id])

    replace_folder_atomic(folder, write)
    return removed


def _tensor_name(key: str) -> str:
    """The patch tensor a checkpoint key names (the part after its module)."""
    return key.rpartition(".")[2]
