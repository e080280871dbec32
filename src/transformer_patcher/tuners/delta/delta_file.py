"""Checking a saved weight delta: safetensors only, every tensor checked before the model is touched.

A DELTA checkpoint holds, per edited module, ``<module>.delta_up`` (d_out × r) and ``<module>.delta_down`` (r × d_in).
Anything else, a missing half, a non-2-D or non-float tensor, NaN/inf, factors whose ranks disagree, dimensions that
contradict the config's fingerprint, or a total rank other than ``config.rank`` is an ``AdapterFileError``, and so is a
file larger than the config's rank allows, before it is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.tuners.adapter_file import group_tensors, module_error, read_checked_file
from transformer_patcher.tuners.bounds import MAX_WIDTH, check_declared_size, file_size_limit
from transformer_patcher.tuners.delta.schema import DELTA_TENSOR_NAMES, DELTA_TENSORS, delta_sizes
from transformer_patcher.tuners.tensor_schema import row_bytes


@dataclass(frozen=True)
class DeltaShapes:
    """Rank, dimensions and size of one module's delta in a checkpoint."""

    rank: int
    in_features: int
    out_features: int
    norm: float  # Frobenius norm of up @ down

    @property
    def dims(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    @property
    def magnitudes(self) -> dict[str, float]:
        """The delta's norm, by what ``bounds.check_magnitudes`` calls it."""
        return {"weight delta": self.norm}


def _measure_pair(module: str, group: Mapping[str, torch.Tensor], source: str) -> DeltaShapes:
    """Rank, dimensions and norm of one module's delta, whose factors must agree on the rank."""
    up, down = group["delta_up"], group["delta_down"]
    if up.shape[1] != down.shape[0]:
        raise module_error(
            source,
            module,
            f"delta_up {tuple(up.shape)} and delta_down {tuple(down.shape)} disagree on the rank "
            f"({up.shape[1]} vs {down.shape[0]})",
        )
    # ‖up @ down‖²_F = Σ (upᵀup) ⊙ (down downᵀ): r × r products, never the d_out × d_in delta itself
    u, d = up.double(), down.double()
    norm = math.sqrt(max(0.0, float(((u.T @ u) * (d @ d.T)).sum())))
    return DeltaShapes(int(up.shape[1]), int(down.shape[1]), int(up.shape[0]), norm)


def group_delta_tensors(
    state_dict: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, DeltaShapes]]:
    """Split checkpoint tensors by module (names without the peft prefix) and validate each pair."""
    return group_tensors(state_dict, DELTA_TENSORS, source, ("DELTA", "delta"), True, _measure_pair)


def _check_delta_file_size(path: str, config: Any) -> None:
    """Bound the file by ``config.rank`` rank-1 terms of the widest target (its fingerprint's in + out features,
    ``MAX_WIDTH`` each when it gives none) in ``delta_dtype``."""
    recorded = (config.fingerprint or {}).get("modules") or {}
    dims = [recorded.get(name) or (MAX_WIDTH, MAX_WIDTH) for name in config.target_modules]
    widest = max(d_in + d_out for d_in, d_out in dims)
    itemsize = getattr(torch, config.delta_dtype).itemsize
    row = max(row_bytes(DELTA_TENSORS, delta_sizes(1, d_in, d_out), itemsize) for d_in, d_out in dims)
    limit = file_size_limit(config.rank, row, len(DELTA_TENSOR_NAMES) * len(config.target_modules))
    check_declared_size(path, limit, f"rank={config.rank}, at most {widest} in + out features, {config.delta_dtype}")


def validate_delta_file(path: str | os.PathLike[str], config: Any) -> dict[str, DeltaShapes]:
    """Check a saved DELTA adapter file against its own config; raise ``AdapterFileError`` on any disagreement."""
    source = os.fspath(path)
    _check_delta_file_size(source, config)
    dtype = ("delta_dtype", config.delta_dtype)
    shapes = read_checked_file(path, group_delta_tensors, dtype, list(config.target_modules), verb="edits")
    total = sum(s.rank for s in shapes.values())
    if total != config.rank:
        raise AdapterFileError(f"{source} holds deltas of total rank {total} but its config says rank={config.rank}")
    recorded = (config.fingerprint or {}).get("modules") or {}
    for module, shape in shapes.items():
        if module in recorded and [shape.in_features, shape.out_features] != list(recorded[module]):
            raise AdapterFileError(
                f"{source}: module '{module}' has a {shape.in_features}→{shape.out_features} delta, but the config's "
                f"fingerprint says that layer is {recorded[module][0]}→{recorded[module][1]}"
            )
    return shapes
