"""How far a change at each edited FFN's output carries to the logits on ordinary text: ``layer_weights`` for the
joint solve.

:func:`~transformer_patcher.methods.pmet.update.solve_joint` weighs each layer's write by ``λC``, the change it makes
to that layer's FFN output on typical keys. A change low in the model passes through every block above it, so the
same change there moves the logits more: on SmolLM2-135M, isotropic noise at block 0's FFN output moves them about
ten times as much (in squared norm) as the same noise at block 8's. Counting that as equal, the joint solve puts
more of a batch's write in the lower blocks, and perplexity rose with it (docs/results.md, Issue 18, twenty-fourth
round). :func:`logit_gains` measures the ratio, so the solve can weigh each layer's λ by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transformer_patcher.core.modes import eval_mode
from transformer_patcher.methods.pmet.architecture import block_modules, unwrap
from transformer_patcher.methods.pmet.targets import output_hooks, pad_rows


def logit_gains(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    scale: float = 0.05,
    repeats: int = 2,
    max_length: int = 128,
    seed: int = 0,
) -> list[float]:
    """For each edited block, ``E‖Δlogits‖² / E‖ε‖²`` with Gaussian noise ``ε`` (std ``scale`` per feature) added to
    its FFN output at every token of ``texts``, divided by the last block's: 1 at the z layer, more where a change
    carries further. Seeded, so the same model and texts give the same gains."""
    if not texts or not layers:
        raise ValueError("logit_gains needs at least one text and one layer")
    base = unwrap(model)
    device = next(base.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] for text in texts]
    ids, mask = pad_rows([row for row in rows if row], pad, device)
    kept = mask.bool()
    width = base.config.hidden_size  # what an FFN output projection writes into the residual stream
    generator = torch.Generator().manual_seed(seed)
    gains = []
    with eval_mode(model), torch.no_grad():
        clean = base(input_ids=ids, attention_mask=mask).logits.float()
        for layer in layers:
            name = block_modules(model, layer).ffn_out
            ratios = []
            for _ in range(repeats):
                noise = (torch.randn(*ids.shape, width, generator=generator) * scale).to(device)
                with output_hooks(base, {name: lambda out, noise=noise: out + noise.to(out.dtype)}):
                    moved = base(input_ids=ids, attention_mask=mask).logits.float() - clean
                ratios.append(float(moved[kept].pow(2).sum(-1).mean() / noise[kept].pow(2).sum(-1).mean()))
            gains.append(sum(ratios) / len(ratios))
    return [gain / gains[-1] for gain in gains]
