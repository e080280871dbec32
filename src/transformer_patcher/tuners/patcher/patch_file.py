"""Checking a saved patch file: the PATCHER tensors of ``schema``, checked before the model is touched.

Per patched module a file holds the committed and in-progress patch tensors; anything else, a missing tensor, an edit
id that is not int64, a non-float or non-finite value, shapes that disagree with each other, with the config's
fingerprint or with ``num_patches`` is an ``AdapterFileError``, and so is a file larger than the config's patch count
allows, before it is read (the generic reading and checks are in ``tuners.adapter_file``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.tuners.adapter_file import config_targets, group_tensors, module_error, read_checked_file
from transformer_patcher.tuners.bounds import MAX_WIDTH, check_declared_size, file_size_limit, largest_row_norm
from transformer_patcher.tuners.patcher.schema import PATCH_TENSOR_NAMES, PATCH_TENSORS, patch_sizes
from transformer_patcher.tuners.tensor_schema import fixed_bytes, row_bytes


@dataclass(frozen=True)
class PatchShapes:
    """Patch counts, dimensions and largest magnitudes of one patched module in a checkpoint."""

    n_frozen: int
    n_trainable: int
    query_dim: int
    output_dim: int
    key_norm: float
    bias_norm: float
    value_norm: float  # of the effective values (v' ⊙ a for the trainable patches)

    @property
    def dims(self) -> tuple[int, int]:
        return self.query_dim, self.output_dim

    @property
    def magnitudes(self) -> dict[str, float]:
        """Largest key and value row norms and largest |bias|, by what ``bounds.check_magnitudes`` calls them."""
        return {"patch keys": self.key_norm, "patch biases": self.bias_norm, "patch values": self.value_norm}

    @property
    def total(self) -> int:
        return self.n_frozen + self.n_trainable

    def rows(self, frozen: bool) -> int:
        """Committed (``frozen``) or in-progress patches."""
        return self.n_frozen if frozen else self.n_trainable


def _measure_group(module: str, group: Mapping[str, torch.Tensor], source: str) -> PatchShapes:
    """Counts, dimensions and magnitudes of one module's patches, whose shapes must agree with each other."""
    fk, fv, tk, tv = (group[n] for n in ("patch_frozen_keys", "patch_frozen_values", "patch_keys", "patch_values"))
    if fk.dim() != 2 or tk.dim() != 2 or fv.dim() != 2 or tv.dim() != 2:
        raise module_error(source, module, "patch keys and values must be 2-D (patches × dim)")
    n_frozen, n_trainable = fk.shape[0], tk.shape[0]
    query_dim, output_dim = fk.shape[1], fv.shape[1]
    for spec in PATCH_TENSORS:
        if spec.name not in group:  # an optional tensor the file predates
            continue
        expected = spec.shape_for(patch_sizes(n_frozen if spec.frozen else n_trainable, query_dim, output_dim))
        if tuple(group[spec.name].shape) != expected:
            raise module_error(
                source, module, f"{spec.name} has shape {tuple(group[spec.name].shape)}, expected {expected}"
            )
    biases = torch.cat([group["patch_frozen_bias"].double(), group["patch_bias"].double()]).abs()
    return PatchShapes(
        n_frozen,
        n_trainable,
        query_dim,
        output_dim,
        key_norm=largest_row_norm(fk, tk),
        bias_norm=float(biases.max()) if biases.numel() else 0.0,
        value_norm=largest_row_norm(fv, tv.double() * group["patch_value_scale"].double()),
    )


def group_patch_tensors(
    state_dict: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, PatchShapes]]:
    """Split checkpoint tensors by patched module (names without the peft prefix) and validate each group."""
    # the 2-D check of keys and values is _measure_group's: one message for all four
    return group_tensors(state_dict, PATCH_TENSORS, source, ("PATCHER", "patch"), False, _measure_group)


def _check_patch_file_size(path: str, config: Any) -> None:
    """Bound the file by ``num_patches`` rows of the fingerprint's widths (``MAX_WIDTH`` when it gives none): per
    patch a row of each patch tensor of its side, floats in ``patch_dtype`` (8 bytes when unset), ids in int64, plus
    the fixed-size tensors (the gate frame) of each module."""
    fingerprint = config.fingerprint or {}
    query_dim, output_dim = (fingerprint.get(dim) or MAX_WIDTH for dim in ("query_dim", "output_dim"))
    itemsize = getattr(torch, config.patch_dtype).itemsize if config.patch_dtype else 8
    sizes = patch_sizes(1, query_dim, output_dim)
    targets = len(config_targets(config))
    limit = file_size_limit(
        config.num_patches, row_bytes(PATCH_TENSORS, sizes, itemsize), len(PATCH_TENSOR_NAMES) * targets
    )
    limit += targets * fixed_bytes(PATCH_TENSORS, sizes, itemsize)
    implied = f"num_patches={config.num_patches} of {query_dim}→{output_dim}, patch_dtype={config.patch_dtype}"
    check_declared_size(path, limit, implied)


def validate_adapter_file(path: str | os.PathLike[str], config: Any) -> dict[str, PatchShapes]:
    """Check a saved adapter file against its own config; raise ``AdapterFileError`` on any disagreement."""
    source = os.fspath(path)
    _check_patch_file_size(source, config)
    dtype = ("patch_dtype", config.patch_dtype)
    shapes = read_checked_file(path, group_patch_tensors, dtype, config_targets(config), verb="patches")
    total = sum(s.total for s in shapes.values())
    if total != config.num_patches:
        raise AdapterFileError(f"{source} holds {total} patches but its config says num_patches={config.num_patches}")
    fingerprint = config.fingerprint or {}
    for module, shape in shapes.items():
        for dim in ("query_dim", "output_dim"):
            if dim in fingerprint and getattr(shape, dim) != fingerprint[dim]:
                raise AdapterFileError(
                    f"{source}: module '{module}' has {dim}={getattr(shape, dim)}, but the config's fingerprint says "
                    f"{fingerprint[dim]}"
                )
    return shapes
