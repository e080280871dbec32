"""Patch keys with a known pre-activation: the paper's initialisation and its exact-silence variant."""

from __future__ import annotations

import torch


def init_key(query: torch.Tensor, preactivation: float = 1.0, silent: torch.Tensor | None = None) -> torch.Tensor:
    """A key ``k`` with ``k·query = preactivation``.

    Without ``silent`` this is the paper's initialisation ``k = q/‖q‖²`` (scaled). With ``silent`` (rows of queries
    the patch must not see) the key is the part of ``query`` orthogonal to their span, so ``k·s = 0`` for every silent
    row: with bias ``b < 0`` the patch's pre-activation there is exactly ``b``.
    """
    q = query.detach().double().reshape(-1)
    if silent is not None and silent.numel():
        basis, _ = torch.linalg.qr(silent.detach().double().reshape(-1, q.numel()).T)
        q = q - basis @ (basis.T @ q)
    norm_sq = q @ q
    if norm_sq <= 1e-12 * max(float(query.double().norm()) ** 2, 1e-30):
        raise ValueError("the query lies in the span of the silent queries; no key can separate them")
    return (q * preactivation / norm_sq).to(query.dtype)
