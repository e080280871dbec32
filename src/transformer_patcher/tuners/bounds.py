"""Bounds on what an adapter file may hold: its size from its config, before anything is read, and its magnitudes
from the model's own weights, before anything is injected.

safetensors refuses a file whose size differs from what its header declares, but a consistent header may declare
gigabytes (a sparse file costs nothing to make), and every tensor is read before its shape can be compared with the
config. So the file's size is bounded first by what the config implies: its patch count (or rank) times the widest
row its fingerprint allows, in its dtype, plus a header allowance.

Finite values can still be absurd: patch keys of 3e38 pass every finiteness check and turn every logit into NaN. An
adapter's tensors are therefore bounded by ``MAGNITUDE_LIMIT`` times the Frobenius norm (at least 1) of the weight of
the layer they extend: patch keys and biases by the FFN's key projection, values by its value projection, a weight
delta by the weight it is added to. Trained patches stay far below: on SmolLM2-135M (FFN weight norms ~170, so a bound
of ~1.7e6) the largest keys, biases and values seen are a few hundred. Within the bound, a patch's output for a query
of ordinary size stays many orders of magnitude inside the float32/bfloat16 range.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from accelerate.utils import align_module_device
from torch import nn

from transformer_patcher.core.errors import AdapterFileError

MAGNITUDE_LIMIT = 1e4
MAX_WIDTH = 1 << 17  # widest row assumed when the config's fingerprint does not give the layer's dimensions
_HEADER_BYTES = 64 * 1024
_HEADER_BYTES_PER_TENSOR = 1024


def file_size_limit(rows: int, row_bytes: int, tensors: int) -> int:
    """Largest plausible safetensors file for ``rows`` rows of at most ``row_bytes`` bytes in ``tensors`` tensors."""
    return rows * row_bytes + _HEADER_BYTES + tensors * _HEADER_BYTES_PER_TENSOR


def check_declared_size(path: str | os.PathLike[str], limit: int, implied: str) -> None:
    """Refuse a file larger than its config allows (``implied`` says what the config sets), before reading it."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise AdapterFileError(f"{path} cannot be read: {exc}") from exc
    if size > limit:
        raise AdapterFileError(
            f"{path} is {size:,} bytes, but its config ({implied}) allows at most {limit:,}: its header declares "
            "tensors the config does not account for. Refused before reading any of them."
        )


def weight_scale(module: nn.Module) -> float:
    """Frobenius norm (at least 1) of a layer's weight: the unit in which ``MAGNITUDE_LIMIT`` bounds an adapter."""
    with align_module_device(module):
        return max(1.0, float(module.weight.detach().float().norm()))


def check_magnitudes(
    found: Mapping[str, Mapping[str, float]], scales: Mapping[str, Mapping[str, float]], source: str
) -> None:
    """Refuse a checkpoint whose magnitudes (module → what → largest norm) exceed ``MAGNITUDE_LIMIT`` times the
    matching weight scale (module → what → ``weight_scale``)."""
    for module, magnitudes in found.items():
        for what, value in magnitudes.items():
            scale = scales[module][what]
            if not value <= MAGNITUDE_LIMIT * scale:
                raise AdapterFileError(
                    f"{source}: the {what} for '{module}' reach a norm of {value:.3g}, more than {MAGNITUDE_LIMIT:g} "
                    f"times that layer's own weights ({scale:.3g}): finite but absurd values, which would turn the "
                    "model's outputs into NaN or noise"
                )


def largest_row_norm(*tensors: torch.Tensor) -> float:
    """Largest L2 norm of a row (last dimension) over ``tensors``, in float64; 0 when they are empty."""
    norms = [float(torch.linalg.vector_norm(t.double(), dim=-1).max()) for t in tensors if t.numel()]
    return max(norms, default=0.0)
