"""Modes a model is put in for a while and taken out of: here, its weights held in another dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transformer_patcher.core.modes import weights_as


def test_weights_as_holds_the_weights_in_a_dtype_and_puts_each_tensor_back_even_when_the_body_fails() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.register_buffer("scale", torch.ones(4))
    tensors = [p.data for p in model.parameters()]
    values = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"), weights_as(model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert model.scale.dtype == torch.float32  # buffers keep theirs
        assert model(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
        raise RuntimeError("inside")
    for parameter, tensor, value in zip(model.parameters(), tensors, values, strict=True):
        assert parameter.data_ptr() == tensor.data_ptr() and torch.equal(parameter, value)  # its own storage
