"""The blocks below the delta layer, run once per window of target optimisation instead of at every step.

The deltas are added inside block ``layer`` (its attention and FFN outputs, or its output for the MEMIT ablation),
and attention is causal, so what enters that block at every token of a step is the same at every step: the lower
blocks' output on the steps' tokens never changes. The window's one forward of whole prompts (which also gives the
prefix keys, :func:`~transformer_patcher.methods.pmet.targets.prefix_keys`) records the input of block ``layer`` at
every suffix token; every step then passes the lower blocks by and feeds block ``layer`` the recorded input of the
tokens it runs, whichever requests are in the step. On SmolLM2 with the deltas at block 8 of 30 that is 8 blocks of
each step's forward, which the backward never reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from transformer_patcher.methods.pmet.block_inputs import BlockInputs


class LowerBlocks:
    """Records block ``layer``'s input at the suffix tokens and replays it at every step (see the module doc).

    Before each step's forward :attr:`tokens` must name each packed token's batch row and its column in the suffixes
    (``PromptBatch.input_ids``). Blocks whose forward does not return the hidden states alone (a tuple, in older
    transformers) are never passed by: every block then runs at every step.
    """

    def __init__(self, base: nn.Module, layer: int) -> None:
        self.inputs = BlockInputs(base, layer)
        self.recorded: torch.Tensor | None = None  # (rows, suffix width, d)
        self.tokens = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """While inside, block ``layer``'s input at each forward is appended to the list yielded; the caller sets
        :attr:`recorded` from it."""
        with self.inputs.recorded():
            yield self.inputs.inputs

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Pass the lower blocks by while inside (when recorded and passable); every block runs as before outside."""
        recorded = self.recorded
        if not self.inputs.lower or recorded is None or not self.inputs.replayable:
            yield
            return
        with self.inputs.replayed(lambda: recorded[self.tokens]):
            yield
