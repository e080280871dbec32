"""AlphaEdit's null-space projection: preserved keys keep their outputs, to 1e-5, through every batch."""

from __future__ import annotations

import pytest
import torch

from test_pmet_editor import HPARAMS, _model, _requests, _texts
from tiny_tokenizer import tiny_tokenizer
from transformer_patcher.methods.pmet import (
    NullSpace,
    PMETEditor,
    PMETHyperParams,
    null_space_projection,
    solve_projected_update,
)
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.null_space import null_space_basis


def _subspace_problem(d_in: int = 16, rank: int = 10, d_out: int = 7, n: int = 3, seed: int = 0):
    """Preserved keys spanning ``rank`` of ``d_in`` directions, and new keys in every direction."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_in, rank, generator=generator, dtype=torch.float64))[0]
    preserved = basis @ torch.randn(rank, 300, generator=generator, dtype=torch.float64)
    keys = torch.randn(d_in, n, generator=generator, dtype=torch.float64)
    residuals = torch.randn(d_out, n, generator=generator, dtype=torch.float64)
    return preserved, keys, residuals


def test_the_projection_spans_the_small_eigenvalues() -> None:
    preserved, _, _ = _subspace_problem()
    projection = null_space_projection(preserved @ preserved.T / preserved.shape[1], threshold=1e-2)
    assert torch.linalg.matrix_rank(projection) == 16 - 10
    torch.testing.assert_close(projection @ projection, projection)  # a projection
    assert (projection @ preserved).abs().max() < 1e-10


def test_a_flat_spectrum_still_has_a_null_space() -> None:
    """The threshold is a share of the keys' energy: on a flat spectrum (no small eigenvalue at all) the null space
    is the directions that together carry that share, not empty."""
    assert null_space_basis(torch.eye(20, dtype=torch.float64), threshold=0.1).shape == (20, 2)
    assert null_space_basis(torch.diag(torch.tensor([1.0, 2.0, 3.0, 94.0])), threshold=0.05).shape == (4, 2)


def test_a_preserved_key_keeps_its_output_and_new_keys_move() -> None:
    preserved, keys, residuals = _subspace_problem()
    projection = null_space_projection(preserved @ preserved.T / preserved.shape[1], threshold=1e-2)
    delta = solve_projected_update(keys, residuals, projection, torch.zeros(16, 16, dtype=torch.float64), l2=1.0)
    change = delta.dense() @ preserved
    assert change.norm() <= 1e-5 * preserved.norm()
    assert (delta.dense() @ keys).norm() > 0.1 * residuals.norm()  # the edit is not projected away
    assert delta.rank == 3


def test_earlier_batches_stay_written_when_a_later_one_is_solved() -> None:
    """With the earlier keys in the system a second batch disturbs the first less than without them."""
    preserved, first, residuals = _subspace_problem(n=4)
    _, second, residuals_2 = _subspace_problem(n=4, seed=1)
    moment = preserved @ preserved.T / preserved.shape[1]
    space = NullSpace.from_moments({0: moment}, threshold=1e-2, l2=0.1)
    first_delta = space.solve(0, first, residuals)
    space.commit()
    remembered = space.solve(0, second, residuals_2).dense() @ first
    space.discard()
    forgotten = NullSpace.from_moments({0: moment}, 1e-2, 0.1).solve(0, second, residuals_2).dense() @ first
    assert remembered.norm() < 0.5 * forgotten.norm()
    assert first_delta.dense().norm() > 0


def test_pending_keys_count_only_once_committed() -> None:
    preserved, keys, residuals = _subspace_problem()
    space = NullSpace.from_moments({3: preserved @ preserved.T}, threshold=1e-2, l2=1.0)
    space.solve(3, keys, residuals)
    space.discard()
    assert space.earlier[3].abs().max() == 0
    space.solve(3, keys, residuals)
    space.commit()
    torch.testing.assert_close(space.earlier[3], keys @ keys.T)
    saved = space.state_tensors()
    space.reset()
    assert space.earlier[3].abs().max() == 0
    space.load_state_tensors(saved)
    torch.testing.assert_close(space.earlier[3], keys @ keys.T)


def test_a_refine_round_is_weighed_against_its_own_batch_keys() -> None:
    """A second solve before commit (a refine round) counts the keys the batch's first solve wrote, as committed
    batches' keys are counted: it equals the solve with those keys as earlier ones, and disturbs them less."""
    preserved, first, residuals = _subspace_problem(n=4)
    _, again, residuals_2 = _subspace_problem(n=4, seed=1)
    moment = preserved @ preserved.T / preserved.shape[1]
    space = NullSpace.from_moments({0: moment}, threshold=1e-2, l2=0.1)
    space.solve(0, first, residuals)
    refined = space.solve(0, again, residuals_2).dense()
    expected = solve_projected_update(again, residuals_2, space.projections[0], first @ first.T, 0.1).dense()
    torch.testing.assert_close(refined, expected)
    blind = NullSpace.from_moments({0: moment}, 1e-2, 0.1).solve(0, again, residuals_2).dense()
    assert (refined @ first).norm() < 0.5 * (blind @ first).norm()
    space.commit()
    torch.testing.assert_close(space.earlier[0], first @ first.T + again @ again.T)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: null_space_projection(torch.eye(3), threshold=0.0), "share of the keys' energy"),
        (lambda: null_space_projection(torch.eye(3), threshold=1.0), "share of the keys' energy"),
        (lambda: null_space_projection(torch.ones(3, 2), threshold=1.0), "square"),
        (lambda: solve_projected_update(torch.ones(4, 2), torch.ones(3, 1), torch.eye(4), torch.eye(4), 1.0), "share"),
        (lambda: solve_projected_update(torch.ones(4, 2), torch.ones(3, 2), torch.eye(3), torch.eye(4), 1.0), "4 × 4"),
        (lambda: solve_projected_update(torch.ones(4, 2), torch.ones(3, 2), torch.eye(4), torch.eye(4), 0.0), "L2"),
    ],
)
def test_bad_inputs_are_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_a_ridge_with_the_projection_is_refused() -> None:
    """The projected solve has its own L2 and never reads the covariance the ridge regularises: asking for both
    would silently run without the ridge."""
    with pytest.raises(ValueError, match="null_space_l2"):
        PMETHyperParams(null_space=True, mom2_ridge=1.0)
    assert PMETHyperParams(null_space=True).mom2_ridge == 0  # the projection alone, and the ridge alone, stay valid
    assert PMETHyperParams(mom2_ridge=1.0).null_space is False


def _preserved_keys(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keys (d × k) along the eigenvectors outside the null space, scaled by their typical size."""
    null = null_space_basis(moment, threshold)
    values, vectors = torch.linalg.eigh((moment.double() + moment.double().T) / 2)
    outside = vectors[:, null.shape[1] :]  # eigh sorts ascending; the null space is the first columns
    assert null.shape[1] > 0 and outside.shape[1] > 0
    return (outside * values[null.shape[1] :].clamp(min=0).sqrt()).float()


@pytest.mark.parametrize("variant", ["memit", "pmet-refined"])
def test_an_editor_batch_leaves_preserved_keys_unchanged_on_a_tiny_llama(variant: str) -> None:
    """Each edited layer's output on keys in the preserved space (its large-eigenvalue directions) is unchanged to
    1e-5 after two sequential batches; the edit itself still changes the model. ``pmet-refined`` is PMET's write
    with refine rounds, whose extra updates are projected too."""
    tokenizer = tiny_tokenizer()
    options = {"variant": "memit"} if variant == "memit" else {"track": "residual", "refine_rounds": 2}
    hparams = HPARAMS.with_options(**options, null_space=True, null_space_threshold=0.2)
    editor = PMETEditor(_model("llama"), tokenizer, hparams, _texts(), progress=False)
    before = {}
    for layer in hparams.layers:
        kept = _preserved_keys(editor.moments[layer].matrix, 0.2)
        module = editor.model.base_model.model.get_submodule(block_modules(editor.model, layer).ffn_out)
        before[layer] = (module, kept.T, module(kept.T).detach())
    editor.edit_batch(_requests(2))
    editor.edit_batch(_requests(2, offset=20))
    rank = editor.model.base_model.delta_rank()
    assert rank == 4 * len(hparams.layers) if variant == "memit" else rank > 4 * len(hparams.layers)  # rounds ran
    for module, keys, output in before.values():
        after = module(keys).detach()
        assert (after - output).norm() <= 1e-5 * output.norm()
        assert module.delta_down["default"].norm() > 0
    assert all(editor.written.earlier[layer].abs().max() > 0 for layer in hparams.layers)


def test_without_the_projection_the_same_keys_move() -> None:
    """The control for the test above: the plain MEMIT update (λC) moves those keys' outputs far beyond 1e-5."""
    tokenizer = tiny_tokenizer()
    hparams = HPARAMS.with_options(variant="memit")
    editor = PMETEditor(_model("llama"), tokenizer, hparams, _texts(), progress=False)
    layer = hparams.layers[0]
    keys = _preserved_keys(editor.moments[layer].matrix, 0.2).T
    module = editor.model.base_model.model.get_submodule(block_modules(editor.model, layer).ffn_out)
    output = module(keys).detach()
    editor.edit_batch(_requests(2))
    assert (module(keys).detach() - output).norm() > 1e-3 * output.norm()
