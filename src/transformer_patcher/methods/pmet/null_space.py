"""AlphaEdit's null-space projection for sequential batches (Fang et al., ICLR 2025), kept per edited layer.

Locate-then-edit updates disturb what the layer already knows, and over many sequential batches the disturbances add
up until the model collapses. AlphaEdit projects each update onto the null space of the *preserved* keys ``K₀`` (the
FFN keys of ordinary text, summarised by the key second moment ``C = E[k kᵀ]`` the statistics already hold), so that
``ΔW k₀ = 0`` for every preserved key, and solves the update for the new keys and the keys of earlier batches:

``ΔWᵀ = (P (K Kᵀ + Kₚ Kₚᵀ) + α I)⁻¹ P K Rᵀ``

with ``P = Û Ûᵀ``, ``Û`` the eigenvectors of ``C`` whose eigenvalues are small. The solution ``X`` of
``(P A + α I) X = P B`` satisfies ``X = P (B − A X) / α``: its columns lie in the range of ``P``, which is why
``ΔW k₀ = Xᵀ k₀ = 0`` exactly when ``P k₀ = 0``. The result is kept as low-rank factors like PMET's own update:
``up = R`` (d_out × n), ``down = ((P A + α I)⁻¹ P K)ᵀ`` (n × d_in).

Deviation from AlphaEdit's code: it keeps the eigenvectors whose eigenvalue is below an absolute 1e-2, a value set
for its models' key scale. Here ``threshold`` is the share of the keys' energy (``tr C``) the null space may carry:
the smallest eigenvalues are kept while their sum stays within ``threshold · tr C``, which means the same on every
model. On SmolLM2-135M the absolute rule would keep most directions (its keys are small) and a rule relative to the
mean eigenvalue none (``bench/pmet_key_spectrum.py``). A preserved key keeps its output up to the energy it has in
the kept directions: exactly, for keys in the span of the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from transformer_patcher.methods.pmet.update import LowRankDelta, check_columns
from transformer_patcher.methods.pmet.written_keys import WrittenKeys


def null_space_basis(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """``Û`` (d × k, float64): the eigenvectors of ``C`` with the smallest eigenvalues, as many as together carry at
    most ``threshold`` of ``tr C``."""
    if second_moment.dim() != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"the second moment must be square, got {tuple(second_moment.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"the null-space threshold is a share of the keys' energy in (0, 1), got {threshold}")
    moment = second_moment.double()
    moment = (moment + moment.T) / 2  # eigh reads one triangle: make both the same
    values, vectors = torch.linalg.eigh(moment)  # ascending
    energy = torch.cumsum(values.clamp(min=0), 0)
    return vectors[:, energy <= threshold * energy[-1]]


def null_space_projection(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = Û Ûᵀ`` over :func:`null_space_basis` (float64)."""
    basis = null_space_basis(second_moment, threshold)
    return basis @ basis.T


def solve_projected_update(
    keys: torch.Tensor, residuals: torch.Tensor, projection: torch.Tensor, earlier: torch.Tensor, l2: float
) -> LowRankDelta:
    """AlphaEdit's ``ΔW`` for keys ``K`` (d_in × n) and residuals ``R`` (d_out × n), with ``earlier = Kₚ Kₚᵀ``,
    solved in float64 on the keys' device (``P`` and ``Kₚ Kₚᵀ`` are moved there)."""
    d_in = check_columns(keys, residuals)
    for name, matrix in (("projection", projection), ("earlier keys' moment", earlier)):
        if matrix.shape != (d_in, d_in):
            raise ValueError(f"the {name} must be {d_in} × {d_in}, got {tuple(matrix.shape)}")
    if l2 <= 0:
        raise ValueError(f"the L2 weight must be positive, got {l2}")
    k = keys.double()
    p = projection.to(k.device, torch.float64)
    identity = torch.eye(d_in, dtype=torch.float64, device=k.device)
    system = p @ (k @ k.T + earlier.to(k.device, torch.float64)) + l2 * identity
    down = torch.linalg.solve(system, p @ k).T
    return LowRankDelta(residuals.double(), down)


class NullSpace(WrittenKeys):
    """The projections of the edited layers; the keys every batch wrote there are counted as in :class:`WrittenKeys`.

    Everything stays on the projections' device; :meth:`state_tensors` are CPU copies.
    """

    state_prefix = "null_space"

    def __init__(self, projections: Mapping[int, torch.Tensor], l2: float) -> None:
        first = next(iter(projections.values()))
        super().__init__({layer: p.shape[0] for layer, p in projections.items()}, first.device)
        self.projections = {layer: p.double() for layer, p in projections.items()}
        self.l2 = l2

    @classmethod
    def from_moments(cls, moments: Mapping[int, torch.Tensor], threshold: float, l2: float) -> NullSpace:
        """One projection per layer from that layer's key second moment."""
        return cls({layer: null_space_projection(m, threshold) for layer, m in moments.items()}, l2)

    def solve_with(
        self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, written: torch.Tensor
    ) -> LowRankDelta:
        return solve_projected_update(keys, residuals, self.projections[layer], written, self.l2)
