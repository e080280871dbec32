"""Teacher-forced reads over fixed token sequences: what every measure of the evaluation suite is computed from.

A sequence is a prompt plus a continuation (a reference answer, a pre-edit greedy output, or a window of text); the
reads are the positions that predict each continuation token. :class:`ForcedReads` pads the sequences into batches
once — sorted by length, right-padded, the LM head asked only for the read positions (``logits_to_keep``) — and
:meth:`ForcedReads.run` returns, for any state of the model, the argmax token and the log-probability of the
continuation token at every read.

Greedy decoding is a chain of argmaxes, so a model's greedy output equals a reference continuation exactly when the
argmax at every read is that continuation's token: comparing reads is comparing generations, without generating.

With a :class:`~transformer_patcher.methods.patcher.replay.ForwardReplay` (T-Patcher: edits change one FFN), the first
run records the layers below the patch for every batch and later runs recompute only what the patches can change, which
is what makes re-evaluating a long stream every few edits affordable. Outputs no replayed pass reads are dropped from
the recordings, so they cost a few hidden-state vectors per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn
from tqdm.auto import tqdm

from transformer_patcher.core.decoding import ForcedBatch, forced_batch
from transformer_patcher.core.modes import eval_mode
from transformer_patcher.core.placement import execution_device
from transformer_patcher.core.tasks import accepts_argument, on_device
from transformer_patcher.methods.patcher.replay import ForwardReplay, Recording

MAX_LOGIT_ROWS = 2048  # logits kept per batch (rows × vocabulary floats): bounds memory for long windows


@dataclass
class Reads:
    """Per read, in sequence order: the argmax token and log p(continuation token). ``offsets[i]:offsets[i+1]`` are
    sequence ``i``'s reads."""

    argmax: torch.Tensor
    log_probs: torch.Tensor
    offsets: list[int]

    def argmax_of(self, index: int) -> torch.Tensor:
        return self.argmax[self.offsets[index] : self.offsets[index + 1]]


class ForcedReads:
    """Sequences ``prompts[i] + continuations[i]`` prepared for teacher forcing; each continuation must be non-empty.

    ``replay`` (optional) must wrap the model later passed to :meth:`run`; its recordings are kept across runs.
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        pad_id: int,
        batch_size: int = 32,
        replay: ForwardReplay | None = None,
        description: str = "forced",
    ) -> None:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        if any(not c for c in continuations) or any(not p for p in prompts):
            raise ValueError("every sequence needs a non-empty prompt and a non-empty continuation")
        self.size = len(prompts)
        self.lengths = [len(c) for c in continuations]
        self.offsets = list(accumulate(self.lengths, initial=0))
        self.replay = replay
        self.description = description
        self._recordings: dict[int, Recording] = {}
        self._batches = self._prepare(prompts, continuations, pad_id, batch_size)

    def _prepare(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int, batch_size: int
    ) -> list[ForcedBatch]:
        order = sorted(range(self.size), key=lambda i: (len(prompts[i]) + len(continuations[i]), i))
        batches, start = [], 0
        while start < len(order):
            chunk = order[start : start + batch_size]
            while len(chunk) > 1 and len(chunk) * max(self.lengths[i] for i in chunk) > MAX_LOGIT_ROWS:
                chunk = chunk[: len(chunk) // 2]
            batches.append(forced_batch(chunk, prompts, continuations, pad_id))
            start += len(chunk)
        return batches

    def run(self, model: nn.Module, progress: bool = False) -> Reads:
        """Argmax and label log-probabilities at every read, for ``model`` as it is now (on the CPU, wherever the model
        runs)."""
        n_reads = self.offsets[-1]
        argmax = torch.empty(n_reads, dtype=torch.long)
        log_probs = torch.empty(n_reads, dtype=torch.float32)
        position = torch.tensor(self.offsets[:-1])
        use_keep = accepts_argument(model, "logits_to_keep")
        device = execution_device(model)
        with eval_mode(model), torch.no_grad():
            for index, stored in enumerate(
                tqdm(self._batches, desc=self.description, leave=False, disable=not progress)
            ):
                batch = on_device(stored, device)
                logits = self._forward(model, index, batch, use_keep)
                picked = logits[batch.rows, batch.kept if use_keep else batch.cols].float()
                where = _read_slots(batch, position, self.lengths)
                argmax[where] = picked.argmax(-1).cpu()
                log_probs[where] = (picked.gather(1, batch.labels[:, None]).squeeze(1) - picked.logsumexp(-1)).cpu()
        return Reads(argmax, log_probs, self.offsets)

    def _forward(self, model: nn.Module, index: int, batch: ForcedBatch, use_keep: bool) -> torch.Tensor:
        kwargs = dict(batch.inputs, use_cache=False)
        if use_keep:
            kwargs["logits_to_keep"] = batch.keep

        def forward() -> torch.Tensor:
            return model(**kwargs).logits

        if self.replay is None:
            return forward()
        if index in self._recordings:
            with self.replay.replaying(self._recordings[index]):
                return forward()
        if self.replay.unread is None:  # once: which recorded outputs a replay never reads (same for every batch)
            probe = {**kwargs, **{k: v[:1] for k, v in batch.inputs.items()}}
            self.replay.record(lambda: model(**probe).logits)
            self.replay.find_unread(lambda: model(**probe).logits)
        logits = self.replay.record(forward)
        self._recordings[index] = self.replay.recording()
        return logits


def _read_slots(batch: ForcedBatch, position: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Where each of the batch's reads goes in the flat, sequence-ordered result."""
    return torch.cat([position[i] + torch.arange(lengths[i]) for i in batch.order])
