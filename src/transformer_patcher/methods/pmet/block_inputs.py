"""The input of one block, kept chunk by chunk, so the layer loop's next read of the same prompts starts there.

Step i of the layer loop reads its prompts under the updates of layers ``l_0 … l_{i−1}``; step i+1 adds only
``l_i``'s. What enters block ``l_i`` is the same at both steps (the blocks below it carry the same updates), so step i
records it for every chunk of prompts, and step i+1 passes the blocks below ``l_i`` by and feeds ``l_i`` the record.
On SmolLM2 with layers 0–8 that is 28 of the loop's 81 block runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from transformer_patcher.methods.pmet.architecture import block_modules


class BlockInputs:
    """Block ``layer``'s input on each forward while :meth:`recorded`, fed back in the same order while
    :meth:`replayed` (the forwards must run the same chunks of the same prompts, under the same updates below it).

    Blocks whose forward does not return the hidden states alone (a tuple, in older transformers) cannot be passed
    by: :attr:`replayable` is then False and a caller runs every block."""

    def __init__(self, base: nn.Module, layer: int) -> None:
        name = block_modules(base, layer).block
        parent, _, index = name.rpartition(".")
        self.block = base.get_submodule(name)
        self.lower: list[nn.Module] = list(base.get_submodule(parent))[: int(index)] if parent else []
        self.inputs: list[torch.Tensor] = []
        self.replayable = not self.lower  # a first block has nothing below it to pass by

    @contextmanager
    def recorded(self) -> Iterator[None]:
        self.inputs = []
        handles = [self.block.register_forward_pre_hook(self._record, with_kwargs=True)]
        if self.lower:
            handles.append(self.lower[-1].register_forward_hook(self._check))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replayed(self, feed: Callable[[], torch.Tensor] | None = None) -> Iterator[None]:
        """While inside, the blocks below are passed by and the block gets ``feed()`` at each forward (by default the
        recorded inputs in turn)."""
        if not self.replayable:
            raise RuntimeError("this block's input cannot be fed back: the blocks below it return tuples")
        feed = feed or iter(self.inputs).__next__
        handle = self.block.register_forward_pre_hook(lambda _m, a, k: with_hidden(a, k, feed()), with_kwargs=True)
        for block in self.lower:
            block.forward = pass_by  # an instance attribute: nn.Module.__call__ runs it instead
        try:
            yield
        finally:
            handle.remove()
            for block in self.lower:
                block.__dict__.pop("forward", None)

    def _record(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.inputs.append((args[0] if args else kwargs["hidden_states"]).detach())

    def _check(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self.replayable = isinstance(output, torch.Tensor)


def pass_by(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    """A block's forward that leaves the hidden states as they come (set as an instance's ``forward``)."""
    return hidden_states


def with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """A block's forward arguments with ``hidden`` as its hidden states (a forward pre-hook's return)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
