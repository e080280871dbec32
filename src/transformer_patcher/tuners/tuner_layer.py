"""``TunerLayer``: what the package's tuner layers share on top of peft's ``BaseTunerLayer``.

Each wraps one base layer and keeps, per adapter, the tensors its schema declares in dicts named after them. Adapters
are looked up by name (or the one active adapter), and the tensors live on the base layer's execution device in the
dtype their config chose: peft's default move would cast them to the base weight's dtype, and would find ``meta`` for
an offloaded layer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from transformer_patcher.core.placement import execution_device

_META = torch.device("meta")


class TunerLayer(nn.Module, BaseTunerLayer):
    """A wrapped base layer holding per-adapter tensors; subclasses declare the names below and ``dims``."""

    adapter_noun: ClassVar[str]  # how errors name an adapter of this type: "patch", "delta"
    adapter_store: ClassVar[str]  # the tensor dict whose keys are the adapters this layer holds
    tensor_names: ClassVar[tuple[str, ...]]  # every per-adapter tensor dict, in schema order
    repr_prefix: ClassVar[str]

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []

    @property
    def dims(self) -> tuple[int, int]:
        """(input, output) features the adapter's tensors are sized by."""
        raise NotImplementedError

    def holds(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_store)

    def _resolve_adapter(self, adapter_name: str | None) -> str:
        """``adapter_name``, or the one active adapter when it is None; refuse an adapter this layer does not hold."""
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise ValueError(f"{len(self.active_adapters)} adapters are active; pass adapter_name explicitly")
            adapter_name = self.active_adapters[0]
        if not self.holds(adapter_name):
            have = sorted(getattr(self, self.adapter_store))
            raise KeyError(f"no {self.adapter_noun} adapter named {adapter_name!r} on this layer (have {have})")
        return adapter_name

    def _set(self, adapter_name: str, name: str, tensor: torch.Tensor) -> None:
        """Replace one of an adapter's tensors, a parameter keeping whether it requires grad."""
        store = getattr(self, name)
        if isinstance(store, nn.ParameterDict):
            tensor = nn.Parameter(tensor, requires_grad=store[adapter_name].requires_grad)
        store[adapter_name] = tensor

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter's tensors to the base layer's execution device; unlike peft's default, keep their dtype."""
        target = device or execution_device(self.base_layer)
        for name in self.tensor_names:
            store = getattr(self, name)
            if adapter_name in store and store[adapter_name].device != _META:
                self._set(adapter_name, name, store[adapter_name].detach().to(target))

    def __repr__(self) -> str:
        return f"{self.repr_prefix}." + super().__repr__()
