"""``PatcherLayer``: the FFN output projection plus patch neurons, ``FFN'(q) = FFN(q) + act(q·K + b)·V``.

The layer wraps the FFN's value-side projection. A forward pre-hook on the key-side projection captures the FFN
input q, and the patch term is added to the wrapped projection's output (before any residual/LayerNorm), which is
exactly where the paper adds the extra neurons.

Two kinds of patches live side by side, per adapter:

- *trainable* (in progress): ``nn.Parameter``s the editor optimises. Values are factored ``v = v' ⊙ a`` as in the
  official code, with the scale ``a`` starting at ``config.init_value_scale``;
- *frozen* (committed): buffers, never trainable, even after device moves (a ``ParameterDict`` would silently make
  them trainable again).

Every neuron carries the id of the edit that created it, so a single fix can be undone with ``remove_edit``, and
the subject read of its gate when the adapter has one (``gate``): ``act(q·k + b)`` then counts only where the gate is
open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _get_in_out_features
from torch import nn
from transformers.activations import ACT2FN

from transformer_patcher.core.errors import InvalidPatchError, PatchMergeError
from transformer_patcher.core.placement import execution_device
from transformer_patcher.tuners.patcher.config import PatcherConfig
from transformer_patcher.tuners.patcher.gate import GateReads
from transformer_patcher.tuners.patcher.keys import preactivation
from transformer_patcher.tuners.patcher.patch_file import PatchShapes
from transformer_patcher.tuners.patcher.schema import (
    BARE_SUBJECTS,
    BUFFERS,
    FROZEN,
    GATE_FRAME,
    PARAMETERS,
    PATCH_TENSOR_NAMES,
    SPECS,
    SUBJECTS,
    TRAINABLE,
    patch_sizes,
)
from transformer_patcher.tuners.tensor_schema import ID, ID_DTYPE
from transformer_patcher.tuners.tuner_layer import TunerLayer

MERGE_IMPOSSIBLE = (
    "Transformer-Patcher patches cannot be merged into the base weights: a patch adds act(q·k + b)·v, which is "
    "non-linear in the FFN input q, so no weight matrix of the original shape reproduces it. Keep the adapter "
    "attached (its cost is one small matmul in one layer), or call unload() to remove the patches."
)


@dataclass
class PatchCapture:
    """What one forward pass showed the patch layer: the FFN query and the patches' pre-activations ``q·K + b``."""

    query: torch.Tensor | None = None
    preactivations: torch.Tensor | None = None  # trainable (in-progress) patches, shape (..., n_trainable)
    frozen_preactivations: torch.Tensor | None = None  # committed patches, shape (..., n_frozen)


class PatcherLayer(TunerLayer):
    """A wrapped FFN output projection that adds Transformer-Patcher neurons for each adapter."""

    adapter_layer_names = PARAMETERS
    other_param_names = (*BUFFERS, "patch_config")
    adapter_noun = "patch"
    adapter_store = "patch_keys"
    tensor_names = PATCH_TENSOR_NAMES
    repr_prefix = "patcher"

    def __init__(
        self,
        base_layer: nn.Module,
        key_module: nn.Module,
        adapter_name: str,
        config: PatcherConfig,
        gate: GateReads | None = None,
    ) -> None:
        super().__init__(base_layer, adapter_name)
        self.query_dim = _get_in_out_features(key_module)[0]
        self.output_dim = _get_in_out_features(base_layer)[1]
        if self.query_dim is None or self.output_dim is None:
            raise InvalidPatchError(
                f"cannot read the feature sizes of {type(key_module).__name__}/{type(base_layer).__name__}"
            )
        for name in PARAMETERS:
            setattr(self, name, nn.ParameterDict())
        for name in BUFFERS:
            setattr(self, name, BufferDict(persistent=True))
        self.patch_config: dict[str, PatcherConfig] = {}
        self.key_module_name = config.key_module
        self._activations: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.gates: dict[str, GateReads] = {}  # by gate block name, shared by the adapters that name it
        self._query: torch.Tensor | None = None
        self._capture: tuple[str, PatchCapture] | None = None
        self._hook = key_module.register_forward_pre_hook(self._store_query, with_kwargs=True)
        self.update_layer(adapter_name, config, gate)

    @property
    def dims(self) -> tuple[int, int]:
        return self.query_dim, self.output_dim

    # ----------------------------------------------------------------------------------------------- set-up
    def update_layer(self, adapter_name: str, config: PatcherConfig, gate: GateReads | None = None) -> None:
        """Create ``adapter_name``'s patch tensors on the FFN's execution device, zero-filled and sized by the
        config's counts (a fresh config: empty), ready for a loader to fill them. ``gate``: the reads of the block
        ``config.gate_module`` names (required when it names one)."""
        if config.gate_module is not None and config.gate_module not in self.gates:
            if gate is None:
                raise ValueError(f"adapter {adapter_name!r} names gate block {config.gate_module!r}; pass its reads")
            self.gates[config.gate_module] = gate
        device, dtype = execution_device(self.base_layer), self._patch_dtype(config)
        trainable = config.num_trainable_patches
        for name in self.tensor_names:
            rows = config.num_patches - trainable if SPECS[name].frozen else trainable
            tensor_dtype = getattr(torch, ID_DTYPE) if SPECS[name].kind == ID else dtype
            empty = torch.zeros(self._shape(name, rows), device=device, dtype=tensor_dtype)
            getattr(self, name)[adapter_name] = nn.Parameter(empty) if name in PARAMETERS else empty
        self.patch_config[adapter_name] = config
        self._activations[adapter_name] = ACT2FN[config.patch_activation]
        self._publish_counts(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _patch_dtype(self, config: PatcherConfig) -> torch.dtype:
        if config.patch_dtype is not None:
            return getattr(torch, config.patch_dtype)
        weight = getattr(self.base_layer, "weight", None)
        return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32

    def activation(self, adapter_name: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The patch activation of an adapter."""
        return self._activations[self._resolve_adapter(adapter_name)]

    def gate_reads(self, adapter_name: str | None = None) -> GateReads | None:
        """The reads an adapter's subject gate opens on (None: it has no gate)."""
        name = self.patch_config[self._resolve_adapter(adapter_name)].gate_module
        return None if name is None else self.gates[name]

    def _store_query(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._query = args[0] if args else next(iter(kwargs.values()))

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        query, self._query = self._query, None
        if query is None:
            return result
        if self._capture is not None:
            self._capture[1].query = query
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter in self.patch_keys:
                delta = self.patch_output(query, adapter)
                if delta is not None:
                    result = result + delta.to(device=result.device, dtype=result.dtype)
        return result

    def patch_output(self, query: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """``act(q·K + b)·V`` summed over the adapter's frozen and trainable patches (None when it has none).

        Behind a subject gate, a frozen patch whose gate is shut at every position of the batch adds exactly 0, so
        only the neurons open somewhere are computed (all of them while a capture asks for every pre-activation):
        on ordinary text that is few of a long stream's neurons, or none."""
        frozen_keys, keys = self.patch_frozen_keys[adapter_name], self.patch_keys[adapter_name]
        capture = self._capture[1] if self._capture and self._capture[0] == adapter_name else None
        if frozen_keys.shape[0] == 0 and keys.shape[0] == 0 and capture is None:
            return None
        act = self._activations[adapter_name]
        q = query.to(device=keys.device, dtype=keys.dtype)
        out = None
        if frozen_keys.shape[0]:
            bias, values = self.patch_frozen_bias[adapter_name], self.patch_frozen_values[adapter_name]
            opened = self._opened(adapter_name, True)
            if opened is not None and capture is None:
                cols = opened.reshape(-1, opened.shape[-1]).any(dim=0).nonzero().squeeze(1).to(frozen_keys.device)
                frozen_keys, bias, values, opened = frozen_keys[cols], bias[cols], values[cols], opened[..., cols]
            if frozen_keys.shape[0]:
                pre = preactivation(q, frozen_keys, bias)
                out = self._gated(act(pre), opened) @ values
                if capture is not None:
                    capture.frozen_preactivations = pre
        if keys.shape[0]:
            pre = preactivation(q, keys, self.patch_bias[adapter_name])
            activations = self._gated(act(pre), self._opened(adapter_name, False))
            trainable = activations @ (self.patch_values[adapter_name] * self.patch_value_scale[adapter_name])
            out = trainable if out is None else out + trainable
            if capture is not None:
                capture.preactivations = pre
        return out

    def gate_opened(
        self,
        subjects: torch.Tensor,
        adapter_name: str | None = None,
        key: Any = "probe",
        bare: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Where the adapter's gate lets patches with these subject reads (n, hidden), and bare subject reads
        (``bare``, n rows, zero: none), through in the pass just run, shape (batch, positions, n); None without a
        gate. ``key`` names whose running maxima a cached decode carries on (the patch sets' own, or a probe's apart
        from them)."""
        adapter = self._resolve_adapter(adapter_name)
        gate = self.gate_reads(adapter)
        if gate is None:
            return None
        threshold = self.patch_config[adapter].gate_threshold
        return gate.opened(subjects, threshold, key=(adapter, key), frame=self.gate_frame(adapter), bare=bare)

    def _opened(self, adapter: str, frozen: bool) -> torch.Tensor | None:
        """Where the adapter's frozen or trainable patches are open in this pass (None: no gate)."""
        subjects, bare = (getattr(self, names[frozen])[adapter] for names in (SUBJECTS, BARE_SUBJECTS))
        return self.gate_opened(subjects, adapter, frozen, bare)

    @staticmethod
    def _gated(activations: torch.Tensor, opened: torch.Tensor | None) -> torch.Tensor:
        """``activations``, zero where the subject gate is closed (unchanged without a gate)."""
        if opened is None:
            return activations
        if opened.numel() != activations.numel():
            raise RuntimeError(
                f"the gate read {tuple(opened.shape)} positions where the patches read {tuple(activations.shape)}"
            )
        return activations * opened.reshape(activations.shape).to(device=activations.device, dtype=activations.dtype)

    def gate_frame(self, adapter_name: str | None = None) -> torch.Tensor | None:
        """The frame an adapter's subject gate compares in (``gate.measure_frame``); None: plain cosines."""
        frame = self.patch_gate_frame[self._resolve_adapter(adapter_name)]
        return frame if bool(frame.any()) else None

    def has_gated_patches(self, adapter_name: str | None = None) -> bool:
        """Whether any patch of the adapter, committed or in progress, holds a subject read."""
        adapter = self._resolve_adapter(adapter_name)
        return any(bool(getattr(self, SUBJECTS[side])[adapter].any()) for side in (True, False))

    def set_gate_frame(self, frame: torch.Tensor, adapter_name: str | None = None) -> None:
        """Give an adapter's subject gate its frame, shape (2, hidden): mean and inverse spread. Refused once a gated
        patch exists (its subject read was taken in the frame it had) or when the frame is not finite, with an
        inverse spread that is not positive."""
        adapter = self._resolve_adapter(adapter_name)
        frame = self._as_rows(frame, self.output_dim, "the gate frame")
        if frame.shape[0] != 2 or not bool((frame[1] > 0).all()):
            raise InvalidPatchError("a gate frame is two rows: the mean, and an inverse spread that is positive")
        current = self.patch_gate_frame[adapter]
        if self.has_gated_patches(adapter) and not torch.equal(current, frame.to(current)):
            raise InvalidPatchError(
                "this adapter already holds gated patches, whose subject reads were taken in its current gate frame"
            )
        self._set(adapter, GATE_FRAME, frame.to(device=current.device, dtype=current.dtype).clone())

    @contextmanager
    def capture(self, adapter_name: str | None = None) -> Iterator[PatchCapture]:
        """Record the FFN query and patch pre-activations of the forward passes run inside the block (last wins)."""
        adapter = self._resolve_adapter(adapter_name)
        record = PatchCapture()
        previous, self._capture = self._capture, (adapter, record)
        try:
            yield record
        finally:
            self._capture = previous

    # ------------------------------------------------------------------------------------ patch bookkeeping
    def _publish_counts(self, adapter_name: str) -> None:
        """Show the adapter's patch counts in its config after every change: ``num_patches`` is public state of a
        ``PatcherConfig`` (read by callers and by peft's save, which writes the config as it is) and sizes the layer
        when transformers' ``load_adapter`` fills existing tensors. The tensors here stay the only source."""
        config = self.patch_config[adapter_name]
        config.num_patches = self.num_patches(adapter_name)
        config.num_trainable_patches = self.num_trainable_patches(adapter_name)

    def num_patches(self, adapter_name: str | None = None) -> int:
        adapter = self._resolve_adapter(adapter_name)
        return self.patch_frozen_keys[adapter].shape[0] + self.patch_keys[adapter].shape[0]

    def num_trainable_patches(self, adapter_name: str | None = None) -> int:
        return self.patch_keys[self._resolve_adapter(adapter_name)].shape[0]

    def edit_ids(self, adapter_name: str | None = None) -> torch.Tensor:
        """Edit id of every patch neuron: committed ones first, then in-progress ones."""
        adapter = self._resolve_adapter(adapter_name)
        return torch.cat([self.patch_frozen_edit_ids[adapter], self.patch_edit_ids[adapter]]).cpu()

    def _as_rows(self, tensor: torch.Tensor | Sequence[float], width: int | None, name: str) -> torch.Tensor:
        t = torch.as_tensor(tensor).detach()
        if not t.is_floating_point():
            raise InvalidPatchError(f"{name} must be floating point, got {t.dtype}")
        if width is not None and t.dim() == 1:
            t = t.unsqueeze(0)
        if width is None and t.dim() == 0:
            t = t.reshape(1)
        expected_dims = 2 if width is not None else 1
        if t.dim() != expected_dims or (width is not None and t.shape[1] != width):
            raise InvalidPatchError(f"{name} must have shape (n, {width})" if width else f"{name} must have shape (n,)")
        if not torch.isfinite(t).all():
            raise InvalidPatchError(f"{name} contains NaN or inf; patches must be finite")
        return t

    def add_patches(
        self,
        keys: torch.Tensor,
        biases: torch.Tensor | float,
        values: torch.Tensor,
        edit_id: int | Sequence[int],
        adapter_name: str | None = None,
        subjects: torch.Tensor | None = None,
        bare: torch.Tensor | None = None,
    ) -> int:
        """Append in-progress patches ``act(q·k + b)·v``; returns how many were added.

        ``values`` are the effective values ``v``. They are stored factored as ``v' = v / a`` and ``a`` filled with
        ``config.init_value_scale``, the official code's parameterisation, so training moves both. ``subjects``: the
        gate's subject read, one row for all or one per patch (stored as unit vectors; None or zero: ungated);
        ``bare``: the bare subject read that opens the gate too, shaped alike (None or zero: none). Nothing changes
        if any argument is invalid.
        """
        adapter = self._resolve_adapter(adapter_name)
        keys = self._as_rows(keys, self.query_dim, "keys")
        values = self._as_rows(values, self.output_dim, "values")
        biases = self._as_rows(biases, None, "biases")
        n = keys.shape[0]
        if n == 0 or values.shape[0] != n or biases.shape[0] != n:
            raise InvalidPatchError(
                f"keys, biases and values must describe the same n >= 1 patches; got {n}, {biases.shape[0]} and "
                f"{values.shape[0]}"
            )
        ids = torch.as_tensor(edit_id, dtype=torch.int64).reshape(-1)
        if ids.numel() == 1:
            ids = ids.expand(n)
        if ids.numel() != n:
            raise InvalidPatchError(f"edit_id must be one id or one per patch ({n}), got {ids.numel()}")
        reads, bare_reads = (
            self._per_patch_reads(rows, n, name) for rows, name in ((subjects, "subjects"), (bare, "bare"))
        )
        scale = float(self.patch_config[adapter].init_value_scale)
        current = self.patch_keys[adapter]

        def extend(name: str, new: torch.Tensor) -> None:
            old = getattr(self, name)[adapter]
            self._set(adapter, name, torch.cat([old.detach(), new.to(device=old.device, dtype=old.dtype)]))

        extend("patch_keys", keys)
        extend("patch_bias", biases)
        extend("patch_values", values / scale)
        extend("patch_value_scale", torch.full_like(values, scale))
        extend("patch_edit_ids", ids.to(current.device))
        extend("patch_subjects", torch.nn.functional.normalize(reads.float(), dim=1))
        extend("patch_bare_subjects", torch.nn.functional.normalize(bare_reads.float(), dim=1))
        self._publish_counts(adapter)
        return n

    def _per_patch_reads(self, rows: torch.Tensor | None, n: int, name: str) -> torch.Tensor:
        """``n`` patches' subject reads from ``rows``: None (zero rows), one row for all, or one per patch."""
        reads = torch.zeros(n, self.output_dim) if rows is None else self._as_rows(rows, self.output_dim, name)
        if reads.shape[0] == 1:
            reads = reads.expand(n, -1)
        if reads.shape[0] != n:
            raise InvalidPatchError(f"{name} must be one row or one per patch ({n}), got {reads.shape[0]}")
        return reads

    def _take(self, adapter: str, names: Sequence[str], keep: torch.Tensor | None) -> None:
        for name in names:
            old = getattr(self, name)[adapter]
            self._set(adapter, name, old.detach()[keep.to(old.device)] if keep is not None else old.detach()[:0])

    def commit(self, adapter_name: str | None = None) -> int:
        """Freeze the in-progress patches (``v = v' ⊙ a``) into the committed set; returns how many moved."""
        adapter = self._resolve_adapter(adapter_name)
        n = self.patch_keys[adapter].shape[0]
        if n:
            moved = {
                "patch_frozen_keys": self.patch_keys[adapter],
                "patch_frozen_bias": self.patch_bias[adapter],
                "patch_frozen_values": self.patch_values[adapter] * self.patch_value_scale[adapter],
                "patch_frozen_edit_ids": self.patch_edit_ids[adapter],
                "patch_frozen_subjects": self.patch_subjects[adapter],
                "patch_frozen_bare_subjects": self.patch_bare_subjects[adapter],
            }
            for name, new in moved.items():
                old = getattr(self, name)[adapter]
                self._set(adapter, name, torch.cat([old, new.detach().to(dtype=old.dtype)]))
            self._take(adapter, TRAINABLE, None)
        self._publish_counts(adapter)
        return n

    def discard(self, adapter_name: str | None = None) -> int:
        """Drop the in-progress patches (a failed edit); committed patches are untouched. Returns how many."""
        adapter = self._resolve_adapter(adapter_name)
        n = self.patch_keys[adapter].shape[0]
        self._take(adapter, TRAINABLE, None)
        self._publish_counts(adapter)
        return n

    def remove_edit(self, edit_id: int, adapter_name: str | None = None) -> int:
        """Delete exactly the neurons created by ``edit_id`` (committed or not); returns how many were removed."""
        adapter = self._resolve_adapter(adapter_name)
        frozen_keep = self.patch_frozen_edit_ids[adapter] != edit_id
        keep = self.patch_edit_ids[adapter] != edit_id
        removed = int((~frozen_keep).sum() + (~keep).sum())
        if removed == 0:
            present = sorted(set(self.edit_ids(adapter).tolist()))
            raise InvalidPatchError(f"no patch of adapter {adapter!r} has edit id {edit_id}; present ids: {present}")
        self._take(adapter, FROZEN, frozen_keep)
        self._take(adapter, TRAINABLE, keep)
        self._publish_counts(adapter)
        return removed

    def committed(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The committed patch tensors of an adapter (name → tensor) and its gate frame, e.g. for a resumable run's
        checkpoint."""
        adapter = self._resolve_adapter(adapter_name)
        return {name: getattr(self, name)[adapter].detach().cpu().clone() for name in (*FROZEN, GATE_FRAME)}

    def restore_committed(self, tensors: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Replace the committed patches (and the gate frame, when given) with ``tensors`` (from ``committed()``) and
        drop in-progress ones.

        Validated before anything changes: the tensors must be present (the subject reads and the frame may be missing:
        a checkpoint from before the gate or its frame), finite and agree on the neuron count.
        """
        adapter = self._resolve_adapter(adapter_name)
        names = (*FROZEN, GATE_FRAME)
        required = {name for name in names if not SPECS[name].optional}
        if not required <= set(tensors) <= set(names):
            raise InvalidPatchError(f"expected tensors {sorted(names)}, got {sorted(tensors)}")
        rows = tensors["patch_frozen_keys"].shape[0]
        current = getattr(self, GATE_FRAME)[adapter].detach().cpu()
        tensors = {name: tensors.get(name, torch.zeros(self._shape(name, rows))) for name in FROZEN} | {
            GATE_FRAME: tensors.get(GATE_FRAME, current)
        }
        for name in names:
            tensor = tensors[name]
            if tuple(tensor.shape) != self._shape(name, rows):
                raise InvalidPatchError(f"{name} has shape {tuple(tensor.shape)}, expected {self._shape(name, rows)}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise InvalidPatchError(f"{name} contains NaN or inf")
        for name in names:
            old = getattr(self, name)[adapter]
            self._set(adapter, name, tensors[name].to(device=old.device, dtype=old.dtype).clone())
        self.discard(adapter)

    def _shape(self, name: str, rows: int) -> tuple[int, ...]:
        """Shape of patch tensor ``name`` holding ``rows`` neurons."""
        return SPECS[name].shape_for(patch_sizes(rows, self.query_dim, self.output_dim))

    def resize_for_load(self, adapter_name: str, shapes: PatchShapes) -> None:
        """Reshape the patch tensors to a checkpoint's (already validated) counts so ``load_state_dict`` fills them."""
        for name in self.tensor_names:
            old = getattr(self, name)[adapter_name]
            rows = shapes.rows(SPECS[name].frozen)
            self._set(adapter_name, name, torch.zeros(self._shape(name, rows), device=old.device, dtype=old.dtype))
        self._publish_counts(adapter_name)

    # ------------------------------------------------------------------------------------ peft lifecycle
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise PatchMergeError(MERGE_IMPOSSIBLE)

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo."""

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Detach from the model for ``unload()``: remove the query hook and hand back the original projection."""
        if merge:
            raise PatchMergeError(MERGE_IMPOSSIBLE)
        self._hook.remove()
        self._query = None
        for gate in self.gates.values():
            gate.remove()
        return self.get_base_layer()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._activations.pop(adapter_name, None)
        named = {config.gate_module for config in self.patch_config.values()}
        for name in [name for name in self.gates if name not in named]:
            self.gates.pop(name).remove()
