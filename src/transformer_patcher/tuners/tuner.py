"""``Tuner``: what the package's tuners share on top of peft's ``BaseTuner``, plus the ``get_*_model`` skeleton.

Both adapter types are loaded the same guarded way. Before any module is replaced, a saved adapter's weights (checked
against its own config when the config was read, ``config_file.LoadedWeights``) must fit the model's layers, carry the
fingerprint of this base model, and stay within sane magnitudes of the weights they extend; a new adapter records the
fingerprint instead. When peft then loads the weights, the state-dict hook checks them again against the layers that
will hold them (the only check a load into an existing adapter gets) and sizes those layers to the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from transformer_patcher.tuners.adapter_file import check_checkpoint_covers, check_dims_fit, layers_holding
from transformer_patcher.tuners.bounds import check_magnitudes
from transformer_patcher.tuners.config_file import ValidatedConfigFile
from transformer_patcher.tuners.fingerprint import AdapterWording, settle_fingerprint
from transformer_patcher.tuners.tuner_layer import TunerLayer

FileShapes = Mapping[str, Any]  # module name → what an adapter file holds for it (``PatchShapes``, ``DeltaShapes``)
Scales = Mapping[str, Mapping[str, float]]  # module name → what → ``bounds.weight_scale``


class Tuner(BaseTuner):
    """A peft tuner of the package: subclasses name their layer and config classes and how errors word them."""

    tuner_layer_cls: type[TunerLayer]
    config_cls: ClassVar[type[ValidatedConfigFile]]
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}
    wording: ClassVar[AdapterWording]  # how a fingerprint mismatch names the adapter
    checkpoint_noun: ClassVar[str]  # what a checkpoint holds per module: "patches", "deltas"
    checkpoint_verb: ClassVar[str]  # what the adapter does to a module: "patch", "edit"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "wording" in cls.__dict__:  # a fingerprint refusal names this tuner's loader, the one that can bypass it
            cls.wording = dataclasses.replace(cls.wording, loader=f"transformer_patcher.{cls.__name__}.from_pretrained")

    # split a checkpoint by module and validate each group: the adapter type's ``group_*_tensors``
    group_tensors: ClassVar[Callable[[Mapping[str, torch.Tensor], str], tuple[dict[str, Any], FileShapes]]]

    # ------------------------------------------------------------------------------------------ subclass hooks
    @classmethod
    def _layer_scales(cls, model: nn.Module, layers: Mapping[str, TunerLayer]) -> Scales:
        """The weight scales that bound what a checkpoint may hold for each of ``layers``."""
        raise NotImplementedError

    @classmethod
    def _declares_weights(cls, config: Any) -> bool:
        """Whether the config's own counts say it describes saved weights."""
        raise NotImplementedError

    @classmethod
    def _check_loadable(cls, layers: Mapping[str, TunerLayer], shapes: FileShapes, adapter_name: str) -> None:
        """Refuse loading into ``layers`` in a state that cannot take new weights (default: any state can)."""

    @classmethod
    def _loadable_state_dict(cls, config: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint as peft should load it (default: as read)."""
        return state_dict

    # --------------------------------------------------------------------------------------------- injection
    def _check_against_model(
        self,
        config: Any,
        dims: Mapping[str, tuple[int, int]],
        fingerprint: Callable[[], dict[str, Any]],
        scale_of: Callable[[str], Mapping[str, float]],
    ) -> None:
        """Before anything changes: a saved adapter's checked weights must fit ``dims`` (module → layer sizes), its
        fingerprint must name this model (``fingerprint()``, computed once the sizes fit) and its magnitudes must stay
        within ``scale_of(module)``; a new adapter records the model's fingerprint instead.

        A config read by the package carries what its weights file held; transformers' ``load_adapter`` builds one
        without reading the folder, so there its counts or fingerprint are what say it was saved.
        """
        loaded = config.loaded
        path, shapes = (loaded.path, loaded.shapes) if loaded else (None, {})
        check_dims_fit(shapes, dims, str(path), self.checkpoint_noun)
        saved = loaded is not None or self._declares_weights(config) or config.fingerprint is not None
        checked = loaded.check_fingerprint if loaded else True
        settle_fingerprint(config, fingerprint(), self.wording, saved, checked)
        scales = {module: scale_of(module) for module in shapes}
        check_magnitudes({module: shape.magnitudes for module, shape in shapes.items()}, scales, str(path))

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any) -> TunerLayer:
        """A layer of this type wrapping ``target``, holding ``adapter_name``."""
        raise NotImplementedError

    def _add_to_layer(self, layer: TunerLayer, adapter_name: str, config: Any, module_name: str) -> None:
        """Add ``adapter_name`` to ``module_name``, a layer that already holds another adapter of this type."""
        layer.update_layer(adapter_name, config)

    def _wraps(self, adapter_name: str, module_name: str) -> bool:
        """Whether ``module_name``, matched by peft against the config, is one the adapter wraps (default: yes)."""
        return True

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if not self._wraps(adapter_name, current_key):
            return
        if isinstance(target, self.tuner_layer_cls):
            self._add_to_layer(target, adapter_name, peft_config, current_key)
            return
        self._replace_module(parent, target_name, self._new_layer(target, adapter_name, peft_config), target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # The adapter's tensors are already on the layer's execution device; peft's default would move them to the
        # weight's device, which is `meta` for an offloaded layer.
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """The adapter's dtype is its config's choice; peft's generic up-casting does not apply."""

    # ------------------------------------------------------------------------------------------ state dict
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Validate a checkpoint against the layers that will hold it (sizes and magnitudes) and resize them to it,
        before peft loads. Loading into an existing adapter reaches only this check, never ``_check_against_model``."""
        source = f"adapter '{adapter_name}'"
        groups, shapes = cls.group_tensors(state_dict, source)
        layers = layers_holding(model, cls.tuner_layer_cls, adapter_name, cls.tuner_layer_cls.adapter_store)
        check_checkpoint_covers(groups, layers, noun=cls.checkpoint_noun, verb=cls.checkpoint_verb)
        check_dims_fit(shapes, {name: layer.dims for name, layer in layers.items()}, source, cls.checkpoint_noun)
        scales = cls._layer_scales(model, layers)
        check_magnitudes({module: shape.magnitudes for module, shape in shapes.items()}, scales, source)
        cls._check_loadable(layers, shapes, adapter_name)
        for module_name, shape in shapes.items():
            layers[module_name].resize_for_load(adapter_name, shape)
        state_dict = cls._loadable_state_dict(config, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # ------------------------------------------------------------------------------------------- accessors
    def _adapter(self, adapter_name: str | None) -> str:
        """``adapter_name`` (which must exist), or the one active adapter when it is None."""
        if adapter_name is not None:
            if adapter_name not in self.peft_config:
                noun = self.tuner_layer_cls.adapter_noun
                raise KeyError(f"no {noun} adapter named {adapter_name!r} (have {sorted(self.peft_config)})")
            return adapter_name
        if len(self.active_adapters) != 1:
            raise ValueError(f"{len(self.active_adapters)} adapters are active; pass adapter_name explicitly")
        return self.active_adapters[0]

    def _layers(self, adapter_name: str | None) -> dict[str, Any]:
        """Every wrapped layer (module name → layer), optionally only those holding ``adapter_name``."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, self.tuner_layer_cls) and (adapter_name is None or module.holds(adapter_name))
        }

    # ----------------------------------------------------------------------------------------------- loading
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
        """Load a saved adapter onto ``model``: validated, safetensors-only, and fingerprint-checked.

        The config and ``adapter_model.safetensors`` are checked before the model is touched; a pickled
        ``adapter_model.bin`` is never read. Equivalent to ``PeftModel.from_pretrained`` once ``transformer_patcher``
        is imported, which this guarantees, except that ``check_fingerprint=False`` attaches an adapter whose
        fingerprint is missing or names another model, with a warning. Its recorded fingerprint is kept either way,
        so a save still names the model it was made on.
        """
        config = cls.config_cls.from_pretrained(model_id, check_fingerprint=check_fingerprint, **kwargs)
        return PeftModel.from_pretrained(
            model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
        )


def wrap_model(model: nn.Module, config: PeftConfig, adapter_name: str) -> PeftModel:
    """``get_peft_model`` that keeps the model's train/eval mode (a fresh ``PeftModel`` claims training even around an
    eval model)."""
    training = model.training
    return get_peft_model(model, config, adapter_name=adapter_name).train(training)
