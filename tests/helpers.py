"""Helpers that build patches with a known firing pattern on tiny models."""

from __future__ import annotations

import torch
from tiny_models import logits

from transformer_patcher import PatcherLayer


def queries(model: torch.nn.Module, layer: PatcherLayer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The FFN queries q of every position of ``batch`` at the patched layer, as rows."""
    with layer.capture() as record:
        logits(model, batch)
    assert record.query is not None
    return record.query.reshape(-1, record.query.shape[-1]).detach().float()


def key_firing_on(target: torch.Tensor, silent: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """A key whose pre-activation is 0 on every row of ``silent`` and ``margin`` on ``target``.

    The key is ``target``'s component orthogonal to the span of ``silent``, scaled so ``k·target = margin``.
    """
    basis, _ = torch.linalg.qr(silent.T.double())
    k = target.double() - basis @ (basis.T @ target.double())
    return (k * margin / (k @ target.double())).float()
