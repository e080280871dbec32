"""The paper's solve with the keys earlier batches wrote counted (``keep_written``): a later batch keeps them."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests, _texts
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.methods.pmet import CovarianceSolve, PMETEditor, PMETHyperParams, solve_update
from transformer_patcher.methods.pmet.architecture import block_modules


def _batch(n: int, seed: int, d_in: int = 16, d_out: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_in, n, generator=generator, dtype=torch.float64)
    return keys, torch.randn(d_out, n, generator=generator, dtype=torch.float64)


def _covariance(d_in: int = 16) -> torch.Tensor:
    typical = torch.randn(d_in, 200, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return typical @ typical.T / 200


def test_no_written_keys_is_the_papers_solve() -> None:
    keys, residuals = _batch(3, 0)
    plain = solve_update(keys, residuals, _covariance(), 5.0)
    counted = CovarianceSolve({0: _covariance()}, 5.0).solve(0, keys, residuals)
    torch.testing.assert_close(counted.dense(), plain.dense())


def test_a_later_batch_moves_earlier_keys_less_when_they_are_counted() -> None:
    first, first_residuals = _batch(4, 0)
    second, residuals = _batch(4, 1)
    solve = CovarianceSolve({0: _covariance()}, 5.0)
    solve.solve(0, first, first_residuals)
    solve.commit()
    torch.testing.assert_close(solve.earlier[0], first @ first.T)
    kept = solve.solve(0, second, residuals).dense() @ first
    moved = solve_update(second, residuals, _covariance(), 5.0).dense() @ first
    assert kept.norm() < 0.5 * moved.norm()
    expected = solve_update(second, residuals, _covariance(), 5.0, written=first @ first.T)
    torch.testing.assert_close(kept, expected.dense() @ first)


def test_two_batches_with_written_keys_are_the_one_batch_solve_over_both() -> None:
    """Recursive least squares: with the second batch's residuals read from the model the first left (``V₂ − D₁K₂``),
    ``D₁ + ΔW₂`` is the paper's solve over both batches at once, so the sum of the updates is what λC penalises,
    not each update alone; a penalty on the accumulated update adds nothing to ``keep_written``."""
    first, first_values = _batch(4, 0)
    second, second_values = _batch(5, 1)
    solve = CovarianceSolve({0: _covariance()}, 5.0)
    d1 = solve.solve(0, first, first_values).dense()
    solve.commit()
    d2 = solve.solve(0, second, second_values - d1 @ second).dense()
    both = solve_update(torch.cat([first, second], 1), torch.cat([first_values, second_values], 1), _covariance(), 5.0)
    torch.testing.assert_close(d1 + d2, both.dense())


def test_pending_keys_are_dropped_on_discard_and_survive_a_save() -> None:
    keys, residuals = _batch(3, 0)
    solve = CovarianceSolve({2: _covariance()}, 5.0)
    solve.solve(2, keys, residuals)
    solve.discard()
    assert solve.earlier[2].abs().max() == 0
    solve.solve(2, keys, residuals)
    solve.commit()
    saved = solve.state_tensors()
    assert set(saved) == {"written_keys.2.earlier"}
    solve.reset()
    assert solve.earlier[2].abs().max() == 0
    solve.load_state_tensors(saved)
    torch.testing.assert_close(solve.earlier[2], keys @ keys.T)


def test_a_written_moment_of_the_wrong_size_is_refused() -> None:
    keys, residuals = _batch(3, 0)
    with pytest.raises(ValueError, match="written keys' moment must be 16 × 16"):
        solve_update(keys, residuals, _covariance(), 5.0, written=torch.eye(4))


def test_keep_written_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="keep_written must be True or False"):
        PMETHyperParams(keep_written=1)


def test_an_editor_keeps_the_first_batchs_keys_through_the_second() -> None:
    """On a tiny Llama, the first batch's keys move less under the second batch's update when they are counted, and
    the editor's state (saved for resumed runs) holds them."""
    tokenizer = tiny_tokenizer()
    moved = {}
    for keep in (True, False):  # the first batch's keys are read from the run that counts them
        editor = PMETEditor(
            _model("llama"), tokenizer, HPARAMS.with_options(variant="memit", keep_written=keep), _texts()
        )
        editor.edit_batch(_requests(2))
        layer = HPARAMS.layers[-1]
        module = editor.model.base_model.model.get_submodule(block_modules(editor.model, layer).ffn_out)
        if keep:  # the two keys' span, at their size: Kₚ Kₚᵀ's top eigenvectors times the root of their values
            values, vectors = torch.linalg.eigh(editor.written.earlier[layer])
            moved["keys"] = (vectors[:, -2:] * values[-2:].sqrt()).float()
        keys = moved["keys"]
        output = module(keys.T).detach()
        editor.edit_batch(_requests(2, offset=20))
        moved[keep] = (module(keys.T).detach() - output).norm()
        if keep:
            assert {f"written_keys.{i}.earlier" for i in HPARAMS.layers} <= set(editor.state_tensors())
        else:
            assert editor.written is None
    assert moved[True] < 0.5 * moved[False]
