"""``DeltaModel``: the peft tuner that wraps each edited layer with a ``DeltaLayer``, plus the public entry points."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from transformer_patcher.core.errors import AdapterFileError, UnsupportedArchitectureError
from transformer_patcher.tuners.architectures import model_type_of
from transformer_patcher.tuners.bounds import check_magnitudes, weight_scale
from transformer_patcher.tuners.delta.config import DeltaConfig
from transformer_patcher.tuners.delta.delta_file import group_delta_tensors
from transformer_patcher.tuners.delta.layer import DeltaLayer
from transformer_patcher.tuners.fingerprint import AdapterWording, fingerprint_modules, settle_fingerprint
from transformer_patcher.tuners.patcher.patch_file import check_checkpoint_covers, check_dims_fit, layers_holding

DELTA_WORDING = AdapterWording(
    noun="weight delta",
    weights="the edited layers",
    made="computed",
    loader="transformer_patcher.DeltaModel.from_pretrained",
    consequence="the edits will not do what they were computed for",
)


class DeltaModel(BaseTuner):
    """Tuner for peft type ``"DELTA"``. Use ``get_delta_model`` or ``DeltaModel.from_pretrained``."""

    prefix: str = "delta_"
    tuner_layer_cls = DeltaLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    # --------------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: DeltaConfig, model_config: dict[str, Any]) -> DeltaConfig:
        """Check every target (exists, is Linear/Conv1D) and order them as the model does; check a saved delta's sizes,
        base-model fingerprint and magnitudes against the model (a new one records the fingerprint instead).

        Runs before any module is replaced, so a refusal leaves the model as it was.
        """
        modules = dict(self.model.named_modules())
        where = f"this '{model_type_of(self.model) or type(self.model).__name__}' model"
        for name in peft_config.target_modules or []:
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
        targets = sorted(peft_config.target_modules or [], key=order.__getitem__)
        actual = fingerprint_modules(self.model, targets)
        path, shapes = getattr(peft_config, "checked_weights", (None, {}))  # set when loaded from a folder
        dims = {name: (size[0], size[1]) for name, size in actual["modules"].items()}
        check_dims_fit(shapes, dims, str(path), "deltas")
        # transformers' load_adapter builds the config without the package reading the folder: a rank says it is saved
        saved = hasattr(peft_config, "checked_weights") or peft_config.rank > 0 or peft_config.fingerprint is not None
        settle_fingerprint(peft_config, actual, DELTA_WORDING, saved)
        scales = {name: {"weight delta": weight_scale(modules[name])} for name in shapes}
        check_magnitudes({module: shape.magnitudes for module, shape in shapes.items()}, scales, str(path))
        peft_config.target_modules = targets
        peft_config.rank = 0  # the layers start empty; they move it on every append and load
        self._pending_targets = tuple(targets)
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # peft condenses long target lists (>= 20) into suffixes; the config keeps the exact names.
        self.peft_config[adapter_name].target_modules = list(self._pending_targets)

    def _create_and_replace(
        self,
        peft_config: DeltaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if current_key not in self._pending_targets:  # a suffix match of peft's, not one of the exact names
            return
        if isinstance(target, DeltaLayer):
            target.update_layer(adapter_name, peft_config)
            return
        self._replace_module(parent, target_name, DeltaLayer(target, adapter_name, peft_config), target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # The factors are already on the layer's execution device; peft's default would move them to the weight's
        # device, which is `meta` for an offloaded layer.
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """The factor dtype is set by ``DeltaConfig.delta_dtype``; peft's generic up-casting does not apply."""

    # ------------------------------------------------------------------------------------------ state dict
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: DeltaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Validate a checkpoint against the wrapped layers (sizes and magnitudes) and resize their factors to its
        ranks, before peft loads. Loading into an existing adapter reaches only this check, never
        ``_prepare_adapter_config``."""
        source = f"adapter '{adapter_name}'"
        groups, shapes = group_delta_tensors(state_dict, source=source)
        layers = layers_holding(model, DeltaLayer, adapter_name, "delta_up")
        check_checkpoint_covers(groups, layers, noun="deltas", verb="edit")
        dims = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
        check_dims_fit(shapes, dims, source, "deltas")
        scales = {name: {"weight delta": weight_scale(layer.get_base_layer())} for name, layer in layers.items()}
        check_magnitudes({module: shape.magnitudes for module, shape in shapes.items()}, scales, source)
        for module_name in shapes:
            layer = layers[module_name]
            if adapter_name in layer.merged_adapters:
                raise AdapterFileError(f"adapter '{adapter_name}' is merged into '{module_name}'; unmerge it first")
        for module_name, shape in shapes.items():
            layers[module_name].resize_for_load(adapter_name, shape.rank)
        dtype = getattr(torch, config.delta_dtype)
        state_dict = {key: tensor.to(dtype) for key, tensor in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # ------------------------------------------------------------------------------------------- accessors
    def _adapter(self, adapter_name: str | None) -> str:
        if adapter_name is not None:
            if adapter_name not in self.peft_config:
                raise KeyError(f"no delta adapter named {adapter_name!r} (have {sorted(self.peft_config)})")
            return adapter_name
        if len(self.active_adapters) != 1:
            raise ValueError(f"{len(self.active_adapters)} adapters are active; pass adapter_name explicitly")
        return self.active_adapters[0]

    def delta_layers(self, adapter_name: str | None = None) -> dict[str, DeltaLayer]:
        """Every wrapped layer (module name → layer), optionally only those holding ``adapter_name``."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, DeltaLayer) and (adapter_name is None or adapter_name in module.delta_up)
        }

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
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        check_fingerprint: bool = True,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a saved weight delta onto ``model``: validated, safetensors-only, and fingerprint-checked.

        The config and ``adapter_model.safetensors`` are checked before the model is touched; a pickled
        ``adapter_model.bin`` is never read. Equivalent to ``PeftModel.from_pretrained`` once ``transformer_patcher``
        is imported, which this guarantees, except that ``check_fingerprint=False`` attaches a delta whose fingerprint
        is missing or names another model, with a warning (its recorded fingerprint is kept).
        """
        config = DeltaConfig.from_pretrained(model_id, **kwargs)
        config.check_fingerprint = check_fingerprint  # read by settle_fingerprint; not a field, never saved
        return PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, config=config, **kwargs)


def get_delta_model(model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap the layers ``config.target_modules`` names so that low-rank deltas can be appended to them.

    The wrapper takes the model's train/eval mode (a fresh ``PeftModel`` claims training even around an eval model).
    """
    training = model.training
    return get_peft_model(model, config, adapter_name=adapter_name).train(training)
