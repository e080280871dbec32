"""Last-layer caching: record one forward pass, then recompute only what the trainable patches can change.

Patches change the output of one module, the FFN's value projection. Every module whose calls all *finish before*
that projection starts cannot depend on the patches, so its recorded output is replayed instead of recomputed: the
embeddings, all lower layers, the last layer's attention and the FFN's key/up projections, and the value projection's
own base output. What still runs each step is the patch term, the residual/norm code after the FFN, the final norm
and the head — the paper's observation that layers below the patched FFN never change, applied generically.

Replay reuses the model's own forward code, so no per-architecture tail is needed and ``cache=True`` computes exactly
what ``cache=False`` does (the tests check loss and gradients on every registered architecture). Modules are
short-circuited by temporarily replacing their ``forward``; hooks (the patch layer's query hook, accelerate's
offloading hooks) still run around it.

Evaluation keeps many recordings (one per batch of an evaluation suite) and replays each after every few edits. Most
recorded outputs are never read by a replayed pass (layer ``k``'s output only feeds layer ``k + 1``, which is itself
replayed), so :meth:`ForwardReplay.find_unread` finds them once, by replaying with NaN placeholders in their place and
checking the result stays bit-identical, and :meth:`ForwardReplay.recording` then keeps only the outputs that are read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from transformer_patcher.tuners.patcher.layer import PatcherLayer


class ForwardReplay:
    """Records a forward pass of ``model`` and replays everything upstream of ``layer``'s value projection."""

    def __init__(self, model: nn.Module, layer: PatcherLayer) -> None:
        self.model = model
        self.layer = layer
        modules = dict(model.named_modules())
        self.value_name = next(name for name, module in modules.items() if module is layer)
        key_suffix = "." + layer.key_module_name
        self.key_name = next(name for name in modules if name.endswith(key_suffix) or name == layer.key_module_name)
        self.base_name = f"{self.value_name}.base_layer"
        gates = ["." + name for name in layer.gates]  # the subject gate reads these blocks' outputs: always kept
        self.gate_names = {name for name in modules if any(name.endswith(g) or name == g[1:] for g in gates)}
        self._modules = modules
        self._plan: list[str] | None = None
        self._outputs: Recording = {}
        self._unread: set[str] | None = None  # what find_unread found; None until it has run

    def record(self, forward: Callable[[], Any]) -> Any:
        """Run ``forward`` (without gradients) and keep the outputs replay will need; returns its result."""
        names = list(self._modules) if self._plan is None else [*self._plan]
        starts: dict[str, list[int]] = defaultdict(list)
        ends: dict[str, list[int]] = defaultdict(list)
        outputs: dict[str, list[Any]] = defaultdict(list)
        clock = iter(range(1 << 62))

        def pre_hook(name: str) -> Callable[..., None]:
            return lambda module, args: starts[name].append(next(clock))

        def post_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                ends[name].append(next(clock))
                outputs[name].append(output)

            return hook

        handles = []
        for name in names:
            if name:
                module = self._modules[name]
                handles.append(module.register_forward_pre_hook(pre_hook(name)))
                handles.append(module.register_forward_hook(post_hook(name)))
        try:
            with torch.no_grad():
                result = forward()
        finally:
            for handle in handles:
                handle.remove()
        if self._plan is None:
            self._plan = self._make_plan(starts, ends)
        missing = [name for name in self._plan if name not in outputs]
        if missing:
            raise RuntimeError(f"the recorded forward pass did not call {missing[:3]}; cannot replay it")
        self._outputs = {name: outputs[name] for name in self._plan}
        return result

    def _make_plan(self, starts: dict[str, list[int]], ends: dict[str, list[int]]) -> list[str]:
        if len(starts.get(self.value_name, ())) != 1:
            raise RuntimeError(
                f"the patched projection '{self.value_name}' ran {len(starts.get(self.value_name, ()))} times in one "
                "forward pass; last-layer caching needs exactly one call (use cache=False)"
            )
        value_start = starts[self.value_name][0]

        def upstream(name: str) -> bool:
            if self.value_name.startswith(name + ".") or self.key_name.startswith(name + "."):
                return False  # an ancestor of the patched FFN must run so the FFN runs
            return bool(ends.get(name)) and max(ends[name]) < value_start

        chosen = {name for name in starts if name and upstream(name)}
        plan = [name for name in chosen if not any(name.startswith(other + ".") for other in chosen)]
        return [*plan, self.base_name]

    @property
    def unread(self) -> set[str] | None:
        """The modules :meth:`find_unread` found unread (None until it has run)."""
        return None if self._unread is None else set(self._unread)

    def recording(self) -> Recording:
        """The last recording, to replay later with ``replaying(recording)``; outputs :meth:`find_unread` found
        unread are kept as placeholders that take no memory."""
        unread = self._unread or set()
        return {name: _placeholders(out) if name in unread else out for name, out in self._outputs.items()}

    def find_unread(self, forward: Callable[[], Any]) -> set[str]:
        """Recorded modules whose outputs a replay of ``forward`` never reads (call right after ``record(forward)``).

        Each output is swapped for a NaN placeholder in turn; if the replayed result and the FFN query the patches
        read stay bit-identical, nothing read it. A subject gate's blocks are always read (with no patch yet, their
        outputs change nothing that this check can see). The union is checked once more as a whole, and an empty set is
        returned if that check fails.
        """
        if not self._outputs:
            raise RuntimeError("nothing recorded yet: call record() first")
        full = self._outputs
        expected = self._replay_result(forward, full)
        unread = set()
        for name in full:
            kept = name == self.base_name or name in self.gate_names
            swapped = None if kept else _placeholders(full[name])
            if swapped is not None and _same(self._replay_result(forward, {**full, name: swapped}), expected):
                unread.add(name)
        pruned = {name: _placeholders(out) if name in unread else out for name, out in full.items()}
        self._unread = unread if _same(self._replay_result(forward, pruned), expected) else set()
        return set(self._unread)

    def _replay_result(self, forward: Callable[[], Any], recording: Recording) -> Any:
        """The replayed output and the FFN query the patches read (what an empty patch set ignores, a trained one
        does not)."""
        try:
            with torch.no_grad(), self.layer.capture() as capture, self.replaying(recording):
                return forward(), capture.query
        except Exception:  # a placeholder that some code could not take (in-place write, shape checks): it is read
            return None

    @contextmanager
    def replaying(self, recording: Recording | None = None) -> Iterator[None]:
        """Inside the block, one forward pass of ``model`` replays ``recording`` (default: the last one recorded)."""
        recording = self._outputs if recording is None else recording
        if not recording:
            raise RuntimeError("nothing recorded yet: call record() first")
        patched: list[tuple[nn.Module, Any]] = []
        for name, outputs in recording.items():
            module = self._modules[name]
            patched.append((module, module.__dict__.get("forward")))
            module.forward = _replayer(name, outputs)
        try:
            yield
        finally:
            for module, previous in patched:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous


Recording = dict[str, list[Any]]
"""Recorded outputs by module name, one entry per call in the recorded pass."""


def _placeholders(outputs: list[Any]) -> list[Any] | None:
    """The outputs with every floating tensor replaced by a zero-memory NaN view of its shape; None when an output
    holds something else (an integer tensor, a cache object), which is then always kept."""
    replaced = [_placeholder(output) for output in outputs]
    return None if any(r is _KEEP for r in replaced) else replaced


_KEEP = object()


def _placeholder(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return _KEEP
        return torch.full((), float("nan"), dtype=value.dtype, device=value.device).expand(value.shape)
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        items = [_placeholder(item) for item in value]
        return _KEEP if any(i is _KEEP for i in items) else type(value)(items)
    return _KEEP


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):  # ModelOutput is a dict of its set fields
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _same(result: Any, expected: Any) -> bool:
    """Bit-identical tensors in the same structure (a failed replay, None, never matches)."""
    if result is None:
        return False
    got, want = list(_tensors(result)), list(_tensors(expected))
    return len(got) == len(want) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want, strict=True)
    )


def _replayer(name: str, outputs: list[Any]) -> Callable[..., Any]:
    calls = iter(outputs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return next(calls)
        except StopIteration:
            raise RuntimeError(
                f"'{name}' was called more often than in the recorded pass; replay one forward pass per replaying()"
            ) from None

    return forward
