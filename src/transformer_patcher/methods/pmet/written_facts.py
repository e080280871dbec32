"""The facts earlier batches wrote, driven again by every later batch's layer loop (``PMETHyperParams.replay_written``).

Counting the written keys (``Kₚ Kₚᵀ``, :mod:`~transformer_patcher.methods.pmet.written_keys`) keeps a later update
silent at the keys each fact was written at. But the writes in the lower edited layers move those keys, by 0.14 of
their norm at layer 4 up to 0.46 at layer 8 after ten batches of 100 (docs/results.md, Issue 18, sixteenth round), so
the keys the solve protects are no longer the ones the facts produce, and nothing drives a fact back once its output
has drifted. :class:`WrittenFacts` keeps each written fact's request and where its batch's write left it (the z
layer's read at the subject's last token, right after the batch went in); a later batch's layer loop treats them as
requests of its own, reading their keys and where they stand from the model as it is now, so its solve keeps them at
their value (residual ≈ 0 where they hold) and pulls back those that drifted. A one-batch write of every fact so far
is the same solve over the same keys, read once; this reads them after every batch.

With ``PMETHyperParams.rewrite_written`` the same record holds, for each fact, the value the last write *aimed* it
at (read on the unedited model, plus the scaled optimised change, and further where a resolve round aimed it further),
and every batch writes all of them again from the unedited weights: the record is then a batch of everything so far,
which the adapter's factors are replaced by, and each batch's record replaces the one before (``hold(...,
replacing=True)``).

The same bookkeeping as the written keys: :meth:`~WrittenFacts.hold` keeps a batch's facts pending,
:meth:`~WrittenFacts.commit` adds them once the batch is in the model and :meth:`~WrittenFacts.discard` drops them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from transformer_patcher.methods.pmet.requests import EditRequest


class WrittenFacts:
    """The requests written so far and their z values (d × n, float64, on the CPU: where their write left them, or
    where it aimed them), in writing order. ``state_prefix`` names the record in a checkpoint, so a replayed record
    and a rewritten one are never read as each other."""

    def __init__(self, state_prefix: str = "written_facts") -> None:
        self.state_prefix = state_prefix
        self.requests: list[EditRequest] = []
        self.values: torch.Tensor | None = None
        self.pending: tuple[list[EditRequest], torch.Tensor, bool] | None = None  # a batch's facts; replaces all?

    def __len__(self) -> int:
        return len(self.requests)

    def joined(self, requests: Sequence[EditRequest], values: torch.Tensor) -> tuple[list[EditRequest], torch.Tensor]:
        """The written facts followed by ``requests``, and their values beside ``values`` (on ``values``' device)."""
        if self.values is None:
            return list(requests), values
        return [*self.requests, *requests], torch.cat([self.values.to(values.device, values.dtype), values], dim=1)

    def hold(self, requests: Sequence[EditRequest], values: torch.Tensor, replacing: bool = False) -> None:
        """Keep a batch's facts until :meth:`commit` (its update is in the model) or :meth:`discard`; ``replacing``:
        they are the whole record to be (a rewrite's every fact, aimed anew), not facts to add to it."""
        if values.shape[1] != len(requests):
            raise ValueError(f"{values.shape[1]} values for {len(requests)} requests")
        self.pending = (list(requests), values.detach().to("cpu", torch.float64, copy=True), replacing)

    def commit(self) -> None:
        if self.pending is not None:
            requests, values, replacing = self.pending
            self.requests, self.values = (requests, values) if replacing else self.joined(requests, values)
        self.pending = None

    def discard(self) -> None:
        self.pending = None

    def reset(self) -> None:
        self.requests, self.values, self.pending = [], None, None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The values, and the requests as UTF-8 JSON bytes (a checkpoint holds tensors only; nothing is pickled)."""
        if self.values is None:
            return {}
        rows = [[r.prompt, r.subject, r.target] for r in self.requests]
        text = json.dumps(rows).encode("utf-8")
        return {
            f"{self.state_prefix}.values": self.values.clone(),
            f"{self.state_prefix}.requests": torch.frombuffer(bytearray(text), dtype=torch.uint8).clone(),
        }

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.reset()
        key = f"{self.state_prefix}.values"
        if key not in tensors:
            return
        rows = json.loads(bytes(tensors[f"{self.state_prefix}.requests"].tolist()).decode("utf-8"))
        values = tensors[key].to("cpu", torch.float64, copy=True)
        if values.shape[1] != len(rows):
            raise ValueError(f"a checkpoint holds {values.shape[1]} written values for {len(rows)} written facts")
        self.requests, self.values = [EditRequest(*row) for row in rows], values
