"""PMET's closed-form update: the formula, its optimality conditions, its rank, and the layer spread."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_patcher.methods.pmet.update import residual_share, solve_update


def _problem(d_in: int = 12, d_out: int = 7, n: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_in, n, generator=generator, dtype=torch.float64)
    residuals = torch.randn(d_out, n, generator=generator, dtype=torch.float64)
    samples = torch.randn(200, d_in, generator=generator, dtype=torch.float64)
    return keys, residuals, samples.T @ samples / 200


def test_update_is_the_formula_and_has_rank_n() -> None:
    keys, residuals, moment = _problem()
    delta = solve_update(keys, residuals, moment, weight=2.0)
    expected = residuals @ keys.T @ torch.linalg.inv(keys @ keys.T + 2.0 * moment)
    torch.testing.assert_close(delta.dense(), expected, rtol=1e-10, atol=1e-12)
    assert delta.rank == 3 and torch.linalg.matrix_rank(delta.dense()) == 3


def test_update_minimises_fit_plus_covariance_penalty() -> None:
    """The gradient of ‖ΔW K − R‖² + λ·tr(ΔW C ΔWᵀ) vanishes at ΔW, and a perturbation only raises the objective."""
    keys, residuals, moment = _problem()
    weight = 0.5
    delta = solve_update(keys, residuals, moment, weight).dense()

    def objective(w: torch.Tensor) -> torch.Tensor:
        return ((w @ keys - residuals) ** 2).sum() + weight * torch.trace(w @ moment @ w.T)

    gradient = 2 * (delta @ keys - residuals) @ keys.T + 2 * weight * delta @ moment
    assert gradient.abs().max() < 1e-10
    nudged = delta + 1e-3 * torch.randn(delta.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert objective(nudged) > objective(delta)


def test_small_weight_fits_the_residuals_exactly() -> None:
    keys, residuals, moment = _problem()
    delta = solve_update(keys, residuals, moment, weight=1e-8).dense()
    torch.testing.assert_close(delta @ keys, residuals, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("keys_shape", "residual_shape", "moment_shape", "weight", "message"),
    [
        ((12, 3), (7, 2), (12, 12), 1.0, "share n columns"),
        ((12, 3), (7, 3), (11, 11), 1.0, "must be 12 × 12"),
        ((12, 3), (7, 3), (12, 12), 0.0, "positive"),
    ],
)
def test_bad_shapes_and_weights_are_refused(keys_shape, residual_shape, moment_shape, weight, message) -> None:
    with pytest.raises(ValueError, match=message):
        solve_update(torch.zeros(keys_shape), torch.zeros(residual_shape), torch.eye(moment_shape[0]), weight)


def test_residual_spread_pmet_and_memit() -> None:
    """PMET divides layer i's share by sqrt(L − i), MEMIT by (L − i); the last layer takes the rest in both."""
    assert [residual_share(i, 4) for i in range(4)] == [1 / 2, 1 / math.sqrt(3), 1 / math.sqrt(2), 1.0]
    assert [residual_share(i, 4, "memit") for i in range(4)] == [1 / 4, 1 / 3, 1 / 2, 1.0]
    with pytest.raises(ValueError, match="spread"):
        residual_share(0, 4, "rome")
    with pytest.raises(ValueError, match="position"):
        residual_share(4, 4)
