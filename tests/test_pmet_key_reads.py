"""Where the layer loop reads each fact's key: over the context templates (the papers') or in the bare prompt."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.methods.pmet import PMETHyperParams
from transformer_patcher.methods.pmet.algorithm import compute_deltas, compute_layer_keys, read_z
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.covariance import SecondMoment
from transformer_patcher.methods.pmet.templates import BARE_PROMPT


def _templates(tokenizer) -> list[list[str]]:
    """The bare prompt, and a group that reads the subject after a prefix of the tiny vocabulary's words."""
    return [*map(list, BARE_PROMPT), [tokenizer.decode([12, 13, 14, 15]) + ". {}"]]


def _landed(key_reads: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's write with a vanishing λ: what it adds at the bare prompt's subject, and what it was asked to."""
    model, tokenizer = _model("llama"), tiny_tokenizer()
    requests = _requests(3)
    templates = _templates(tokenizer)
    hparams = HPARAMS.with_options(layers=(1,), mom2_update_weight=1e-6, key_reads=key_reads, spread="memit")
    name = block_modules(model, 1).ffn_out
    keys = compute_layer_keys(model, tokenizer, requests, BARE_PROMPT, [name])[0].double()
    moments = {1: SecondMoment(name, torch.eye(keys.shape[0], dtype=torch.float64), 1)}
    read = block_modules(model, 1).block
    current = read_z(model, tokenizer, requests, read)
    asked = torch.randn(current.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    deltas = compute_deltas(
        model, tokenizer, requests, hparams, moments, templates, targets=None, wanted=(read, current + asked)
    )
    return deltas[name].dense() @ keys, asked


def test_the_bare_prompt_keys_write_the_whole_change_where_the_fact_is_asked() -> None:
    model, tokenizer = _model("llama"), tiny_tokenizer()
    requests = _requests(3)
    name = block_modules(model, 1).ffn_out
    bare = compute_layer_keys(model, tokenizer, requests, BARE_PROMPT, [name])[0]
    mixed = compute_layer_keys(model, tokenizer, requests, _templates(tokenizer), [name])[0]
    assert (bare - mixed).norm() > 0.1 * bare.norm()  # the context moves the key the papers average in
    on_prompt, asked = _landed("prompt")
    torch.testing.assert_close(on_prompt, asked, atol=1e-4, rtol=1e-4)
    averaged, _ = _landed("templates")
    assert (averaged - asked).norm() > 0.05 * asked.norm()  # the averaged key is fitted, not the prompt's


def test_key_reads_is_validated() -> None:
    with pytest.raises(ValueError, match="key_reads must be one of"):
        PMETHyperParams(key_reads="each")
