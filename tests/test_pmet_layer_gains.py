"""How far a change at each edited FFN's output carries to the logits (``logit_gains``, the joint solve's weights)."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import _model, _texts
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.methods.pmet.layer_gains import logit_gains


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer(_texts()[0], add_special_tokens=False)["input_ids"][:16]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_block_that_adds_nothing_passes_a_change_on_unchanged(arch: str) -> None:
    """With block 1's attention and FFN writing nothing, a change after block 0's FFN reaches the logits exactly as
    the same change after block 1's: gain 1 (to the noise's sampling). With block 1 as it was, block 0's change also
    passes through it, and the gain is not 1. The model is left as it was."""
    tokenizer = tiny_tokenizer()
    model = _model(arch)
    before = _logits(model, tokenizer)
    texts = _texts()[:8]
    gains = logit_gains(model, tokenizer, texts, [0, 1], repeats=8)
    assert gains[-1] == 1.0 and gains == logit_gains(model, tokenizer, texts, [0, 1], repeats=8)  # seeded
    assert abs(gains[0] - 1) > 0.1
    torch.testing.assert_close(_logits(model, tokenizer), before, rtol=0, atol=0)
    block = model.transformer.h[1] if arch == "gpt2" else model.model.layers[1]
    outputs = (block.attn.c_proj, block.mlp.c_proj) if arch == "gpt2" else (block.self_attn.o_proj, block.mlp.down_proj)
    with torch.no_grad():
        for projection in outputs:
            projection.weight.zero_()
            if getattr(projection, "bias", None) is not None:
                projection.bias.zero_()
    passed = logit_gains(model, tokenizer, texts, [0, 1], repeats=8)
    assert passed[0] == pytest.approx(1.0, abs=0.05)


def test_no_text_or_no_layer_is_refused() -> None:
    model, tokenizer = _model("llama"), tiny_tokenizer()
    for texts, layers in (([], [0]), (["a text"], [])):
        with pytest.raises(ValueError, match="at least one text and one layer"):
            logit_gains(model, tokenizer, texts, layers)
