"""Where "the last FFN" is in each architecture.

A patch reads the FFN *input* q (captured on the key-side projection) and adds ``act(q·K + b)·V`` to the output of
the value-side projection, so every architecture is described by two module names and the config attribute holding
its FFN activation. For encoder-decoders the decoder FFN is patched, as in the paper (BART on zsRE).

Gated MLPs (LLaMA, Mistral, Qwen, Gemma, Phi-3) get a plain neuron ``act(q·k + b)·v`` whose q is the gate/up input:
the paper's activation and memory losses are margins on one pre-activation ``a = q·k + b``. A gated triple
``act(q·k_g)·(q·k_u)·v`` has no single sign condition for "silent" (its up factor is unbounded), so those margins
would no longer guarantee locality.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from transformer_patcher.core.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class FFNSpec:
    """One way an architecture names its FFN: a value-module regex and key-module templates."""

    value: str  # regex over module names with groups (?P<p>...) for the prefix and (?P<i>\d+) for the layer
    keys: tuple[str, ...]  # key-module templates tried in order (e.g. T5's ``wi`` then gated ``wi_0``)


@dataclass(frozen=True)
class PatchTarget:
    """The resolved FFN to patch: exact module names, the patch activation and the layer index."""

    value_module: str
    key_module: str
    activation: str
    layer: int | None


_BERT = FFNSpec(r"(?P<p>.*)encoder\.layer\.(?P<i>\d+)\.output\.dense", ("{p}encoder.layer.{i}.intermediate.dense",))
_DECODER_FC = FFNSpec(r"(?P<p>.*)decoder\.layers\.(?P<i>\d+)\.fc2", ("{p}decoder.layers.{i}.fc1",))
_GATED = FFNSpec(r"(?P<p>.*)layers\.(?P<i>\d+)\.mlp\.down_proj", ("{p}layers.{i}.mlp.gate_proj",))

ARCHITECTURES: dict[str, tuple[FFNSpec, ...]] = {
    "bert": (_BERT,),
    "roberta": (_BERT,),
    "electra": (_BERT,),
    "distilbert": (
        FFNSpec(r"(?P<p>.*)transformer\.layer\.(?P<i>\d+)\.ffn\.lin2", ("{p}transformer.layer.{i}.ffn.lin1",)),
    ),
    "bart": (_DECODER_FC,),
    "mbart": (_DECODER_FC,),
    "opt": (_DECODER_FC,),
    "t5": (
        FFNSpec(
            r"(?P<p>.*)decoder\.block\.(?P<i>\d+)\.layer\.2\.DenseReluDense\.wo",
            ("{p}decoder.block.{i}.layer.2.DenseReluDense.wi", "{p}decoder.block.{i}.layer.2.DenseReluDense.wi_0"),
        ),
        # T5EncoderModel has no decoder: fall back to the encoder's last FFN.
        FFNSpec(
            r"(?P<p>.*)encoder\.block\.(?P<i>\d+)\.layer\.1\.DenseReluDense\.wo",
            ("{p}encoder.block.{i}.layer.1.DenseReluDense.wi", "{p}encoder.block.{i}.layer.1.DenseReluDense.wi_0"),
        ),
    ),
    "gpt2": (FFNSpec(r"(?P<p>.*)h\.(?P<i>\d+)\.mlp\.c_proj", ("{p}h.{i}.mlp.c_fc",)),),
    "gpt_neox": (FFNSpec(r"(?P<p>.*)layers\.(?P<i>\d+)\.mlp\.dense_4h_to_h", ("{p}layers.{i}.mlp.dense_h_to_4h",)),),
    "llama": (_GATED,),
    "mistral": (_GATED,),
    "qwen2": (_GATED,),
    "qwen3": (_GATED,),
    "gemma": (_GATED,),
    "gemma2": (_GATED,),
    "gemma3": (_GATED,),
    "gemma3_text": (_GATED,),
    "phi3": (FFNSpec(r"(?P<p>.*)layers\.(?P<i>\d+)\.mlp\.down_proj", ("{p}layers.{i}.mlp.gate_up_proj",)),),
}

_ACT_ATTRS = ("hidden_activation", "hidden_act", "activation_function", "dense_act_fn", "activation")
_EXPERT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
_FFN_WIDTH_ATTRS = ("intermediate_size", "ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner", "hidden_dim")
_HIDDEN_ATTRS = ("hidden_size", "d_model", "n_embd", "dim")

HOW_TO_OVERRIDE = (
    "Pass the module names explicitly: PatcherConfig(target_modules=['<full name of the FFN output projection>'], "
    "key_module='<full name of the FFN input projection>')."
)


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def _config_value(config: object, attrs: tuple[str, ...]) -> object | None:
    for attr in attrs:
        value = getattr(config, attr, None)
        if value is not None:
            return value
    return None


def _text_config(model: nn.Module) -> object | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def hidden_size_of(model: nn.Module) -> int | None:
    value = _config_value(_text_config(model), _HIDDEN_ATTRS)
    return int(value) if value is not None else None


def _model_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules as the base model has them: tuner wrappers replaced by the projection they wrap."""
    return {
        name: module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        for name, module in model.named_modules()
        if not any(part == "base_layer" or part.startswith("patch_") for part in name.split("."))
    }


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _pick_layer(indices: list[int], layer_index: int, where: str) -> int:
    ordered = sorted(set(indices))
    try:
        return ordered[layer_index]
    except IndexError:
        raise UnsupportedArchitectureError(
            f"layer_index={layer_index} is out of range: {where} has FFN layers {ordered[0]}..{ordered[-1]} "
            f"({len(ordered)} layers; negative values count from the last)."
        ) from None


def _from_registry(modules: dict[str, nn.Module], specs: tuple[FFNSpec, ...], layer_index: int):
    for spec in specs:
        matches = [(m, name) for name in modules if (m := re.fullmatch(spec.value, name))]
        if not matches:
            continue
        layer = _pick_layer([int(m["i"]) for m, _ in matches], layer_index, "the model")
        match, value_name = next((m, n) for m, n in matches if int(m["i"]) == layer)
        for template in spec.keys:
            key_name = template.format(p=match["p"], i=layer)
            if key_name in modules:
                return value_name, key_name, layer
    return None


def _key_for_value(modules: dict[str, nn.Module], value_name: str) -> str | None:
    """Derive the key module of an explicitly named value module from the registry patterns, if one matches."""
    for specs in ARCHITECTURES.values():
        for spec in specs:
            match = re.fullmatch(spec.value, value_name)
            if match is None:
                continue
            for template in spec.keys:
                key_name = template.format(p=match["p"], i=int(match["i"]))
                if key_name in modules:
                    return key_name
    return None


def _from_heuristic(model: nn.Module, modules: dict[str, nn.Module], layer_index: int):
    """Fallback for unregistered types: last block list of num_hidden_layers blocks, last (H→I, I→H) pair inside."""
    config = _text_config(model)
    n_layers = _config_value(config, _LAYER_COUNT_ATTRS)
    hidden = hidden_size_of(model)
    if n_layers is None or hidden is None:
        return None
    lists = [(name, m) for name, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not lists:
        return None
    # Encoder-decoders: the decoder's FFN is the one patched, as in the paper.
    decoder_lists = [item for item in lists if "decoder" in item[0]]
    list_name, blocks = (decoder_lists or lists)[-1]
    layer = _pick_layer(list(range(len(blocks))), layer_index, f"'{list_name}'")
    widths = {int(w) for w in [_config_value(config, _FFN_WIDTH_ATTRS), 4 * hidden] if w is not None}
    prefix = f"{list_name}.{layer}."
    order = {name: i for i, name in enumerate(modules)}
    keys, values = [], []
    for name, module in modules.items():
        if not name.startswith(prefix) or not _is_projection(module):
            continue
        d_in, d_out = _get_in_out_features(module)
        if d_in == hidden and d_out in widths:
            keys.append((name, d_out))
        elif d_out == hidden and d_in in widths:
            values.append((name, d_in))
    for value_name, width in reversed(values):
        candidates = [k for k, w in keys if w == width and order[k] < order[value_name]]
        if candidates:
            return value_name, candidates[-1], layer
    return None


def _activation(model: nn.Module, requested: str | None) -> str:
    if requested is not None:
        return requested
    value = _config_value(_text_config(model), _ACT_ATTRS)
    if isinstance(value, str):
        # T5 spells gated activations "gated-gelu"; the patch neuron itself is never gated.
        return {"gated-gelu": "gelu_new", "gated-silu": "silu"}.get(value, value)
    return "gelu"


def _check_not_moe(model: nn.Module) -> None:
    experts = _config_value(_text_config(model), _EXPERT_ATTRS)
    model_type = model_type_of(model) or type(model).__name__
    if (isinstance(experts, int) and experts > 1) or "moe" in model_type.lower() or model_type == "mixtral":
        raise UnsupportedArchitectureError(
            f"'{model_type}' routes tokens through a mixture of experts; Transformer-Patcher patches one dense FFN "
            f"and does not support MoE blocks. Supported model types: {', '.join(supported_model_types())}. "
            "If it also has a dense FFN to patch: " + HOW_TO_OVERRIDE
        )


def resolve_patch_target(
    model: nn.Module,
    *,
    target_modules: list[str] | str | None = None,
    key_module: str | None = None,
    layer_index: int = -1,
    activation: str | None = None,
) -> PatchTarget:
    """Find the FFN to patch: explicit names win, then the registry, then the fallback heuristic."""
    modules = _model_modules(model)
    model_type = model_type_of(model)
    if target_modules is not None:
        probe = type(
            "_Probe",
            (),
            {
                "target_modules": target_modules,
                "exclude_modules": None,
                "layers_to_transform": None,
                "layers_pattern": None,
            },
        )()
        matched = [name for name in modules if name and check_target_module_exists(probe, name)]
        if len(matched) != 1:
            raise UnsupportedArchitectureError(
                f"target_modules={target_modules!r} must name exactly one FFN output projection, but it matched "
                f"{len(matched)} modules{': ' + ', '.join(matched[:8]) if matched else ''}. A patch set extends one "
                "FFN; give the full module name, or create one adapter per layer."
            )
        value_name = matched[0]
        key_name = key_module or _key_for_value(modules, value_name)
        if key_name is None:
            raise UnsupportedArchitectureError(
                f"Cannot tell which module feeds the FFN whose output is '{value_name}'. " + HOW_TO_OVERRIDE
            )
        found = (value_name, key_name, None)
    else:
        _check_not_moe(model)
        found = None
        if model_type in ARCHITECTURES:
            found = _from_registry(modules, ARCHITECTURES[model_type], layer_index)
        found = found or _from_heuristic(model, modules, layer_index)
        if found is None:
            raise UnsupportedArchitectureError(
                f"Could not find a feed-forward block to patch in this '{model_type or type(model).__name__}' "
                f"model. Supported model types: {', '.join(supported_model_types())}; other models are searched "
                "for a (hidden→intermediate, intermediate→hidden) projection pair in their last block. "
                + HOW_TO_OVERRIDE
            )
        if key_module is not None:
            found = (found[0], key_module, found[2])
    value_name, key_name, layer = found
    for role, name in (("value", value_name), ("key", key_name)):
        if name not in modules:
            raise UnsupportedArchitectureError(f"The {role} module '{name}' does not exist in this model.")
        if not _is_projection(modules[name]):
            raise UnsupportedArchitectureError(
                f"The {role} module '{name}' is a {type(modules[name]).__name__}; patches need an nn.Linear or "
                "transformers Conv1D projection."
            )
    return PatchTarget(value_name, key_name, _activation(model, activation), layer)
