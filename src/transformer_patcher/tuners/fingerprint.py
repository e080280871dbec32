"""Base-model fingerprint: refuse to attach an adapter to a model it was not made for.

Patches are keyed to the exact FFN inputs of one model, and a weight delta to the exact weights it edits, so an
adapter loaded into another checkpoint of the same architecture silently does the wrong thing. The fingerprint
records the architecture facts (model type, hidden size, module names and dimensions), two views of the weights of
the modules involved, and two of the whole base model:

- ``weights_sha256``: exact bytes (as float32) of the modules' weights, the fast path for the very same checkpoint;
- ``weights_sketch``: 16 fixed random projections of those weights. The same checkpoint cast to bf16/fp16 changes the
  bytes but moves the sketch by ~0.3 %; a different checkpoint moves it far more. A relative distance under
  ``SKETCH_TOLERANCE`` is accepted as "the same model at another precision";
- ``model_shapes_sha256``: the shape of every parameter of the base model, in order;
- ``model_sketch``: 16 random projections of ``MODEL_SAMPLES`` fixed-seed samples of every parameter, each tensor's
  samples divided by their RMS so that every tensor counts alike (a tensor scaled as a whole therefore goes unseen).
  The adapted modules alone cannot tell a model that shares them (another checkpoint with the same last FFN copied
  in), nor 1 % noise on every weight; this sketch moves by ~0.01 for that noise and by ~0.0014 for a bf16 cast
  (SmolLM2-135M), hence ``MODEL_SKETCH_TOLERANCE``. It reads 8 values per tensor: ~20 ms on SmolLM2-135M, whose whole
  fingerprint takes ~0.15 s on one CPU thread.

Fingerprints written before the whole-model views existed lack them. They are checked on what they record (the
adapted modules and the architecture), and the load warns that the rest of the model was not compared. A load never
rewrites a saved adapter's fingerprint (``settle_fingerprint``): it keeps naming the model the adapter was made on,
also after an unchecked load and a save.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import align_module_device
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

from transformer_patcher.core.errors import FingerprintMismatchError, UnverifiedAdapterError
from transformer_patcher.tuners.architectures import PatchTarget, hidden_size_of, model_type_of

SKETCH_SIZE = 16
SKETCH_TOLERANCE = 0.02
MODEL_SAMPLES = 8
MODEL_SKETCH_TOLERANCE = 0.004
_SKETCH_SEED = 20230201
_MODEL_VIEWS = ("model_shapes_sha256", "model_sketch")
_WEIGHT_VIEWS = ("weights_sha256", "weights_sketch", *_MODEL_VIEWS)


@dataclass(frozen=True)
class AdapterWording:
    """How a fingerprint mismatch names the adapter, the weights it depends on, how it was made, what goes wrong on
    another model, and the loader to bypass the check (each tuner fills in its own ``from_pretrained``)."""

    noun: str
    weights: str
    made: str
    consequence: str
    loader: str = ""


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


def _sha256(segments: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for segment in segments:
        digest.update(segment.numpy().tobytes())
    return digest.hexdigest()


def weights_digest(model: nn.Module, module_names: Sequence[str]) -> dict[str, Any]:
    """``weights_sha256`` and ``weights_sketch`` of the named modules' weights, concatenated in the given order."""
    modules = dict(model.named_modules())
    segments = [_weights(_unwrapped(modules[name])) for name in module_names]
    return {"weights_sha256": _sha256(segments), "weights_sketch": _sketch(segments)}


def _base_parameters(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter of the base model once, in module order, without any tuner layer's adapter parameters (so a
    model already carrying adapters has the fingerprint of its base); offloaded weights are brought in per module."""
    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    seen = {id(p) for m in tuners for p in m.parameters()} - {
        id(p) for m in tuners for p in m.get_base_layer().parameters()
    }
    for module in model.modules():
        own = [name for name, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(module._parameters[name]) for name in own)
        if own:
            with align_module_device(module):
                for name in own:
                    yield module._parameters[name]


def _sampled(model: nn.Module) -> Iterator[tuple[torch.Size, torch.Tensor | None]]:
    """Each base parameter's shape and ``MODEL_SAMPLES`` of its values at fixed-seed places (float64; None if empty)."""
    generator = torch.Generator().manual_seed(_SKETCH_SEED)
    for parameter in _base_parameters(model):
        values = None
        if parameter.numel():
            index = torch.randint(0, parameter.numel(), (MODEL_SAMPLES,), generator=generator)
            values = parameter.detach().reshape(-1)[index.to(parameter.device)].to("cpu", torch.float64)
        yield parameter.shape, values


def model_digest(model: nn.Module) -> dict[str, Any]:
    """``model_shapes_sha256`` and ``model_sketch`` of the whole base model (module docstring)."""
    shapes = hashlib.sha256()
    samples = []
    for shape, values in _sampled(model):
        shapes.update(f"{tuple(shape)};".encode())
        if values is not None:
            rms = values.norm() / math.sqrt(MODEL_SAMPLES)
            samples.append((values / rms if rms > 0 else values).float())
    sketch = _sketch([torch.cat(samples)]) if samples else [0.0] * SKETCH_SIZE
    return {"model_shapes_sha256": shapes.hexdigest(), "model_sketch": sketch}


def content_key(model: nn.Module, module_names: Sequence[str] = ()) -> str:
    """An exact key of the model for caches: the named modules' weights byte for byte, and the shapes and the
    fixed-seed samples of every base parameter.

    Caches are not keyed on the fingerprint: its sketches are float dot products, whose last bits change with the
    number of CPU threads, so a cache written by a one-thread run was missed by a two-thread run of the same model.
    """
    modules = dict(model.named_modules())
    digest = hashlib.sha256(model_type_of(model).encode())
    digest.update(_sha256([_weights(_unwrapped(modules[name])) for name in module_names]).encode())
    for shape, values in _sampled(model):
        digest.update(f"{tuple(shape)};".encode())
        if values is not None:
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def compute_fingerprint(model: nn.Module, target: PatchTarget, query_dim: int, output_dim: int) -> dict[str, Any]:
    """Fingerprint of a patch adapter: the patched FFN's key and value projections, and the whole base model."""
    return {
        "model_type": model_type_of(model),
        "hidden_size": hidden_size_of(model),
        "key_module": target.key_module,
        "value_module": target.value_module,
        "query_dim": int(query_dim),
        "output_dim": int(output_dim),
        **weights_digest(model, [target.key_module, target.value_module]),
        **model_digest(model),
    }


def fingerprint_modules(model: nn.Module, module_names: Sequence[str]) -> dict[str, Any]:
    """Fingerprint of an adapter over a list of modules: their ``[in_features, out_features]`` and weights, and the
    whole base model."""
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
        **model_digest(model),
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


def fingerprint_problems(expected: dict[str, Any], actual: dict[str, Any], wording: AdapterWording) -> list[str]:
    """Every fact that differs between a recorded fingerprint and the model's; the weights only when the
    architecture agrees, the whole model only when the record has its views (older ones do not)."""
    problems = [
        f"{field}: adapter {expected.get(field)!r}, model {value!r}"
        for field, value in actual.items()
        if field not in _WEIGHT_VIEWS and expected.get(field) != value
    ]
    if problems:
        return problems
    if any(view in expected for view in _MODEL_VIEWS):
        if expected.get("model_shapes_sha256") != actual["model_shapes_sha256"]:
            problems.append("the base model's parameter shapes differ: it is another architecture or size")
        else:
            distance = sketch_distance(expected.get("model_sketch") or [], actual["model_sketch"])
            if not distance < MODEL_SKETCH_TOLERANCE:
                problems.append(
                    f"weights of the base model differ (sketch distance {distance:.3g} > {MODEL_SKETCH_TOLERANCE}); "
                    f"the adapter was {wording.made} on another checkpoint"
                )
    if expected.get("weights_sha256") != actual["weights_sha256"]:
        distance = sketch_distance(expected.get("weights_sketch") or [0.0] * SKETCH_SIZE, actual["weights_sketch"])
        if not distance < SKETCH_TOLERANCE:
            problems.append(
                f"weights of {wording.weights} differ (sketch distance {distance:.3g} > {SKETCH_TOLERANCE}); the "
                f"adapter was {wording.made} on another checkpoint"
            )
    return problems


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any], wording: AdapterWording) -> None:
    """Raise ``FingerprintMismatchError`` naming every fact that differs between adapter and model."""
    problems = fingerprint_problems(expected, actual, wording)
    if problems:
        raise FingerprintMismatchError(
            f"This {wording.noun} was made for a different base model:\n  - " + "\n  - ".join(problems) + "\nLoad it "
            f"into the model it was {wording.made} on. To attach it anyway ({wording.consequence}), pass "
            f"check_fingerprint=False to {wording.loader}."
        )


def settle_fingerprint(
    config: Any, actual: dict[str, Any], wording: AdapterWording, saved: bool, checked: bool = True
) -> None:
    """Record ``actual`` on a new adapter; check a ``saved`` one's recorded fingerprint against it, never replace it.

    A saved adapter without a fingerprint is refused (``UnverifiedAdapterError``): nothing shows it was made on this
    model. ``checked=False`` (the package's loaders' ``check_fingerprint=False``) turns that and a mismatch into a
    warning; the recorded fingerprint, even None, is kept, so a later save still names the model it was made on, not
    this one.
    """
    if not saved:
        config.fingerprint = actual
        return
    recorded = config.fingerprint
    if recorded is None:
        if checked:
            raise UnverifiedAdapterError(
                f"This {wording.noun} records no fingerprint of the base model it was {wording.made} on, so nothing "
                f"shows it belongs to this model. To attach it anyway, knowing that on another model "
                f"{wording.consequence}, load it with {wording.loader}(model, folder, check_fingerprint=False); "
                "PeftModel.from_pretrained and load_adapter cannot skip this check."
            )
        problems = ["it records no fingerprint"]
    elif checked:
        check_fingerprint(recorded, actual, wording)
        problems = []
    else:
        problems = fingerprint_problems(recorded, actual, wording)
    if problems:
        warnings.warn(
            f"check_fingerprint=False: attached a {wording.noun} that may not belong to this model ("
            + "; ".join(problems)
            + f"). If it was {wording.made} on another model, {wording.consequence}. Its recorded fingerprint is kept.",
            UserWarning,
            stacklevel=2,
        )
    elif not any(view in recorded for view in _MODEL_VIEWS):
        warnings.warn(
            f"This {wording.noun}'s fingerprint predates whole-model fingerprints: only {wording.weights} and the "
            "architecture were compared with this model, not the rest of its weights.",
            UserWarning,
            stacklevel=2,
        )
