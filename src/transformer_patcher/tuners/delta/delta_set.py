"""A saved weight delta as files: what it holds and which facts it writes — read without loading the base model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.tuners.delta.config import DeltaConfig
from transformer_patcher.tuners.edit_log import read_edit_log


def describe_delta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Base model, method, rank per edited module, file size and the edit log of a DELTA adapter folder."""
    folder = Path(path)
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if not (folder / CONFIG_NAME).is_file() or not weights.is_file():
        raise AdapterFileError(
            f"{folder} is not an adapter folder: it needs {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}"
        )
    config = DeltaConfig.from_pretrained(str(folder))  # validates config and weights together
    shapes = config.loaded.shapes
    return {
        "path": str(folder),
        "kind": "weight delta",
        "base_model": config.base_model_name_or_path,
        "method": config.method,
        "rank": config.rank,
        "modules": {name: {"rank": s.rank, "in": s.in_features, "out": s.out_features} for name, s in shapes.items()},
        "file_bytes": weights.stat().st_size,
        "edits": read_edit_log(folder),
    }
