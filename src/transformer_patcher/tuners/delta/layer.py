"""``DeltaLayer``: a linear layer plus a low-rank weight delta per adapter, ``W' = W + up @ down``.

The factors are buffers-in-spirit: ``nn.Parameter``s (so peft saves, moves and loads them like any adapter weight)
that never require grad, because they come from a closed-form solve and are only ever appended to. ``up`` is
d_out × r and ``down`` r × d_in whatever the base layer's storage (a transformers ``Conv1D`` keeps its weight as
d_in × d_out; ``get_delta_weight`` returns the delta in the base weight's own orientation).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from transformer_patcher.core.errors import InvalidPatchError, UnsupportedArchitectureError
from transformer_patcher.core.placement import execution_device
from transformer_patcher.tuners.delta.config import DeltaConfig
from transformer_patcher.tuners.delta.delta_file import DeltaShapes
from transformer_patcher.tuners.delta.schema import DELTA_TENSOR_NAMES, SPECS, delta_sizes
from transformer_patcher.tuners.tuner_layer import TunerLayer


class DeltaLayer(TunerLayer):
    """A wrapped ``nn.Linear`` / ``Conv1D`` that adds ``x @ (up @ down)ᵀ`` for each active adapter."""

    adapter_layer_names = DELTA_TENSOR_NAMES
    other_param_names = ("delta_config",)
    adapter_noun = "delta"
    adapter_store = "delta_up"
    tensor_names = DELTA_TENSOR_NAMES
    repr_prefix = "delta"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DeltaConfig) -> None:
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise UnsupportedArchitectureError(
                f"a weight delta needs an nn.Linear or transformers Conv1D layer, got {type(base_layer).__name__}"
            )
        super().__init__(base_layer, adapter_name)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight stored (in, out)
        d_in, d_out = base_layer.weight.shape if self.fan_in_fan_out else base_layer.weight.shape[::-1]
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.delta_up = nn.ParameterDict()
        self.delta_down = nn.ParameterDict()
        self.delta_config: dict[str, DeltaConfig] = {}
        self._dense_kept: dict[str, tuple] = {}  # adapter → (up, down, their versions and storage, up @ down)
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self.update_layer(adapter_name, config)

    @property
    def dims(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    # ----------------------------------------------------------------------------------------------- set-up
    def update_layer(self, adapter_name: str, config: DeltaConfig) -> None:
        """Create an empty (rank-0) delta for ``adapter_name`` on the layer's execution device."""
        device, dtype = execution_device(self.base_layer), getattr(torch, config.delta_dtype)
        self.delta_config[adapter_name] = config
        self._set_factors(adapter_name, *self._zeros(0, device, dtype))
        # Declared frozen, so peft's set_adapter / set_requires_grad never make them trainable.
        self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: DELTA_TENSOR_NAMES}
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _zeros(self, rank: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero factors of rank ``rank``, shaped by the schema."""
        sizes = delta_sizes(rank, self.in_features, self.out_features)
        return tuple(
            torch.zeros(SPECS[name].shape_for(sizes), device=device, dtype=dtype) for name in DELTA_TENSOR_NAMES
        )

    def _set_factors(self, adapter_name: str, up: torch.Tensor, down: torch.Tensor) -> None:
        """Store new factors (never trained) and publish the change of rank."""
        before = self.delta_up[adapter_name].shape[1] if adapter_name in self.delta_up else 0
        self._dense_kept.pop(adapter_name, None)
        self.delta_up[adapter_name] = nn.Parameter(up, requires_grad=False)
        self.delta_down[adapter_name] = nn.Parameter(down, requires_grad=False)
        self._publish_rank(adapter_name, before)

    def _publish_rank(self, adapter_name: str, before: int) -> None:
        """Show the adapter's total rank in its config after every change: ``rank`` is public state of a
        ``DeltaConfig`` (read by callers and by peft's save, which writes the config as it is). It totals every
        layer of the adapter, which share the config and none of which sees the others, so each moves it by its own
        change from ``before``; the factors here stay the only source."""
        config = self.delta_config[adapter_name]
        config.rank += self.rank(adapter_name) - before

    # ------------------------------------------------------------------------------------------- the delta
    def rank(self, adapter_name: str | None = None) -> int:
        """Current rank of the adapter's delta on this layer."""
        return int(self.delta_up[self._resolve_adapter(adapter_name)].shape[1])

    def _factor(
        self, tensor: object, name: str, shape: tuple[int | None, int | None], dtype: torch.dtype
    ) -> torch.Tensor:
        t = torch.as_tensor(tensor).detach()
        if not t.is_floating_point():
            raise InvalidPatchError(f"{name} must be floating point, got {t.dtype}")
        if t.dim() != 2 or any(want is not None and got != want for got, want in zip(t.shape, shape, strict=True)):
            expected = " × ".join("r" if d is None else str(d) for d in shape)
            raise InvalidPatchError(f"{name} must have shape ({expected}), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise InvalidPatchError(f"{name} contains NaN or inf; a delta must be finite")
        cast = t.to(dtype)
        if not torch.isfinite(cast).all():
            raise InvalidPatchError(f"{name} overflows the delta dtype {dtype}")
        return cast

    def add_delta(self, adapter_name: str | None, up: torch.Tensor, down: torch.Tensor) -> int:
        """Append ``up`` (d_out × r) and ``down`` (r × d_in) along the rank, so the delta grows by ``up @ down``.

        Factors are cast to the config's ``delta_dtype`` and kept on the layer's device. Returns the rank added.
        Nothing changes if an argument is invalid (``InvalidPatchError``).
        """
        adapter, up, down = self._checked_factors(adapter_name, up, down, "adding")
        old_up, old_down = self.delta_up[adapter], self.delta_down[adapter]
        self._set_factors(adapter, torch.cat([old_up.detach(), up], dim=1), torch.cat([old_down.detach(), down], dim=0))
        return int(up.shape[1])

    def replace_delta(self, adapter_name: str | None, up: torch.Tensor, down: torch.Tensor) -> int:
        """Make the delta exactly ``up @ down`` (checked and cast as in :meth:`add_delta`), in one step; returns the
        new rank. Nothing changes if an argument is invalid (``InvalidPatchError``)."""
        adapter, up, down = self._checked_factors(adapter_name, up, down, "replacing")
        self._set_factors(adapter, up.clone(), down.clone())  # the caller's tensors stay theirs
        return int(up.shape[1])

    def _checked_factors(
        self, adapter_name: str | None, up: torch.Tensor, down: torch.Tensor, doing: str
    ) -> tuple[str, torch.Tensor, torch.Tensor]:
        """The adapter's name and ``up``, ``down`` checked and cast to its factors' dtype and device."""
        adapter = self._resolve_adapter(adapter_name)
        if adapter in self.merged_adapters:
            raise InvalidPatchError(f"adapter {adapter!r} is merged into the base weight; unmerge it before {doing}")
        old_up, old_down = self.delta_up[adapter], self.delta_down[adapter]
        up = self._factor(up, "up", (self.out_features, None), old_up.dtype)
        down = self._factor(down, "down", (None, self.in_features), old_down.dtype)
        if up.shape[1] != down.shape[0]:
            raise InvalidPatchError(
                f"up {tuple(up.shape)} and down {tuple(down.shape)} must share the rank r (up's columns, down's rows)"
            )
        return adapter, up.to(old_up.device), down.to(old_down.device)

    def clear_delta(self, adapter_name: str | None = None) -> int:
        """Drop the adapter's delta on this layer (back to rank 0); returns the rank removed."""
        adapter = self._resolve_adapter(adapter_name)
        if adapter in self.merged_adapters:
            raise InvalidPatchError(f"adapter {adapter!r} is merged into the base weight; unmerge it before clearing")
        removed = self.rank(adapter)
        self._resize(adapter, 0)
        return removed

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``up @ down`` in the delta dtype, in the base weight's orientation (transposed for ``Conv1D``)."""
        delta = self.delta_up[adapter_name] @ self.delta_down[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def resize_for_load(self, adapter_name: str, shapes: DeltaShapes) -> None:
        """Reshape the factors to a checkpoint's (already validated) rank so ``load_state_dict`` fills them."""
        self._resize(adapter_name, shapes.rank)

    def _resize(self, adapter_name: str, rank: int) -> None:
        up = self.delta_up[adapter_name]
        self._set_factors(adapter_name, *self._zeros(rank, up.device, up.dtype))

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.delta_up or self.delta_up[adapter].shape[1] == 0:
                continue
            up, down = self.delta_up[adapter], self.delta_down[adapter]
            x_in = x.to(device=down.device, dtype=down.dtype)
            dense = self._dense(adapter, up, down)
            delta = F.linear(F.linear(x_in, down), up) if dense is None else F.linear(x_in, dense)
            result = result + delta.to(device=result.device, dtype=result.dtype)
        return result

    def _dense(self, adapter: str, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor | None:
        """``up @ down`` (d_out × d_in) when a token costs fewer multiplications through it than through the two
        factors (rank above ``d_in·d_out / (d_in + d_out)``: a write of more facts than that, about 400 on SmolLM2's
        FFN), else None. Formed once and kept until the factors change (new factors, an in-place load, a move)."""
        rank = up.shape[1]
        if rank * (self.in_features + self.out_features) <= self.in_features * self.out_features:
            return None
        stamp = (up._version, down._version, up.data_ptr(), down.data_ptr())
        kept = self._dense_kept.get(adapter)
        if kept is None or kept[0] is not up or kept[1] is not down or kept[2] != stamp:
            kept = (up, down, stamp, (up @ down).detach())
            self._dense_kept[adapter] = kept
        return kept[3]

    # ------------------------------------------------------------------------------------ peft lifecycle
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: the active ones) into the base weight.

        The sum is formed in the delta dtype and rounded once to the weight's dtype. With ``safe_merge`` it is checked
        for NaN/inf before the weight is overwritten.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for adapter in adapter_names:
            if adapter not in self.delta_up:
                continue
            delta = self.get_delta_weight(adapter).to(weight.device)
            merged = (weight.data.to(delta.dtype) + delta).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            weight.data.copy_(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged delta again (exact up to the rounding of the merged weight)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.delta_up:
                delta = self.get_delta_weight(adapter).to(weight.device)
                weight.data.copy_((weight.data.to(delta.dtype) - delta).to(weight.dtype))
