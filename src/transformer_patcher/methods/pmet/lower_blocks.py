"""The blocks below the delta layer, run once per chunk of target optimisation instead of at every step.

The deltas are added inside block ``layer`` (its attention and FFN outputs, or its output for the MEMIT ablation),
and attention is causal, so what enters that block at every token of a step is the same at every step: the lower
blocks' output on the steps' tokens never changes. The first forward runs every block and records the input of block
``layer``; every later forward passes the lower blocks by and feeds block ``layer`` the recorded input of the tokens
it runs (a finished request's tokens leave the packed sequence). On SmolLM2 with the deltas at block 8 of 30 that is
8 blocks of each step's forward, which the backward never reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from transformer_patcher.methods.pmet.architecture import block_modules


class LowerBlocks:
    """Records block ``layer``'s input on the first forward and replays it on later ones (see the module doc).

    Before each forward :attr:`token_row` must name the batch row of every token the forward runs, in order; the
    packed order of a step's tokens is the first forward's with the finished rows' tokens left out. Blocks whose
    forward does not return the hidden states alone (a tuple, in older transformers) are never passed by.
    """

    def __init__(self, base: nn.Module, layer: int) -> None:
        name = block_modules(base, layer).block
        parent, _, index = name.rpartition(".")
        self.lower: list[nn.Module] = list(base.get_submodule(parent))[: int(index)] if parent else []
        self.resume = base.get_submodule(name)
        self.token_row = torch.zeros(0, dtype=torch.long)
        self.recorded: torch.Tensor | None = None
        self.recorded_row = torch.zeros(0, dtype=torch.long)
        self.passable = False

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Record and replay while inside; every block runs as before once outside."""
        if not self.lower:
            yield
            return
        handles = [
            self.lower[-1].register_forward_hook(self._check),
            self.resume.register_forward_pre_hook(self._feed, with_kwargs=True),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for block in self.lower:
                block.__dict__.pop("forward", None)

    def _check(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self.passable = isinstance(output, torch.Tensor)

    def _feed(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.recorded is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.passable:
                self.recorded, self.recorded_row = hidden.detach(), self.token_row
                for block in self.lower:
                    block.forward = pass_by  # an instance attribute: nn.Module.__call__ runs it instead
            return None
        return with_hidden(args, kwargs, self.recorded[:, torch.isin(self.recorded_row, self.token_row)])


def pass_by(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    """A block's forward that leaves the hidden states as they come (set as an instance's ``forward``)."""
    return hidden_states


def with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """A block's forward arguments with ``hidden`` as its hidden states (a forward pre-hook's return)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
