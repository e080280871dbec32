"""Base-model fingerprint: refuse to attach an adapter to a model it was not made for.

Patches are keyed to the exact FFN inputs of one model, and a weight delta to the exact weights it edits, so an
adapter loaded into another checkpoint of the same architecture silently does the wrong thing. The fingerprint
records the architecture facts (model type, hidden size, module names and dimensions) and two views of the weights
of the modules involved:

- ``weights_sha256``: exact bytes (as float32), the fast path for the very same checkpoint;
- ``weights_sketch``: 16 fixed random projections of the weights. The same checkpoint cast to bf16/fp16 changes the
  bytes but moves the sketch by ~0.3 %; a different checkpoint moves it far more. A relative distance under
  ``SKETCH_TOLERANCE`` is accepted as "the same model at another precision".

``weights_digest`` computes both views for any list of modules; ``compute_fingerprint`` (patch adapter) and
``fingerprint_modules`` (weight-delta adapter) add their own architecture facts, and ``check_fingerprint`` compares
every fact of either kind.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import align_module_device
from peft.tuners.tuners_utils import _get_in_out_features
from torch import nn

from ..errors import FingerprintMismatchError
from .registry import PatchTarget, hidden_size_of, model_type_of

SKETCH_SIZE = 16
SKETCH_TOLERANCE = 0.02
_SKETCH_SEED = 20230201
_WEIGHT_VIEWS = ("weights_sha256", "weights_sketch")


@dataclass(frozen=True)
class AdapterWording:
    """How a fingerprint mismatch names the adapter, the weights it depends on and the loader to bypass the check."""

    noun: str
    weights: str
    made: str
    loader: str
    consequence: str


PATCH_WORDING = AdapterWording(
    noun="patch set",
    weights="the patched FFN",
    made="trained",
    loader="transformer_patcher.PatcherModel.from_pretrained",
    consequence="the patches will not do what they were trained for",
)


def _unwrapped(module: nn.Module) -> nn.Module:
    # already wrapped by a tuner layer of another adapter
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _weights(module: nn.Module) -> torch.Tensor:
    with align_module_device(module):
        return module.weight.detach().to(device="cpu", dtype=torch.float32).flatten()


def _sketch(segments: Sequence[torch.Tensor]) -> list[float]:
    """16 fixed ±1 projections of the concatenated segments, one projection row at a time.

    The signs are drawn from one seeded stream in row-major order, as if for a (16, N) matrix, but each row is
    generated segment by segment, so memory stays O(largest segment) instead of 16·N (which would be tens of GB for a
    few layers of a 7B model).
    """
    numel = sum(s.numel() for s in segments)
    generator = torch.Generator().manual_seed(_SKETCH_SEED)
    sketch = []
    for _ in range(SKETCH_SIZE):
        total = 0.0
        for segment in segments:
            draws = torch.randint(0, 2, (segment.numel(),), generator=generator, dtype=torch.int8)
            total += float(draws.to(torch.float32).mul_(2).sub_(1) @ segment)
        sketch.append(total / math.sqrt(numel))
    return sketch


def weights_digest(model: nn.Module, module_names: Sequence[str]) -> dict[str, Any]:
    """``weights_sha256`` and ``weights_sketch`` of the named modules' weights, concatenated in the given order."""
    modules = dict(model.named_modules())
    segments = [_weights(_unwrapped(modules[name])) for name in module_names]
    digest = hashlib.sha256()
    for segment in segments:
        digest.update(segment.numpy().tobytes())
    return {"weights_sha256": digest.hexdigest(), "weights_sketch": _sketch(segments)}


def compute_fingerprint(model: nn.Module, target: PatchTarget, query_dim: int, output_dim: int) -> dict[str, Any]:
    """Fingerprint of a patch adapter: the patched FFN's key and value projections."""
    return {
        "model_type": model_type_of(model),
        "hidden_size": hidden_size_of(model),
        "key_module": target.key_module,
        "value_module": target.value_module,
        "query_dim": int(query_dim),
        "output_dim": int(output_dim),
        **weights_digest(model, [target.key_module, target.value_module]),
    }


def fingerprint_modules(model: nn.Module, module_names: Sequence[str]) -> dict[str, Any]:
    """Fingerprint of an adapter over a list of modules: their ``[in_features, out_features]`` and weights."""
    modules = dict(model.named_modules())
    dims = {}
    for name in module_names:
        d_in, d_out = _get_in_out_features(_unwrapped(modules[name]))
        dims[name] = [int(d_in), int(d_out)]
    return {
        "model_type": model_type_of(model),
        "hidden_size": hidden_size_of(model),
        "modules": dims,
        **weights_digest(model, module_names),
    }


def sketch_distance(a: list[float], b: list[float]) -> float:
    """Relative distance of sketch ``a`` (from a file: inf when it is not ``SKETCH_SIZE`` numbers) to ``b``."""
    try:
        ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return math.inf
    if ta.shape != tb.shape:
        return math.inf
    return float((ta - tb).norm() / ta.norm().clamp_min(1e-12))


def check_fingerprint(
    expected: dict[str, Any], actual: dict[str, Any], wording: AdapterWording = PATCH_WORDING
) -> None:
    """Raise ``FingerprintMismatchError`` naming every fact that differs between adapter and model."""
    problems = [
        f"{field}: adapter {expected.get(field)!r}, model {value!r}"
        for field, value in actual.items()
        if field not in _WEIGHT_VIEWS and expected.get(field) != value
    ]
    if not problems and expected.get("weights_sha256") != actual["weights_sha256"]:
        distance = sketch_distance(expected.get("weights_sketch") or [0.0] * SKETCH_SIZE, actual["weights_sketch"])
        if not distance < SKETCH_TOLERANCE:
            problems.append(
                f"weights of {wording.weights} differ (sketch distance {distance:.3g} > {SKETCH_TOLERANCE}); the "
                f"adapter was {wording.made} on another checkpoint"
            )
    if problems:
        raise FingerprintMismatchError(
            f"This {wording.noun} was made for a different base model:\n  - " + "\n  - ".join(problems) + "\nLoad it "
            f"into the model it was {wording.made} on. To attach it anyway ({wording.consequence}), pass "
            f"check_fingerprint=False to {wording.loader}."
        )
