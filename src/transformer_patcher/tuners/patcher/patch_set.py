"""A saved patch set as files: what it holds, its edit log, and undoing one edit — without loading the base model.

A patch-set folder is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) plus, when it
was written by the CLI, ``edits.jsonl``: one line per edit (``edit_id``, ``text``, ``target``, ``success``, the
``prompt_format`` it was made in, and when known its ``subject`` and ``rephrases``), so later edits can rebuild the
memory of earlier ones, ``eval`` can score the fixes as they were asked, and a reader can see what each patch
fixes. Every change is validated first and written atomically; a failed undo leaves the folder as it was. Each
reader and writer first recovers the folder from a crash mid-swap (:func:`~..atomic.recover_folder`), reads regular
files only (a FIFO would hang it), and a writer refuses a folder holding links or special files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from transformer_patcher.core.atomic import (
    check_plain_folder,
    open_regular_file,
    recover_folder,
    replace_folder_atomic,
    require_regular_file,
    write_text_atomic,
)
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.core.folder_lock import sibling_lock
from transformer_patcher.core.jsonl import json_lines
from transformer_patcher.tuners.model_card import CARD_NAME, model_card
from transformer_patcher.tuners.patcher.config import PatcherConfig
from transformer_patcher.tuners.patcher.patch_file import group_patch_tensors, read_adapter_file

EDIT_LOG = "edits.jsonl"
_ROWS = {  # tensor name → the edit-id tensor that labels its rows
    "patch_frozen_keys": "patch_frozen_edit_ids",
    "patch_frozen_bias": "patch_frozen_edit_ids",
    "patch_frozen_values": "patch_frozen_edit_ids",
    "patch_frozen_edit_ids": "patch_frozen_edit_ids",
    "patch_keys": "patch_edit_ids",
    "patch_bias": "patch_edit_ids",
    "patch_values": "patch_edit_ids",
    "patch_value_scale": "patch_edit_ids",
    "patch_edit_ids": "patch_edit_ids",
}


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


def read_edit_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The folder's edit log (empty when it has none); a malformed line is an error naming the line."""
    log = Path(path) / EDIT_LOG
    try:
        with open_regular_file(log) as handle:
            text = handle.read().decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries = []
    for number, entry in json_lines(text, str(log), AdapterFileError):
        if not isinstance(entry.get("edit_id"), int):
            raise AdapterFileError(f"{log}: line {number}: each line must be an object with an integer 'edit_id'")
        for field, kinds, what in (("text", str, "text"), ("target", (str, int), "text or a label index")):
            value = entry.get(field)
            if not isinstance(value, kinds) or isinstance(value, bool):
                state = "missing" if field not in entry else f"a {type(value).__name__}, not {what}"
                raise AdapterFileError(f"{log}: line {number}: field {field!r} is {state}")
        entries.append(entry)
    return entries


def edit_log_entry(
    edit_id: int,
    text: str,
    target: Any,
    success: bool,
    prompt_format: dict[str, Any] | None = None,
    subject: str | None = None,
    rephrases: Sequence[str] = (),
) -> dict[str, Any]:
    """One line of the edit log; the optional fields are written only when known."""
    entry: dict[str, Any] = {"edit_id": edit_id, "text": text, "target": target, "success": success}
    if prompt_format is not None:
        entry["prompt_format"] = dict(prompt_format)
    if subject:
        entry["subject"] = subject
    if rephrases:
        entry["rephrases"] = list(rephrases)
    return entry


def write_edit_log(path: str | os.PathLike[str], entries: list[dict[str, Any]]) -> None:
    write_text_atomic(Path(path) / EDIT_LOG, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))


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
    ids = torch.cat([t for name, t in tensors.items() if name.endswith(("patch_frozen_edit_ids", ".patch_edit_ids"))])
    counts: dict[int, int] = {}
    for edit_id in ids.tolist():
        counts[edit_id] = counts.get(edit_id, 0) + 1
    targets = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
    return PatchSetInfo(
        folder,
        config.base_model_name_or_path,
        ", ".join(map(str, targets)),
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
        labels = tensors[f"{module}.{_ROWS[name]}"]
        keep = labels != edit_id
        kept[key] = tensor[keep]
        if name in ("patch_frozen_edit_ids", "patch_edit_ids"):
            removed += int((~keep).sum())
    if removed == 0:
        raise KeyError(f"{folder} has no patches for edit id {edit_id}")
    group_patch_tensors(kept, str(weights))  # the result must still be a valid adapter file
    config.num_patches -= removed
    config.num_trainable_patches = sum(len(t) for k, t in kept.items() if k.endswith(".patch_edit_ids"))
    log = read_edit_log(folder)

    def write(staging: Path) -> None:
        save_file(kept, str(staging / weights.name), metadata={"format": "pt"})
        config.save_pretrained(str(staging))
        write_log_and_card(staging, config, [e for e in log if e["edit_id"] != edit_id])

    replace_folder_atomic(folder, write)
    return removed
