"""The keys earlier batches wrote at each edited layer (``Kₚ Kₚᵀ``), counted in every later batch's solve.

The paper's solve ``ΔW = R Kᵀ (K Kᵀ + λC)⁻¹`` fits the batch's own keys and keeps typical keys (``λC``), but the
facts earlier batches wrote are neither: nothing keeps a later batch from moving them. AlphaEdit (Fang et al., ICLR
2025) adds ``Kₚ Kₚᵀ`` to its system, so each update also keeps the outputs those keys have now. :class:`WrittenKeys`
does that bookkeeping for any solve: :meth:`~WrittenKeys.solve` weighs a layer's update against the committed
batches' keys and the batch's pending ones (a refine round's solve keeps what its batch's first write landed), then
holds the new keys as pending; :meth:`~WrittenKeys.commit` adds them once the batch is in the model and
:meth:`~WrittenKeys.discard` drops them when it is not, so a failed batch leaves no trace.

:class:`CovarianceSolve` is the paper's solve with the written keys counted (``PMETHyperParams.keep_written``);
``methods/pmet/null_space.py`` is AlphaEdit's projected one, which always counts them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from transformer_patcher.methods.pmet.update import LowRankDelta, solve_update


class WrittenKeys:
    """``Kₚ Kₚᵀ`` per edited layer (float64, on ``device``) and the solve that counts it (:meth:`solve_with`)."""

    state_prefix = "written_keys"

    def __init__(self, dims: Mapping[int, int], device: torch.device | str) -> None:
        self.earlier = {layer: torch.zeros(d, d, dtype=torch.float64, device=device) for layer, d in dims.items()}
        self.pending: dict[int, torch.Tensor] = {}

    def solve_with(
        self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, written: torch.Tensor
    ) -> LowRankDelta:
        """A layer's update for ``keys`` (float64, on the layer's device) that keeps the ``written`` keys' outputs."""
        raise NotImplementedError

    def solve(
        self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, kept: torch.Tensor | None = None
    ) -> LowRankDelta:
        """A layer's update for ``keys``, weighed against every key already written there: the committed batches'
        and this batch's pending ones (and ``kept``, a moment of further keys to keep for this solve only). Without
        the pending ones, two rewrite rounds over a second dev batch of 100 left batch 1 at 0.48 instead of 0.60,
        perplexity +66 % instead of +17 % (docs/results.md, Issue 18, eighth round)."""
        earlier = self.earlier[layer]
        k = keys.to(earlier.device, torch.float64)
        pending = self.pending.get(layer)
        written = earlier if pending is None else earlier + pending
        if kept is not None:
            written = written + kept.to(earlier.device, torch.float64)
        delta = self.solve_with(layer, k, residuals, written)
        moment = k @ k.T  # a refine round (PMETHyperParams.refine_rounds) adds its keys to the batch's
        self.pending[layer] = moment if pending is None else pending + moment
        return delta

    def commit(self) -> None:
        for layer, moment in self.pending.items():
            self.earlier[layer] = self.earlier[layer] + moment
        self.pending = {}

    def discard(self) -> None:
        self.pending = {}

    def reset(self) -> None:
        """Forget every batch (what the solve depends on, the base model's statistics, stays)."""
        self.earlier = {layer: torch.zeros_like(m) for layer, m in self.earlier.items()}
        self.pending = {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.state_prefix}.{layer}.earlier": m.to("cpu", copy=True) for layer, m in self.earlier.items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.earlier = {
            layer: tensors[f"{self.state_prefix}.{layer}.earlier"].to(m.device, torch.float64, copy=True)
            for layer, m in self.earlier.items()
        }
        self.pending = {}


class CovarianceSolve(WrittenKeys):
    """The paper's ``ΔW = R Kᵀ (K Kᵀ + Kₚ Kₚᵀ + λC)⁻¹`` with the written keys ``Kₚ`` counted."""

    def __init__(self, covariances: Mapping[int, torch.Tensor], weight: float) -> None:
        first = next(iter(covariances.values()))
        super().__init__({layer: c.shape[0] for layer, c in covariances.items()}, first.device)
        self.covariances = {layer: c.double() for layer, c in covariances.items()}
        self.weight = weight

    def solve_with(
        self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, written: torch.Tensor
    ) -> LowRankDelta:
        return solve_update(keys, residuals, self.covariances[layer], self.weight, written)
