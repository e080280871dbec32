"""The evaluation suite: what a user of an edited model sees, measured against the model before the edits.

A suite is a list of :class:`Part` s. When it is built, the model it is given is the *reference* (the model before the
edits): a part without fixed continuations is answered by it greedily (``generate``), and every part is then read
once by teacher forcing. :meth:`EvaluationSuite.evaluate` reads the same sequences from the model as it is now and
reports, per part:

- ``exact``: the fraction of rows whose tokens all agree — for a part read against the reference, the greedy output
  is unchanged (greedy decoding is a chain of argmaxes, so equal argmaxes at every position *are* equal outputs); for
  a part read against its labels, greedy generation writes the label (and its end token, when it has one);
- ``token``: the mean per-row fraction of agreeing tokens (EasyEdit's teacher-forced accuracy);
- for a perplexity part: the perplexity before and after, and its relative ``change``.

Parts can belong to edits (``groups``): near neighbours of edit 7 count only once edit 7 is made. The reference
(continuations, argmax tokens, log-probabilities) saves to tensors, so a resumed run does not recompute it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Any

import torch
from torch import nn

from transformer_patcher.core.decoding import greedy_continuations
from transformer_patcher.experiments.evaluation.forced import ForcedReads, Reads
from transformer_patcher.methods.patcher.replay import ForwardReplay
from transformer_patcher.metrics.core import perplexity, relative_change, row_agreement

REFERENCE = "reference"
LABELS = "labels"
PERPLEXITY = "perplexity"


@dataclass
class Part:
    """Rows of ``prompt + continuation`` scored together.

    ``continuations`` None: the reference model's greedy continuation (at most ``max_new_tokens``, up to a stop id).
    ``against``: ``reference`` (post-edit argmax vs the reference model's), ``labels`` (vs the continuation tokens)
    or ``perplexity`` (log-probabilities of the continuation text). ``groups``: the edit each row belongs to.
    """

    name: str
    prompts: list[list[int]]
    continuations: list[list[int]] | None = None
    against: str = REFERENCE
    groups: list[int] | None = None
    max_new_tokens: int = 16
    stop_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.against not in (REFERENCE, LABELS, PERPLEXITY):
            raise ValueError(f"against must be {REFERENCE!r}, {LABELS!r} or {PERPLEXITY!r}, got {self.against!r}")
        if not self.prompts:
            raise ValueError(f"part {self.name!r} has no rows")
        if self.continuations is None and self.against != REFERENCE:
            raise ValueError(f"part {self.name!r} is read against {self.against}, so it needs its continuations")
        if self.groups is not None and len(self.groups) != len(self.prompts):
            raise ValueError(f"part {self.name!r}: {len(self.groups)} groups for {len(self.prompts)} rows")


@dataclass
class _Scored:
    part: Part
    reads: ForcedReads
    continuations: list[list[int]]
    reference: Reads


class EvaluationSuite:
    """The parts, with the reference read from ``model`` as it is now. ``replay`` (T-Patcher: a
    :class:`ForwardReplay` over the patched layer) makes later evaluations recompute only what patches change."""

    def __init__(
        self,
        model: nn.Module,
        parts: Sequence[Part],
        pad_id: int,
        batch_size: int = 32,
        replay: ForwardReplay | None = None,
        progress: bool = True,
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"part names must be unique, got {names}")
        self.model = model
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.replay = replay
        self.progress = progress
        self.seconds: dict[str, float] = {}  # reference cost of each part (generation + reading)
        self._parts: list[_Scored] = []
        self._last: dict[str, Reads] = {}
        saved = _unpack(state, parts) if state is not None else {}
        for part in parts:
            started = time.perf_counter()
            self._parts.append(self._score_reference(part, saved.get(part.name)))
            self.seconds[part.name] = time.perf_counter() - started

    def _score_reference(self, part: Part, saved: dict[str, Any] | None) -> _Scored:
        if saved is not None:
            continuations = saved["continuations"]
        elif part.continuations is not None:
            continuations = part.continuations
        else:
            continuations = greedy_continuations(
                self.model,
                part.prompts,
                part.stop_ids,
                part.max_new_tokens,
                self.pad_id,
                self.batch_size,
                self.progress,
                f"reference: {part.name}",
            )
        reads = ForcedReads(
            part.prompts, continuations, self.pad_id, self.batch_size, self.replay, f"reading {part.name}"
        )
        if saved is None:
            reference = reads.run(self.model, self.progress)
        elif saved["argmax"].numel() != reads.offsets[-1] or saved["log_probs"].numel() != reads.offsets[-1]:
            raise ValueError(f"the saved suite reference of part {part.name!r} has the wrong number of reads")
        else:
            reference = Reads(saved["argmax"], saved["log_probs"], reads.offsets)
        return _Scored(part, reads, continuations, reference)

    @property
    def parts(self) -> list[Part]:
        return [scored.part for scored in self._parts]

    def continuations(self, name: str) -> list[list[int]]:
        """The continuations a part is read over (the reference's greedy outputs for generated parts)."""
        return next(s.continuations for s in self._parts if s.part.name == name)

    # ------------------------------------------------------------------------------------------- scoring
    def evaluate(self, groups: Collection[int] | None = None) -> dict[str, dict[str, float]]:
        """Every part's measures for the model as it is now; rows of grouped parts count only when their group is in
        ``groups`` (None: all rows). A part with no counted row is left out."""
        results = {}
        for scored in self._parts:
            rows = _rows(scored.part, groups)
            if not rows:
                continue
            started = time.perf_counter()
            reads = scored.reads.run(self.model, self.progress)
            results[scored.part.name] = {**_measures(scored, reads, rows), "seconds": time.perf_counter() - started}
            self._last[scored.part.name] = reads
        return results

    def row_agreement(self, name: str) -> list[float]:
        """Per row of part ``name``, the fraction of agreeing tokens in the last :meth:`evaluate` (1.0: exact)."""
        scored = next((s for s in self._parts if s.part.name == name), None)
        if scored is None or name not in self._last or scored.part.against == PERPLEXITY:
            raise KeyError(f"no evaluated agreement part named {name!r}")
        return _agreement(scored, self._last[name], list(range(len(scored.part.prompts))))

    def reference_scores(self, groups: Collection[int] | None = None) -> dict[str, dict[str, float]]:
        """The same measures for the reference model itself (the "base" column: 1.0 against itself, its own
        accuracy against labels)."""
        results = {}
        for scored in self._parts:
            rows = _rows(scored.part, groups)
            if rows:
                results[scored.part.name] = _measures(scored, scored.reference, rows)
        return results

    # ------------------------------------------------------------------------------------------- storage
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The reference as tensors (for a checkpoint): continuations, argmax tokens and log-probabilities."""
        tensors = {}
        for scored in self._parts:
            name = scored.part.name
            tensors[f"{name}/continuations"] = torch.tensor([t for c in scored.continuations for t in c])
            tensors[f"{name}/lengths"] = torch.tensor([len(c) for c in scored.continuations])
            tensors[f"{name}/argmax"] = scored.reference.argmax
            tensors[f"{name}/log_probs"] = scored.reference.log_probs
            tensors[f"{name}/prompts"] = _digest(scored.part.prompts)
        return tensors


def _digest(prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """A short content hash of a part's prompts, so a saved reference is never applied to other prompts."""
    digest = hashlib.sha256(repr([list(p) for p in prompts]).encode()).digest()
    return torch.tensor(list(digest[:8]), dtype=torch.uint8)


def _rows(part: Part, groups: Collection[int] | None) -> list[int]:
    if part.groups is None or groups is None:
        return list(range(len(part.prompts)))
    wanted = set(groups)
    return [row for row, group in enumerate(part.groups) if group in wanted]


def _measures(scored: _Scored, reads: Reads, rows: list[int]) -> dict[str, float]:
    part = scored.part
    if part.against == PERPLEXITY:
        before = perplexity(_concat(scored.reference.log_probs, scored.reference, rows))
        after = perplexity(_concat(reads.log_probs, reads, rows))
        return {"before": before, "perplexity": after, "change": relative_change(after, before), "n": len(rows)}
    fractions = _agreement(scored, reads, rows)
    return {"exact": sum(f == 1.0 for f in fractions) / len(rows), "token": sum(fractions) / len(rows), "n": len(rows)}


def _agreement(scored: _Scored, reads: Reads, rows: list[int]) -> list[float]:
    """Per row, the fraction of argmax tokens that agree with the labels or the reference's."""
    predicted = [reads.argmax_of(row).tolist() for row in rows]
    if scored.part.against == LABELS:
        expected = [scored.continuations[row] for row in rows]
    else:
        expected = [scored.reference.argmax_of(row).tolist() for row in rows]
    return row_agreement(predicted, expected)


def _concat(values: torch.Tensor, reads: Reads, rows: list[int]) -> list[float]:
    return torch.cat([values[reads.offsets[r] : reads.offsets[r + 1]] for r in rows]).tolist()


def _unpack(state: dict[str, torch.Tensor], parts: Sequence[Part]) -> dict[str, dict[str, Any]]:
    """Saved references by part name; a state that does not hold every part, or holds other prompts, is refused."""
    unpacked = {}
    for part in parts:
        name = part.name
        keys = [f"{name}/{k}" for k in ("continuations", "lengths", "argmax", "log_probs", "prompts")]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"the saved suite reference has no {missing[0]!r}: it was made for other parts")
        if not torch.equal(state[keys[4]], _digest(part.prompts)):
            raise ValueError(f"the saved suite reference of part {name!r} was made for other prompts")
        flat, ends = state[keys[0]].tolist(), list(accumulate(state[keys[1]].tolist(), initial=0))
        continuations = [flat[start:end] for start, end in pairwise(ends)]
        unpacked[name] = {"continuations": continuations, "argmax": state[keys[2]], "log_probs": state[keys[3]]}
    return unpacked
