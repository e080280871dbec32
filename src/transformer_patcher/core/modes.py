"""Switch a model to eval mode for a while and restore every module's own mode afterwards.

``model.train(flag)`` sets all submodules at once, so restoring only the top-level flag would turn dropout on in a
model whose wrapper says "training" but whose modules were in eval mode (a fresh ``PeftModel`` is such a model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
