"""Patch keys and pre-activations: the paper's initialisation, its exact-silence variant and the separating key.

``preactivation`` is the one place the patch pre-activation ``a = q·K + b`` is computed: the layer's forward pass,
the memory loss and the initialisation all call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preactivation(query: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``a = q·K + b`` for queries (..., d), keys (n, d) and biases (n,): shape (..., n)."""
    return F.linear(query, keys, bias)


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


def discriminant(
    query: torch.Tensor,
    mean: torch.Tensor,
    precision: torch.Tensor,
    silent: torch.Tensor | None = None,
    views: torch.Tensor | None = None,
    scatter: float = 1.0,
    contrasts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fisher's discriminant between one query and a distribution (mean, precision = inverse covariance).

    Returns ``w = P(q − μ) / ((q − μ)ᵀP(q − μ))``, scaled so that ``w·(q − μ) = 1``: the score ``t(x) = w·(x − μ)``
    is 1 on the query and 0 on the mean. Raw FFN queries share a large common component (the paper's key
    ``q/‖q‖²`` scores typical memory rows at 0.8 and the query's rephrase at 0.97); whitening removes it, so memory
    rows score near 0 while rephrases keep most of the query's score. ``silent`` rows (a few memory rows that score
    as high as the query, e.g. the same local context in running text) are projected out: they score exactly 0.

    ``views`` (k, d) are other readings of the same input (behind a prefix, in another prompt format). The key then
    is two-class LDA, ``w ∝ (Σ + scatter·S_v)⁻¹ (v̄ − μ)`` over the views and the query (mean ``v̄``, scatter
    ``S_v``): a direction in which the wording around the input moves its query counts against the key, so a
    rephrase, which moves it the same way, keeps more of the edit's score. Still scaled so the query scores 1.

    ``contrasts`` (m, d) replace the distribution as the other class: ``w ∝ (Σ + scatter·(S_v + S_c))⁻¹ (v̄ − c̄)``,
    the direction that tells the edit from those inputs, with Σ still weighing down what varies across everything.
    """
    query = query.reshape(-1)
    centred = query.double() - mean.double()
    p = precision.double()
    others = None if contrasts is None or not contrasts.numel() else contrasts.double().reshape(-1, centred.numel())
    if (views is None or not views.numel()) and others is None:
        w = p @ centred
    else:
        readings = torch.cat([query[None].double(), *([] if views is None else [views.double().reshape(-1, len(p))])])
        classes = [readings] if others is None else [readings, others]
        # (d, k): the classes' scatter S = U Uᵀ
        spread = torch.cat([(x - x.mean(0)).T * (scatter / len(x)) ** 0.5 for x in classes], dim=1)
        w = p @ (readings.mean(0) - (mean.double() if others is None else others.mean(0)))
        pu = p @ spread  # Woodbury: (Σ + U Uᵀ)⁻¹ = P − P U (I + Uᵀ P U)⁻¹ Uᵀ P
        w = w - pu @ torch.linalg.solve(torch.eye(spread.shape[1], dtype=w.dtype) + spread.T @ pu, spread.T @ w)
    if silent is not None and silent.numel():
        basis, _ = torch.linalg.qr((silent.double().reshape(-1, centred.numel()) - mean.double()).T)
        w = w - basis @ (basis.T @ w)
    score = w @ centred
    if score <= 1e-9 * float(w.norm() * centred.norm()):
        raise ValueError("the query cannot be told apart from the silent rows along any direction")
    return (w / score).to(query.dtype)


def separating_scale(
    t_max: float, target: float, ceiling: float, slack: float = 1.0, limit: float = 1e3
) -> float | None:
    """The scale ``s`` of ``a(x) = s·(t(x) − 1) + target`` that puts the highest memory score ``t_max`` at
    ``ceiling − slack`` while the query keeps ``a = target``, capped at ``limit``.

    A memory row scoring above the query (``t_max > 1``) cannot be silenced along this direction. The key is then as
    sharp as the memory loss allows (that row at most 40 above the query, so ``exp`` stays finite in float32), which
    keeps it silent below ``t = 1 − (target − ceiling)/s``; when that threshold would fall below ``t = 1/2`` the
    patch could not stay local, and None says so."""
    needed = target - ceiling + slack
    gap = 1.0 - t_max
    if gap >= 0:
        return 1.0 if needed <= 0 else (limit if gap == 0 else min(limit, max(1.0, needed / gap)))
    scale = min(limit, 40.0 / -gap)
    return scale if scale >= 2 * needed else None
