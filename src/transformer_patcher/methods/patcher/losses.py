"""The three Transformer-Patcher losses, written on patch pre-activations ``a = q·k + b`` as in the official code.

Shapes follow the official implementation so the top-k sets match it exactly: ``a_e`` is (copies, n_patches), the
pre-activation of patch i on its own edit position in each repeated copy; ``a_mem`` is (n_memory, n_patches). The
memory loss broadcasts to (n_memory, copies, n_patches) before taking the top-k, as the official code does.
"""

from __future__ import annotations

import torch


def topk_exp_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """``S_k(exp(x))``: mean of the k largest ``exp`` entries (exp is monotone, so top-k is taken before it)."""
    flat = x.reshape(-1)
    return torch.topk(flat, min(k, flat.numel())).values.exp().mean()


def activation_loss(a_e: torch.Tensor, top_k: int = 5, margin: float = 0.0) -> torch.Tensor:
    """``S_k(exp(margin − a_e))``: pushes each new patch to fire (a_e > margin) on its own mistake."""
    return topk_exp_mean(margin - a_e, top_k)


def memory_loss(
    a_mem: torch.Tensor, a_e: torch.Tensor, top_k: int = 1000, gamma: float = 3.0, beta: float = -3.0
) -> torch.Tensor:
    """``l1 + l2``: memory queries must stay ``gamma`` below the edit activation (l1) and below ``beta`` (l2)."""
    copies = a_e.shape[0]
    l1 = a_mem[:, None, :] - a_e[None, :, :] + gamma
    l2 = (a_mem - beta)[:, None, :].expand(-1, copies, -1)
    return topk_exp_mean(l1, top_k) + topk_exp_mean(l2, top_k)
