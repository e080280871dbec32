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
