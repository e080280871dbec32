"""``refine="rebalance"``: the batch solved again, each aim rescaled so that each fact lands the median share."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests, _texts
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.methods.pmet import PMETEditor, PMETHyperParams
from transformer_patcher.methods.pmet.algorithm import applied, read_z, refined_deltas, written_values, z_read_module


def _landed(refine_rounds: int) -> torch.Tensor:
    """Each fact's landed share of its change at the z layer after one batch's write (8 facts, a tiny Llama)."""
    hparams = HPARAMS.with_options(refine="rebalance", refine_rounds=refine_rounds, mom2_update_weight=20.0)
    editor = PMETEditor(_model("llama"), tiny_tokenizer(), hparams, _texts())
    requests = _requests(8)
    targets = editor.compute_targets(requests)
    model, tokenizer = editor.model, editor.tokenizer
    templates = editor.context_templates()
    deltas = refined_deltas(model, tokenizer, requests, hparams, editor.moments, templates, targets, editor.task)
    module, aims = written_values(model, tokenizer, requests, hparams, targets)
    assert module == z_read_module(model, hparams)
    before = read_z(model, tokenizer, requests, module)
    with applied(model, deltas):
        after = read_z(model, tokenizer, requests, module)
    change = aims - before
    return ((after - before) * change).sum(0) / (change * change).sum(0)


def test_a_rebalanced_write_lands_the_facts_more_evenly() -> None:
    plain, rebalanced = _landed(0), _landed(2)
    assert float(plain.max() - plain.min()) > 0.02  # the plain write lands the facts unevenly
    spread = lambda shares: float(shares.std() / shares.mean())  # noqa: E731
    assert spread(rebalanced) < 0.2 * spread(plain)
    assert float(rebalanced.min()) > float(plain.min())  # the shortest-landed fact gets more


def test_rebalance_refuses_the_written_key_solves() -> None:
    for option in ("keep_written", "null_space"):
        with pytest.raises(ValueError, match="rebalance"):
            PMETHyperParams(refine="rebalance", **{option: True})
