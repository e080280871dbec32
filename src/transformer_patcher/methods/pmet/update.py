"""The closed-form FFN update of PMET/MEMIT, kept as its two low-rank factors.

For one layer with keys ``K`` (d_in × n, one column per request), residuals ``R`` (d_out × n) and key second moment
``C`` (d_in × d_in), the update is ``ΔW = R Kᵀ (K Kᵀ + λC)⁻¹``: the ΔW that minimises ``‖ΔW K − R‖² + λ·tr(ΔW C ΔWᵀ)``,
i.e. fits the new values while moving the outputs of typical keys (weighted by C) as little as possible. It is the
product of ``A = R`` (d_out × n) and ``B = Kᵀ (K Kᵀ + λC)⁻¹`` (n × d_in), so its rank is at most the number of
requests; the adapter stores ``A`` and ``B`` as they come out of the formula — nothing is fitted afterwards.

Across the edited layers the residual is spread: PMET divides layer i's share by ``sqrt(L − i)``, MEMIT by ``L − i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPREADS = ("pmet", "memit")


@dataclass
class LowRankDelta:
    """``ΔW = up @ down`` for one weight: ``up`` (d_out × r), ``down`` (r × d_in), float64 as computed."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def dense(self) -> torch.Tensor:
        return self.up @ self.down

    def joined(self, other: LowRankDelta) -> LowRankDelta:
        """``self + other``, as the factors side by side (rank adds up)."""
        return LowRankDelta(torch.cat([self.up, other.up], dim=1), torch.cat([self.down, other.down], dim=0))


def residual_share(position: int, n_layers: int, spread: str = "pmet") -> float:
    """The factor on layer ``position``'s (0-based among ``n_layers`` edited layers) residual."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    if not 0 <= position < n_layers:
        raise ValueError(f"position must lie in [0, {n_layers}), got {position}")
    remaining = n_layers - position
    return 1.0 / math.sqrt(remaining) if spread == "pmet" else 1.0 / remaining


def check_columns(keys: torch.Tensor, residuals: torch.Tensor) -> int:
    """``d_in`` of keys (d_in × n) and residuals (d_out × n) that share their n columns; a ValueError otherwise."""
    if keys.dim() != 2 or residuals.dim() != 2 or keys.shape[1] != residuals.shape[1]:
        raise ValueError(
            f"keys (d_in × n) and residuals (d_out × n) must share n columns; got {tuple(keys.shape)} and "
            f"{tuple(residuals.shape)}"
        )
    return keys.shape[0]


def solve_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    second_moment: torch.Tensor,
    weight: float,
    written: torch.Tensor | None = None,
) -> LowRankDelta:
    """``ΔW = R Kᵀ (K Kᵀ + λC)⁻¹`` as ``(R, Kᵀ (K Kᵀ + λC)⁻¹)``, solved in float64 (a solve, not an inverse) on the
    keys' device (``C`` is moved there). With ``written = Kₚ Kₚᵀ`` (keys to keep: those earlier batches wrote, or
    the facts' prompts' other tokens) the system is ``K Kᵀ + Kₚ Kₚᵀ + λC``: the update also keeps those keys'
    outputs, as AlphaEdit's solve does."""
    d_in = check_columns(keys, residuals)
    for name, matrix in (("second moment", second_moment), ("written keys' moment", written)):
        if matrix is not None and matrix.shape != (d_in, d_in):
            raise ValueError(f"the {name} must be {d_in} × {d_in}, got {tuple(matrix.shape)}")
    if weight <= 0:
        raise ValueError(f"the covariance weight λ must be positive, got {weight}")
    k = keys.double()
    system = k @ k.T + weight * second_moment.to(k.device, torch.float64)  # symmetric positive definite when C is
    if written is not None:
        system = system + written.to(k.device, torch.float64)
    down = torch.linalg.solve(system, k).T  # Kᵀ A⁻¹ = (A⁻¹ K)ᵀ since A is symmetric
    return LowRankDelta(residuals.double(), down)
