"""``DeltaModel``: the peft tuner that wraps each edited layer with a ``DeltaLayer``, plus the public entry points."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from transformer_patcher.core.errors import AdapterFileError, UnsupportedArchitectureError
from transformer_patcher.tuners.architectures import model_type_of
from transformer_patcher.tuners.bounds import weight_scale
from transformer_patcher.tuners.delta.config import DELTA, DeltaConfig
from transformer_patcher.tuners.delta.delta_file import group_delta_tensors
from transformer_patcher.tuners.delta.layer import DeltaLayer
from transformer_patcher.tuners.fingerprint import AdapterWording, fingerprint_modules
from transformer_patcher.tuners.registration import register_peft_type
from transformer_patcher.tuners.tuner import Scales, Tuner, wrap_model


class DeltaModel(Tuner):
    """Tuner for peft type ``"DELTA"``. Use ``get_delta_model`` or ``DeltaModel.from_pretrained``."""

    prefix: str = "delta_"
    tuner_layer_cls = DeltaLayer
    config_cls = DeltaConfig
    wording = AdapterWording(
        "weight delta", "the edited layers", "computed", "the edits will not do what they were computed for"
    )
    checkpoint_noun, checkpoint_verb = "deltas", "edit"

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # per adapter, the exact module names its config targets, in model order: peft may condense a long list
        # into suffixes while it matches modules, and the config keeps the exact names (set before peft's __init__,
        # which injects the first adapter)
        self._exact_targets: dict[str, tuple[str, ...]] = {}
        super().__init__(model, peft_config, adapter_name, *args, **kwargs)

    # --------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Check every target (exists, is Linear/Conv1D) and put them in model order, then inject: a refusal leaves
        the model as it was."""
        config = self.peft_config[adapter_name]
        requested = config.target_modules
        targets = _ordered_targets(model, requested or [])
        self._exact_targets[adapter_name] = targets
        config.target_modules = list(targets)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:  # nothing of a refused adapter stays behind
            self._exact_targets.pop(adapter_name, None)
            config.target_modules = requested
            raise
        config.target_modules = list(targets)  # peft condenses lists of 20 or more names into suffixes

    def _prepare_adapter_config(self, peft_config: DeltaConfig, model_config: dict[str, Any]) -> DeltaConfig:
        """Check a saved delta's sizes, base-model fingerprint and magnitudes against the model (a new one records the
        fingerprint instead), before any module is replaced."""
        modules = dict(self.model.named_modules())
        actual = fingerprint_modules(self.model, peft_config.target_modules)
        dims = {name: (size[0], size[1]) for name, size in actual["modules"].items()}
        self._check_against_model(
            peft_config, dims, lambda: actual, lambda name: {"weight delta": weight_scale(modules[name])}
        )
        peft_config.rank = 0  # the layers start empty; they move it on every append and load
        return peft_config

    @classmethod
    def _declares_weights(cls, config: DeltaConfig) -> bool:
        return config.rank > 0

    def _wraps(self, adapter_name: str, module_name: str) -> bool:
        return module_name in self._exact_targets[adapter_name]  # not a suffix match of peft's

    def _new_layer(self, target: nn.Module, adapter_name: str, config: DeltaConfig) -> DeltaLayer:
        return DeltaLayer(target, adapter_name, config)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._exact_targets.pop(adapter_name, None)

    # ------------------------------------------------------------------------------------------ state dict
    group_tensors = staticmethod(group_delta_tensors)

    @classmethod
    def _layer_scales(cls, model: nn.Module, layers: Mapping[str, DeltaLayer]) -> Scales:
        return {name: {"weight delta": weight_scale(layer.get_base_layer())} for name, layer in layers.items()}

    @classmethod
    def _check_loadable(cls, layers: Mapping[str, DeltaLayer], shapes: Mapping[str, Any], adapter_name: str) -> None:
        for module_name in shapes:
            if adapter_name in layers[module_name].merged_adapters:
                raise AdapterFileError(f"adapter '{adapter_name}' is merged into '{module_name}'; unmerge it first")

    @classmethod
    def _loadable_state_dict(cls, config: DeltaConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = getattr(torch, config.delta_dtype)
        return {key: tensor.to(dtype) for key, tensor in state_dict.items()}

    # ------------------------------------------------------------------------------------------- accessors
    def delta_layers(self, adapter_name: str | None = None) -> dict[str, DeltaLayer]:
        """Every wrapped layer (module name → layer), optionally only those holding ``adapter_name``."""
        return self._layers(adapter_name)

    def add_delta(self, module_name: str, up: torch.Tensor, down: torch.Tensor, adapter_name: str | None = None) -> int:
        """Append ``up @ down`` to the delta of layer ``module_name``; see ``DeltaLayer.add_delta``."""
        adapter = self._adapter(adapter_name)
        layers = self.delta_layers(adapter)
        if module_name not in layers:
            raise KeyError(f"adapter {adapter!r} edits {sorted(layers)}, not {module_name!r}")
        return layers[module_name].add_delta(adapter, up, down)

    def delta_rank(self, adapter_name: str | None = None) -> int:
        """Total rank of an adapter's delta over all its layers (equals its ``config.rank``)."""
        adapter = self._adapter(adapter_name)
        return sum(layer.rank(adapter) for layer in self.delta_layers(adapter).values())

    @classmethod
    def from_pretrained(  # type: ignore[override]  # no is_trainable: a delta is never trained
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        check_fingerprint: bool = True,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a saved weight delta onto ``model``: validated, safetensors-only, and fingerprint-checked.

        As ``Tuner.from_pretrained``: ``check_fingerprint=False`` attaches a delta whose fingerprint is missing or names
        another model, with a warning (its recorded fingerprint is kept).
        """
        return super().from_pretrained(model, model_id, adapter_name, check_fingerprint=check_fingerprint, **kwargs)


def _ordered_targets(model: nn.Module, names: list[str]) -> tuple[str, ...]:
    """``names`` in model order, each checked to name an nn.Linear or Conv1D of ``model``."""
    modules = dict(model.named_modules())
    where = f"this '{model_type_of(model) or type(model).__name__}' model"
    for name in names:
        module = modules.get(name)
        if module is None:
            raise UnsupportedArchitectureError(
                f"target module '{name}' does not exist in {where}; DeltaConfig.target_modules takes exact full "
                "module names such as 'model.layers.4.mlp.down_proj'."
            )
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise UnsupportedArchitectureError(
                f"target module '{name}' is a {type(base).__name__}; a weight delta needs an nn.Linear or "
                "transformers Conv1D layer."
            )
    order = {name: i for i, name in enumerate(modules)}
    return tuple(sorted(names, key=order.__getitem__))


def get_delta_model(model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap the layers ``config.target_modules`` names so that low-rank deltas can be appended to them.

    The wrapper takes the model's train/eval mode (a fresh ``PeftModel`` claims training even around an eval model).
    """
    return wrap_model(model, config, adapter_name)


def register() -> None:
    """Idempotently make peft aware of DeltaConfig/DeltaModel; runs when this module is imported."""
    register_peft_type(DELTA, DeltaConfig, DeltaModel)


register()
