"""Run a model in a mode for a while and restore it afterwards: eval mode, frozen weights, a forward pass that
stops after one module.

``model.train(flag)`` sets all submodules at once, so restoring only the top-level flag would turn dropout on in a
model whose wrapper says "training" but whose modules were in eval mode (a fresh ``PeftModel`` is such a model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """No parameter of ``model`` requires grad for a while (optimising inputs must not touch weights or ``.grad``)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextmanager
def weights_as(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """``model``'s floating-point parameters held in ``dtype`` for a while; each gets its own tensor back afterwards
    (kept, not cast back, so nothing is rounded). Buffers keep their dtype."""
    kept = [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    try:
        for parameter, data in kept:
            parameter.data = data.to(dtype)
        yield model
    finally:
        for parameter, data in kept:
            parameter.data = data


class _Captured(Exception):
    """Raised by :func:`up_to` once the module has run: the rest of the forward pass is not needed."""


@contextmanager
def up_to(layer: nn.Module) -> Iterator[None]:
    """Run a forward pass only up to ``layer`` (what reading a value there needs): the blocks after it and the LM
    head, most of the cost for a large vocabulary (Gemma's 262k), are skipped."""

    def stop(*_: Any) -> None:
        raise _Captured

    handle = layer.register_forward_hook(stop)
    try:
        yield
    except _Captured:
        pass
    finally:
        handle.remove()
