"""Base-model fingerprint: refuse to attach patches to a model they were not trained for.

Patches are keyed to the exact FFN inputs of one model, so a patch set loaded into another checkpoint of the same
architecture silently does the wrong thing. The fingerprint records the architecture facts (model type, hidden size,
module names, patch dimensions) and two views of the patched FFN's weights:

- ``weights_sha256``: exact bytes (as float32), the fast path for the very same checkpoint;
- ``weights_sketch``: 16 fixed random projections of the weights. The same checkpoint cast to bf16/fp16 changes the
  bytes but moves the sketch by ~0.3 %; a different checkpoint moves it far more. A relative distance under
  ``SKETCH_TOLERANCE`` is accepted as "the same model at another precision".
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from accelerate.utils import align_module_device
from torch import nn

from ..errors import FingerprintMismatchError
from .registry import PatchTarget, hidden_size_of, model_type_of

SKETCH_SIZE = 16
SKETCH_TOLERANCE = 0.02
_SKETCH_SEED = 20230201


def _weights(module: nn.Module) -> torch.Tensor:
    with align_module_device(module):
        return module.weight.detach().to(device="cpu", dtype=torch.float32).flatten()


def _sketch(flat: torch.Tensor) -> list[float]:
    generator = torch.Generator().manual_seed(_SKETCH_SEED)
    projection = torch.randint(0, 2, (SKETCH_SIZE, flat.numel()), generator=generator, dtype=torch.int8)
    signs = projection.to(torch.float32).mul_(2).sub_(1)
    return (signs @ flat / math.sqrt(flat.numel())).tolist()


def compute_fingerprint(model: nn.Module, target: PatchTarget, query_dim: int, output_dim: int) -> dict[str, Any]:
    modules = dict(model.named_modules())
    key, value = modules[target.key_module], modules[target.value_module]
    if hasattr(value, "get_base_layer"):  # already wrapped by a PatcherLayer of another adapter
        value = value.get_base_layer()
    flat = torch.cat([_weights(key), _weights(value)])
    return {
        "model_type": model_type_of(model),
        "hidden_size": hidden_size_of(model),
        "key_module": target.key_module,
        "value_module": target.value_module,
        "query_dim": int(query_dim),
        "output_dim": int(output_dim),
        "weights_sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        "weights_sketch": _sketch(flat),
    }


def sketch_distance(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).norm() / ta.norm().clamp_min(1e-12))


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Raise ``FingerprintMismatchError`` naming every fact that differs between adapter and model."""
    problems = [
        f"{field}: adapter {expected.get(field)!r}, model {actual[field]!r}"
        for field in ("model_type", "hidden_size", "key_module", "value_module", "query_dim", "output_dim")
        if expected.get(field) != actual[field]
    ]
    if not problems and expected.get("weights_sha256") != actual["weights_sha256"]:
        distance = sketch_distance(expected.get("weights_sketch") or [0.0] * SKETCH_SIZE, actual["weights_sketch"])
        if not distance < SKETCH_TOLERANCE:
            problems.append(
                f"weights of the patched FFN differ (sketch distance {distance:.3g} > {SKETCH_TOLERANCE}); the adapter "
                "was trained on another checkpoint"
            )
    if problems:
        raise FingerprintMismatchError(
            "This patch set was made for a different base model:\n  - " + "\n  - ".join(problems) + "\nLoad it into "
            "the model it was trained on. To attach it anyway (the patches will not do what they were trained for), "
            "pass check_fingerprint=False to transformer_patcher.PatcherModel.from_pretrained."
        )
