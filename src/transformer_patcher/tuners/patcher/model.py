"""``PatcherModel``: the peft tuner that wraps the last FFN with a ``PatcherLayer``, plus the public entry points."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import _get_in_out_features
from torch import nn

from transformer_patcher.core.errors import PatchMergeError, UnsupportedArchitectureError
from transformer_patcher.tuners.architectures import resolve_patch_target
from transformer_patcher.tuners.bounds import weight_scale
from transformer_patcher.tuners.fingerprint import AdapterWording, compute_fingerprint
from transformer_patcher.tuners.patcher.config import PATCHER, PatcherConfig
from transformer_patcher.tuners.patcher.gate import GateReads, block_list
from transformer_patcher.tuners.patcher.layer import MERGE_IMPOSSIBLE, PatcherLayer
from transformer_patcher.tuners.patcher.patch_file import group_patch_tensors
from transformer_patcher.tuners.patcher.schema import BARE_SUBJECTS, SPECS, SUBJECTS
from transformer_patcher.tuners.registration import quiet_peft_wrapping, register_peft_type
from transformer_patcher.tuners.tensor_schema import PEFT_KEY_PREFIX
from transformer_patcher.tuners.tuner import Scales, Tuner, wrap_model


class PatcherModel(Tuner):
    """Tuner for peft type ``"PATCHER"``. Use ``get_patcher_model`` or ``PatcherModel.from_pretrained``."""

    prefix: str = "patch_"
    tuner_layer_cls = PatcherLayer
    config_cls = PatcherConfig
    wording = AdapterWording(
        "patch set", "the patched FFN", "trained", "the patches will not do what they were trained for"
    )
    checkpoint_noun, checkpoint_verb = "patches", "patch"

    # --------------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: PatcherConfig, model_config: dict[str, Any]) -> PatcherConfig:
        """Resolve the FFN to exact names; check a saved patch set's sizes, base-model fingerprint and magnitudes
        against it (a new one records the fingerprint instead), before any change."""
        target = resolve_patch_target(
            self.model,
            target_modules=peft_config.target_modules,
            key_module=peft_config.key_module,
            layer_index=peft_config.layer_index,
            activation=peft_config.patch_activation,
        )
        modules = dict(self.model.named_modules())
        key, value = modules[target.key_module], _unwrapped(modules[target.value_module])
        query_dim, output_dim = _get_in_out_features(key)[0], _get_in_out_features(value)[1]
        self._check_against_model(
            peft_config,
            {target.value_module: (query_dim, output_dim)},
            lambda: compute_fingerprint(self.model, target, query_dim, output_dim),
            lambda _: _patch_scales(key, value),
        )
        gate = self._gate_module(peft_config, target.value_module)
        peft_config.target_modules = [target.value_module]
        peft_config.key_module = target.key_module
        peft_config.patch_activation = target.activation
        peft_config.gate_module = gate
        return peft_config

    def _gate_module(self, config: PatcherConfig, value_module: str) -> str | None:
        """The block the subject gate reads: ``config.gate_layer`` (or ``gate_depth`` of the way down) in the patched
        FFN's block list, written back into ``gate_layer``. Refused (``UnsupportedArchitectureError``) on a model that
        is not a decoder-only LM, and when ``gate_layer``, ``gate_depth`` and a saved ``gate_module`` disagree."""
        if config.gate_layer is None and config.gate_depth is None:
            if config.gate_module is not None:
                raise UnsupportedArchitectureError(f"gate_module={config.gate_module!r} is set without gate_layer")
            return None
        model_config = getattr(self.model, "config", None)
        can_generate = getattr(self.model, "can_generate", lambda: False)()
        if getattr(model_config, "is_encoder_decoder", False) or not can_generate:
            raise UnsupportedArchitectureError(
                "a subject gate (gate_layer, gate_depth) needs a decoder-only language model: it reads the text left "
                f"to right, and {type(self.model).__name__} is not one. Leave gate_layer and gate_depth None."
            )
        try:
            blocks, _ = block_list(self.model, value_module)
        except ValueError as error:
            raise UnsupportedArchitectureError(str(error)) from None
        count = len(self.model.get_submodule(blocks))
        layer = config.gate_layer
        if layer is not None and not -count <= layer < count:
            raise UnsupportedArchitectureError(f"gate_layer={layer} is out of range: '{blocks}' holds {count} blocks")
        if config.gate_depth is not None:
            at_depth = round(config.gate_depth * (count - 1))
            if layer is not None and layer % count != at_depth:
                raise UnsupportedArchitectureError(
                    f"gate_layer={layer} disagrees with gate_depth={config.gate_depth} (block {at_depth} of {count})"
                )
            layer = at_depth
        name = f"{blocks}.{layer % count}"
        if config.gate_module is not None and config.gate_module != name:
            raise UnsupportedArchitectureError(
                f"gate_module={config.gate_module!r} disagrees with gate_layer={layer} ('{name}' here)"
            )
        config.gate_layer = layer
        return name

    @classmethod
    def _declares_weights(cls, config: PatcherConfig) -> bool:
        return config.num_patches > 0

    def _new_layer(self, target: nn.Module, adapter_name: str, config: PatcherConfig) -> PatcherLayer:
        key = self.model.get_submodule(config.key_module)
        return PatcherLayer(target, key, adapter_name, config, self._gate_reads(config))

    def _gate_reads(self, config: PatcherConfig, layer: PatcherLayer | None = None) -> GateReads | None:
        """Hooks reading ``config``'s gate block (the layer's own when it already has them)."""
        name = config.gate_module
        if name is None:
            return None
        if layer is not None and name in layer.gates:
            return layer.gates[name]
        blocks, _ = block_list(self.model, name)
        owner = self.model.get_submodule(blocks.rpartition(".")[0]) if "." in blocks else self.model
        return GateReads(owner, self.model.get_submodule(name))

    def _add_to_layer(self, layer: PatcherLayer, adapter_name: str, config: PatcherConfig, module_name: str) -> None:
        if layer.key_module_name != config.key_module:
            raise ValueError(
                f"'{module_name}' is already patched with queries from '{layer.key_module_name}'; an adapter "
                f"reading '{config.key_module}' cannot share it."
            )
        layer.update_layer(adapter_name, config, self._gate_reads(config, layer))

    def _check_merge_allowed(self) -> None:
        raise PatchMergeError(MERGE_IMPOSSIBLE)

    # ------------------------------------------------------------------------------------------ state dict
    group_tensors = staticmethod(group_patch_tensors)

    @classmethod
    def _loadable_state_dict(
        cls, config: PatcherConfig, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A file from before the subject gate lacks the subject reads: its patches load ungated (zero rows); one from
        before the bare subject reads loads without them (zero rows)."""
        filled = dict(state_dict)
        for key, tensor in state_dict.items():
            prefix, _, name = key.rpartition(".")
            if name in ("patch_frozen_values", "patch_values"):
                for read in (SUBJECTS, BARE_SUBJECTS):
                    filled.setdefault(f"{prefix}.{read[SPECS[name].frozen]}", torch.zeros_like(tensor))
        return filled

    @classmethod
    def _layer_scales(cls, model: nn.Module, layers: Mapping[str, PatcherLayer]) -> Scales:
        modules = {name.removeprefix(PEFT_KEY_PREFIX): module for name, module in model.named_modules()}
        return {
            name: _patch_scales(modules[layer.key_module_name], layer.get_base_layer())
            for name, layer in layers.items()
        }

    # ------------------------------------------------------------------------------------------- accessors
    def patch_layers(self, adapter_name: str | None = None) -> dict[str, PatcherLayer]:
        """Every patched FFN (module name → layer), optionally only those holding ``adapter_name``."""
        return self._layers(adapter_name)

    def patch_layer(self, adapter_name: str | None = None) -> PatcherLayer:
        """The patch layer of ``adapter_name`` (default: the active adapter)."""
        name = self._adapter(adapter_name or None)
        layers = list(self.patch_layers(name).values())
        if not layers:
            raise KeyError(f"no patch adapter named {name!r} (have {sorted(self.peft_config)})")
        return layers[0]


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, PatcherLayer) else module


def _patch_scales(key_module: nn.Module, value_module: nn.Module) -> dict[str, float]:
    """What bounds each patch tensor: keys and biases meet the FFN's key weights, values add to its value weights."""
    key = weight_scale(key_module)
    return {"patch keys": key, "patch biases": key, "patch values": weight_scale(value_module)}


def get_patcher_model(
    model: nn.Module, config: PatcherConfig | None = None, adapter_name: str = "default"
) -> PeftModel:
    """Wrap ``model`` so that its last FFN (or the one ``config`` names) can grow patch neurons.

    The wrapper takes the model's train/eval mode (a fresh ``PeftModel`` claims training even around an eval model).
    """
    return wrap_model(model, config or PatcherConfig(), adapter_name)


def register() -> None:
    """Idempotently make peft aware of PatcherConfig/PatcherModel; runs when this module is imported (which the
    package's ``__init__`` arranges as soon as peft is imported)."""
    register_peft_type(PATCHER, PatcherConfig, PatcherModel)
    quiet_peft_wrapping()


register()
