"""Aim rounds: the write solved again with each fact aimed by the inverse of the share of it the last solve landed."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.methods.pmet import PMETHyperParams
from transformer_patcher.methods.pmet.algorithm import aimed_deltas, applied, compute_layer_keys, read_z
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.covariance import SecondMoment
from transformer_patcher.methods.pmet.templates import BARE_PROMPT


def _landed(rounds: int) -> torch.Tensor:
    """Each fact's landed share of its asked change after a one-layer write whose λ lands only part of it."""
    model, tokenizer = _model("llama"), tiny_tokenizer()
    requests = _requests(4)
    hparams = HPARAMS.with_options(
        layers=(1,), mom2_update_weight=1.0, key_reads="prompt", spread="memit", aim_rounds=rounds
    )
    name = block_modules(model, 1).ffn_out
    keys = compute_layer_keys(model, tokenizer, requests, BARE_PROMPT, [name])[0].double()
    covariance = torch.eye(keys.shape[0], dtype=torch.float64) * keys.norm(dim=0).pow(2).mean()
    moments = {1: SecondMoment(name, covariance, 1)}
    read = block_modules(model, 1).block
    now = read_z(model, tokenizer, requests, read)
    asked = torch.randn(now.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    deltas = aimed_deltas(model, tokenizer, requests, hparams, moments, BARE_PROMPT, None, (read, now + asked))
    with applied(model, deltas):
        moved = read_z(model, tokenizer, requests, read) - now
    return (moved * asked).sum(0) / (asked * asked).sum(0)


def test_aim_rounds_land_each_fact_near_its_whole_change() -> None:
    once = _landed(0)
    assert (once < 0.8).all()  # λ holds every fact short of its change
    assert (_landed(2) - 1).abs().max() < 0.01


def test_aim_rounds_are_validated() -> None:
    with pytest.raises(ValueError, match="aim_rounds must be >= 0"):
        PMETHyperParams(aim_rounds=-1)
    with pytest.raises(ValueError, match="aim_rounds solves the write again"):
        PMETHyperParams(aim_rounds=1, keep_written=True)
