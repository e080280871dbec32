"""The closed-form FFN update of PMET/MEMIT, kept as its two low-rank factors.

For one layer with keys ``K`` (d_in × n, one column per request), residuals ``R`` (d_out × n) and key second moment
``C`` (d_in × d_in), the update is ``ΔW = R Kᵀ (K Kᵀ + λC)⁻¹``: the ΔW that minimises ``‖ΔW K − R‖² + λ·tr(ΔW C ΔWᵀ)``,
i.e. fits the new values while moving the outputs of typical keys (weighted by C) as little as possible. It is the
product of ``A = R`` (d_out × n) and ``B = Kᵀ (K Kᵀ + λC)⁻¹`` (n × d_in), so its rank is at most the number of
requests; the adapter stores ``A`` and ``B`` as they come out of the formula — nothing is fitted afterwards.

Across the edited layers the residual is spread: PMET divides layer i's share by ``sqrt(L − i)``, MEMIT by ``L − i``.
The ``"joint"`` spread (not the papers') fixes no share: :func:`solve_joint` fits the residual with every remaining
layer's write at once, each weighed by its own ``λC``, so a fact is written most where its key stands out from typical
text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FIXED_SPREADS = ("pmet", "memit")  # a fixed share of the residual per layer (residual_share)
SPREADS = (*FIXED_SPREADS, "joint")  # "joint": solve_joint splits it


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
    if spread not in FIXED_SPREADS:
        raise ValueError(f"a fixed residual share needs a spread of {FIXED_SPREADS}, got {spread!r}")
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


def penalty(
    second_moment: torch.Tensor, weight: float, kept: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """``S = λC (+ Kₚ Kₚᵀ)``, float64 on ``device``: what a solve adds to ``K Kᵀ`` to keep typical keys' outputs (and
    the kept keys')."""
    system = weight * second_moment.to(device, torch.float64)
    return system if kept is None else system + kept.to(device, torch.float64)


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
    system = k @ k.T + penalty(second_moment, weight, written, k.device)  # symmetric positive definite when C is
    down = torch.linalg.solve(system, k).T  # Kᵀ A⁻¹ = (A⁻¹ K)ᵀ since A is symmetric
    return LowRankDelta(residuals.double(), down)


def joint_gram(
    keys: Sequence[torch.Tensor], systems: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``S_m⁻¹ K_m`` per layer and ``G = Σ_m K_mᵀ S_m⁻¹ K_m`` (n × n, float64) of :func:`solve_joint`. A direction
    of the residuals along an eigenvector of ``G`` with eigenvalue ``g`` keeps ``1 / (1 + g)`` of itself in the
    misfit, so ``G``'s spectrum says how many facts the layers' key spaces hold against the penalties."""
    pairs = zip(keys, systems, strict=True)
    solved = [torch.linalg.solve(s.to(k.device, torch.float64), k.double()) for k, s in pairs]
    return solved, sum(k.double().T @ x for k, x in zip(keys, solved, strict=True))


def solve_joint(keys: Sequence[torch.Tensor], residuals: torch.Tensor, systems: Sequence[torch.Tensor]) -> LowRankDelta:
    """The first layer's part of the writes over layers ``m = 0 … M−1`` that fit ``R`` together.

    With keys ``K_m`` (d_m × n) and penalties ``S_m`` (d_m × d_m: ``λC_m``, plus the moment of keys to keep), the
    ``ΔW_m`` that minimise ``‖Σ_m ΔW_m K_m − R‖² + Σ_m tr(ΔW_m S_m ΔW_mᵀ)`` are ``ΔW_m = R (I + G)⁻¹ K_mᵀ S_m⁻¹``
    with ``G = Σ_m K_mᵀ S_m⁻¹ K_m`` (n × n): setting each gradient to zero gives ``ΔW_m = E K_mᵀ S_m⁻¹`` for the
    misfit ``E = R − Σ_m ΔW_m K_m``, so ``E = R − E G``. A fact's column of ``G`` is large at a layer where its key
    is unlike typical keys, and that layer takes more of it. With one layer this is :func:`solve_update` (the
    push-through identity). The layer loop writes only the first part and solves again at the next layer, from the
    keys and residuals the write left."""
    if not keys or len(keys) != len(systems):
        raise ValueError(f"need one penalty per layer's keys, got {len(keys)} keys and {len(systems)} penalties")
    for k, system in zip(keys, systems, strict=True):
        d_in = check_columns(k, residuals)
        if system.shape != (d_in, d_in):
            raise ValueError(f"a penalty must be {d_in} × {d_in} like its keys, got {tuple(system.shape)}")
    solved, gram = joint_gram(keys, systems)
    lifted = gram + torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)  # I + G, symmetric
    up = torch.linalg.solve(lifted, residuals.double().T).T  # R (I + G)⁻¹
    return LowRankDelta(up, solved[0].T)
