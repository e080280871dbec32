"""PMET's closed-form update: the formula, its optimality conditions, its rank, and the layer spread."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_patcher.methods.pmet.update import joint_gram, residual_share, solve_joint, solve_update


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
    for spread in ("rome", "joint"):  # the joint spread has no fixed share
        with pytest.raises(ValueError, match="spread"):
            residual_share(0, 4, spread)
    with pytest.raises(ValueError, match="position"):
        residual_share(4, 4)


def test_joint_solve_of_one_layer_is_the_update() -> None:
    """With one layer the joint solve is ``R Kᵀ (K Kᵀ + S)⁻¹`` (the push-through identity), S = λC plus kept keys."""
    keys, residuals, moment = _problem()
    kept = _problem(seed=3)[2]
    delta = solve_joint([keys], residuals, [2.0 * moment + 0.1 * kept])
    expected = solve_update(keys, residuals, moment, weight=2.0, written=0.1 * kept)
    torch.testing.assert_close(delta.dense(), expected.dense(), rtol=1e-9, atol=1e-12)


def test_joint_solve_is_the_stacked_solve_and_favours_the_layer_where_a_key_stands_out() -> None:
    """Over two layers the first layer's part equals that block of the solve over the stacked keys with the
    block-diagonal penalty; and a fact whose key at the second layer lies where typical keys are rare is written
    mostly there."""
    keys_a, residuals, moment_a = _problem(d_in=12, n=3, seed=0)
    keys_b, _, moment_b = _problem(d_in=9, n=3, seed=1)
    penalty_a, penalty_b = 2.0 * moment_a, 0.5 * moment_b
    first = solve_joint([keys_a, keys_b], residuals, [penalty_a, penalty_b]).dense()
    stacked = torch.cat([keys_a, keys_b])
    block = torch.block_diag(penalty_a, penalty_b)
    whole = residuals @ stacked.T @ torch.linalg.inv(stacked @ stacked.T + block)
    torch.testing.assert_close(first, whole[:, :12], rtol=1e-9, atol=1e-12)
    second = solve_joint([keys_b], residuals - first @ keys_a, [penalty_b]).dense()
    torch.testing.assert_close(second, whole[:, 12:], rtol=1e-8, atol=1e-10)  # solving again writes the rest

    # one fact with a unit key, along C's top direction at layer a and its weakest at layer b: each layer's planned
    # part is R (1 + G)⁻¹ G_m with G_m = 1 / (C_m's eigenvalue there), so layer b takes their ratio more
    residual = torch.ones(7, 1, dtype=torch.float64)
    values_a, vectors_a = torch.linalg.eigh(moment_a)
    values_b, vectors_b = torch.linalg.eigh(moment_b)
    top_a, low_b = vectors_a[:, -1:], vectors_b[:, :1]
    part_a = solve_joint([top_a, low_b], residual, [moment_a, moment_b]).dense() @ top_a
    part_b = solve_joint([low_b, top_a], residual, [moment_b, moment_a]).dense() @ low_b
    torch.testing.assert_close(part_b / part_a, (values_a[-1] / values_b[0]).expand(7, 1), rtol=1e-9, atol=0)
    assert values_a[-1] / values_b[0] > 1.5


def test_joint_gram_gives_the_misfit_of_the_whole_joint_write() -> None:
    """The stacked write over two layers leaves ``R (I + G)⁻¹`` unfitted, and a residual along an eigenvector of ``G``
    with eigenvalue ``g`` keeps ``1 / (1 + g)`` of itself: the spectrum bench/pmet_capacity.py reads."""
    keys_a, residuals, moment_a = _problem(d_in=12, n=5, seed=0)
    keys_b, _, moment_b = _problem(d_in=9, n=5, seed=1)
    systems = [2.0 * moment_a, 0.5 * moment_b]
    solved, gram = joint_gram([keys_a, keys_b], systems)
    torch.testing.assert_close(solved[1], torch.linalg.solve(systems[1], keys_b), rtol=1e-10, atol=1e-12)
    stacked = torch.cat([keys_a, keys_b])
    fitted = stacked.T @ torch.linalg.inv(stacked @ stacked.T + torch.block_diag(*systems)) @ stacked  # R ↦ ΔW K

    def misfit(r: torch.Tensor) -> torch.Tensor:
        return r - r @ fitted

    torch.testing.assert_close(misfit(residuals), residuals @ torch.linalg.inv(torch.eye(5, dtype=gram.dtype) + gram))
    values, vectors = torch.linalg.eigh(gram)
    direction = torch.ones(7, 1, dtype=torch.float64) @ vectors[:, :1].T  # every row along G's weakest eigenvector
    torch.testing.assert_close(misfit(direction), direction / (1 + values[0]), rtol=1e-8, atol=1e-12)
    assert 0 < values[0] < values[-1]


def test_joint_solve_refuses_mismatched_layers() -> None:
    keys, residuals, moment = _problem()
    with pytest.raises(ValueError, match="one penalty per layer"):
        solve_joint([keys, keys], residuals, [moment])
    with pytest.raises(ValueError, match="must be 12 × 12"):
        solve_joint([keys], residuals, [torch.eye(11, dtype=torch.float64)])
