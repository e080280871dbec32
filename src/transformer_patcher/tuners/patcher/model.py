"""``PatcherModel``: the peft tuner that wraps the last FFN with a ``PatcherLayer``, plus the public entry points."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, _get_in_out_features
from torch import nn

from transformer_patcher.core.errors import PatchMergeError
from transformer_patcher.tuners.architectures import resolve_patch_target
from transformer_patcher.tuners.bounds import check_magnitudes, weight_scale
from transformer_patcher.tuners.fingerprint import PATCH_WORDING, compute_fingerprint, settle_fingerprint
from transformer_patcher.tuners.patcher.config import PatcherConfig
from transformer_patcher.tuners.patcher.layer import MERGE_IMPOSSIBLE, PatcherLayer
from transformer_patcher.tuners.patcher.patch_file import (
    PEFT_KEY_PREFIX,
    check_checkpoint_covers,
    check_dims_fit,
    group_patch_tensors,
    layers_holding,
)


class PatcherModel(BaseTuner):
    """Tuner for peft type ``"PATCHER"``. Use ``get_patcher_model`` or ``PatcherModel.from_pretrained``."""

    prefix: str = "patch_"
    tuner_layer_cls = PatcherLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

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
        path, shapes = getattr(peft_config, "checked_weights", (None, {}))  # set when loaded from a folder
        check_dims_fit(shapes, {target.value_module: (query_dim, output_dim)}, str(path), "patches")
        # transformers' load_adapter builds the config without the package reading the folder: patches say it is saved
        saved = (
            hasattr(peft_config, "checked_weights")
            or peft_config.num_patches > 0
            or peft_config.fingerprint is not None
        )
        actual = compute_fingerprint(self.model, target, query_dim, output_dim)
        settle_fingerprint(peft_config, actual, PATCH_WORDING, saved)
        scales = {target.value_module: _patch_scales(key, value)}
        check_magnitudes({module: shape.magnitudes for module, shape in shapes.items()}, scales, str(path))
        peft_config.target_modules = [target.value_module]
        peft_config.key_module = target.key_module
        peft_config.patch_activation = target.activation
        return peft_config

    def _create_and_replace(
        self,
        peft_config: PatcherConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, PatcherLayer):
            if target.key_module_name != peft_config.key_module:
                raise ValueError(
                    f"'{current_key}' is already patched with queries from '{target.key_module_name}'; an adapter "
                    f"reading '{peft_config.key_module}' cannot share it."
                )
            target.update_layer(adapter_name, peft_config)
            return
        key_module = self.model.get_submodule(peft_config.key_module)
        setattr(parent, target_name, PatcherLayer(target, key_module, adapter_name, peft_config))

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Patches are already on the FFN's execution device; peft's default would move them to the weight's device,
        # which is `meta` for an offloaded layer.
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Patch dtype is set by ``PatcherConfig.patch_dtype``; peft's generic up-casting does not apply."""

    def _check_merge_allowed(self) -> None:
        raise PatchMergeError(MERGE_IMPOSSIBLE)

    # ------------------------------------------------------------------------------------------ state dict
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PatcherConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Validate a checkpoint (also against the model's weights) and resize the patch tensors to its counts, before
        peft loads it. Loading into an existing adapter reaches only this check, never ``_prepare_adapter_config``."""
        source = f"adapter '{adapter_name}'"
        groups, shapes = group_patch_tensors(state_dict, source=source)
        layers = layers_holding(model, PatcherLayer, adapter_name, "patch_keys")
        check_checkpoint_covers(groups, layers, noun="patches", verb="patch")
        dims = {name: (layer.query_dim, layer.output_dim) for name, layer in layers.items()}
        check_dims_fit(shapes, dims, source, "patches")
        modules = {name.removeprefix(PEFT_KEY_PREFIX): module for name, module in model.named_modules()}
        scales = {
            name: _patch_scales(modules[layer.key_module_name], layer.get_base_layer())
            for name, layer in layers.items()
        }
        check_magnitudes({module: shape.magnitudes for module, shape in shapes.items()}, scales, source)
        for module_name, shape in shapes.items():
            layers[module_name].resize_for_load(adapter_name, shape)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # ------------------------------------------------------------------------------------------- accessors
    def patch_layers(self, adapter_name: str | None = None) -> dict[str, PatcherLayer]:
        """Every patched FFN (module name → layer), optionally only those holding ``adapter_name``."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, PatcherLayer) and (adapter_name is None or adapter_name in module.patch_keys)
        }

    def patch_layer(self, adapter_name: str | None = None) -> PatcherLayer:
        """The patch layer of ``adapter_name`` (default: the active adapter)."""
        name = adapter_name or (self.active_adapters[0] if len(self.active_adapters) == 1 else None)
        if name is None:
            raise ValueError(f"{len(self.active_adapters)} adapters are active; pass adapter_name explicitly")
        layers = list(self.patch_layers(name).values())
        if not layers:
            raise KeyError(f"no patch adapter named {name!r} (have {sorted(self.peft_config)})")
        return layers[0]

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        check_fingerprint: bool = True,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a saved patch set onto ``model``: validated, safetensors-only, and fingerprint-checked.

        Equivalent to ``PeftModel.from_pretrained`` once ``transformer_patcher`` is imported, which this guarantees,
        except that ``check_fingerprint=False`` attaches a patch set whose fingerprint is missing or names another
        model, with a warning. Its recorded fingerprint is kept either way, so a save still names the model the patches
        were trained on.
        """
        config = PatcherConfig.from_pretrained(model_id, **kwargs)
        config.check_fingerprint = check_fingerprint  # read by settle_fingerprint; not a field, never saved
        return PeftModel.from_pretrained(
            model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
        )


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
    training = model.training
    return get_peft_model(model, config or PatcherConfig(), adapter_name=adapter_name).train(training)
