"""The modules PMET reads and writes in one decoder block, found from the patch adapter's FFN registry.

Per edited block PMET needs the FFN output projection (whose input is the key ``k`` and whose weight receives ΔW),
the attention output projection (where ``δ_attn`` is added while optimising targets) and the block itself (whose
output is the residual stream the MEMIT ablation targets). Only decoder-only causal LMs qualify: the edit is a
next-token distribution after a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from transformer_patcher.core.errors import UnsupportedArchitectureError
from transformer_patcher.tuners.architectures import resolve_patch_target

# Attention output projections, relative to the block, in the order they are tried.
ATTENTION_OUTPUTS = (
    "self_attn.o_proj",
    "attn.c_proj",
    "attention.dense",
    "attn.out_proj",
    "self_attn.out_proj",
    "self_attn.dense",
)


@dataclass(frozen=True)
class BlockModules:
    """Exact module names of one decoder block (relative to the unwrapped model)."""

    layer: int
    block: str
    attention_out: str
    ffn_out: str


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def block_modules(model: nn.Module, layer: int) -> BlockModules:
    """Resolve block ``layer`` of a decoder-only LM; ``UnsupportedArchitectureError`` says what is missing."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or base.get_output_embeddings() is None:
        raise UnsupportedArchitectureError(
            f"PMET edits decoder-only causal language models (LLaMA, GPT-2, GPT-NeoX families); "
            f"{type(base).__name__} is not one"
        )
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if n_layers is not None and not -n_layers <= layer < n_layers:
        raise UnsupportedArchitectureError(f"layer {layer} does not exist: {type(base).__name__} has {n_layers} blocks")
    target = resolve_patch_target(base, layer_index=layer)
    parts = target.value_module.split(".")
    index = str(target.layer)
    if index not in parts:
        raise UnsupportedArchitectureError(f"cannot tell which block '{target.value_module}' belongs to")
    block = ".".join(parts[: len(parts) - parts[::-1].index(index)])
    names = {name for name, _ in base.named_modules()}
    attention = next((f"{block}.{a}" for a in ATTENTION_OUTPUTS if f"{block}.{a}" in names), None)
    if attention is None:
        raise UnsupportedArchitectureError(
            f"block '{block}' has no attention output projection PMET knows ({', '.join(ATTENTION_OUTPUTS)})"
        )
    return BlockModules(int(target.layer), block, attention, target.value_module)
