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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..adapter.layer import PatcherLayer


class ForwardReplay:
    """Records a forward pass of ``model`` and replays everything upstream of ``layer``'s value projection."""

    def __init__(self, model: nn.Module, layer: PatcherLayer) -> None:
        self.model = model
        modules = dict(model.named_modules())
        self.value_name = next(name for name, module in modules.items() if module is layer)
        key_suffix = "." + layer.key_module_name
        self.key_name = next(name for name in modules if name.endswith(key_suffix) or name == layer.key_module_name)
        self.base_name = f"{self.value_name}.base_layer"
        self._modules = modules
        self._plan: list[str] | None = None
        self._outputs: dict[str, list[Any]] = {}

    @property
    def recorded(self) -> bool:
        return bool(self._outputs)

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

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Inside the block, one forward pass of ``model`` replays the recorded upstream outputs."""
        if not self._outputs:
            raise RuntimeError("nothing recorded yet: call record() first")
        patched: list[tuple[nn.Module, Any]] = []
        for name, outputs in self._outputs.items():
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
