"""The subject gate: a patch adds nothing until the subject of its edit has been read.

A patch's key reads the patched FFN's query at the answer position, which mostly encodes the question's wording: a
CounterFact neighbour (the same relation asked of another subject) fires it as readily as the edit. An early block's
output at the subject's last token names the subject instead (``bench/key_reads.py``: it retrieves its own fact among
200 at 0.99, the last FFN's query at 0.19). So each patch also holds its edit's *subject read*, that output as a unit
vector, and is open at a position once the running maximum, over the positions read so far, of the cosine between the
block's output and the read reaches the threshold. On a 198-edit CounterFact dev stream a gate at block 4 and 0.8 kept
rephrases open 96.5 % of the time and neighbours 0 % (``bench/subject_gate.py``, docs/results.md).

A subject that opens a text is read with little before it: on 60 hand-written zsRE records whose rephrases mostly
open with their subject ("Bratislava lies on which river?"), 13 of 35 wrong rephrases had the gate shut. So a patch
may hold a second, *bare* subject read, the subject named alone at a text's start, and is open where either read is
met (``bench/gate_frame.py --subject-views '{}'``: on the zsRE dev part it opens no more patches on other questions).

A text's first token and padding are left out: every text's first token reads alike (the attention sink), so it names
no subject. The running maximum is carried over the one-token steps of a cached decode and starts again with each new
text (a forward without cached positions). Beam search reorders its cache but not these maxima: the beams of one
prompt share the prompt's maxima, and only a subject first named by the beams' own text can open a patch on the
wrong beam. A zero subject row is a patch without a gate (no subject, or a file written before the gate existed).

The cosine is taken in the gate's *frame*: the block's output minus its mean over ordinary text, each feature divided
by its spread there (``measure_frame``). A raw residual stream shares a large common direction: on Gemma-3's block 3
a subject read meets the same question asked of other subjects at cosine 0.91-0.98, so a 0.8 gate opened everywhere;
in the frame at 0.02-0.41 (5th to 95th percentile, SmolLM2 and Gemma-3; ``bench/gate_frame.py``). A zero frame is
the plain cosine (a file written before the frame existed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.functional import normalize

FRAME_FLOOR = 1e-3  # a feature's spread is at least this fraction of the median spread: a constant one adds nothing


def measure_frame(outputs: torch.Tensor) -> torch.Tensor:
    """The gate frame of a block's outputs ``(positions, hidden)`` over ordinary text: rows (mean, 1 / spread)."""
    if outputs.dim() != 2 or outputs.shape[0] < 2:
        raise ValueError(f"a gate frame needs the outputs of at least 2 positions, got shape {tuple(outputs.shape)}")
    outputs = outputs.double()
    spread = outputs.std(dim=0)
    spread = spread.clamp(min=FRAME_FLOOR * float(spread.median()) + torch.finfo(torch.float32).tiny)
    return torch.stack([outputs.mean(dim=0), 1 / spread]).float()


def in_frame(outputs: torch.Tensor, frame: torch.Tensor | None) -> torch.Tensor:
    """``outputs`` (..., hidden) in the gate frame (unchanged for None or a zero frame), as unit vectors."""
    if frame is not None and bool(frame.any()):
        frame = frame.to(device=outputs.device, dtype=torch.float32)
        outputs = (outputs.float() - frame[0]) * frame[1]
    return normalize(outputs.float(), dim=-1)


class GateReads:
    """Hooks that keep, for each forward pass, the gate block's output per position (zero where left out), and the
    running maxima carried between the steps of a cached decode.

    ``owner`` is the module that runs the block list (it receives ``attention_mask`` and ``past_key_values`` as
    keywords, as transformers' causal LMs pass them); ``block`` is the gate block.
    """

    def __init__(self, owner: nn.Module, block: nn.Module) -> None:
        self.block = block
        self.outputs: torch.Tensor | None = None  # (batch, positions, hidden), zero where left out
        self._keep: torch.Tensor | None = None  # (batch, positions, 1): the positions read
        self._framed: tuple[torch.Tensor | None, torch.Tensor] | None = None  # this pass's reads in the last frame
        self._mask: torch.Tensor | None = None
        self._past = 0
        self._continues = False
        self._carry: dict[Any, torch.Tensor] = {}
        self._shared: dict[Any, SharedReads] = {}  # per patch set: its reads folded, while they are unchanged
        self._handles = [
            owner.register_forward_pre_hook(self._start, with_kwargs=True),
            block.register_forward_hook(self._read),
        ]

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs = None

    def _start(self, _module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = kwargs.get("past_key_values")
        self._past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        self.outputs = self._framed = None  # a block that does not run this pass leaves nothing stale behind

    def _read(self, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        hidden = (output[0] if isinstance(output, tuple) else output).detach()
        batch, length = hidden.shape[:2]
        mask = self._mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            mask = torch.ones(batch, self._past + length, device=hidden.device)
        mask = mask.to(hidden.device)
        seen = mask.cumsum(1)[:, -length:]  # real tokens read so far, this one included
        keep = (mask[:, -length:] > 0) & (seen > 1)  # padding and each text's first token are left out
        self._continues = mask.shape[1] > length  # cached positions precede these: carry the running maxima on
        self._keep = keep[..., None]
        self.outputs = hidden.float() * self._keep
        self._framed = None

    def reads(self, frame: torch.Tensor | None = None) -> torch.Tensor:
        """This pass's outputs in ``frame`` as unit vectors (zero where left out), shape (batch, positions, hidden);
        computed once per pass and frame, however many patch sets read them."""
        if self.outputs is None or self._keep is None:
            raise RuntimeError(
                "the patch layer has a subject gate but its gate block did not run in this forward pass (or the "
                "model was called below the module that runs the blocks); call the model itself"
            )
        if self._framed is None or self._framed[0] is not frame:
            self._framed = (frame, in_frame(self.outputs, frame) * self._keep)
        return self._framed[1]

    def opened(
        self,
        subjects: torch.Tensor,
        threshold: float,
        key: Any,
        frame: torch.Tensor | None = None,
        bare: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Where each patch is open in this pass, shape (batch, positions, patches): its subject's running maximum
        cosine in ``frame`` reaches ``threshold``, or its bare subject read's does (``bare``, one row per patch, a
        zero row: none), or it has no subject (a zero row). ``key`` names the patch set whose maxima carry over to
        the next step of a cached decode.

        The neurons of one edit are added side by side and share its reads, so each run of neighbouring patches with
        the same reads is compared once (``SharedReads``, kept while the rows are unchanged) and its answer is
        handed to every neuron of the run: a 1,000-edit stream's 2,895 neurons hold 991 distinct reads."""
        shared = self._shared.get(key)
        if shared is None or not shared.matches(subjects, bare):
            shared = self._shared[key] = SharedReads(subjects, bare)
        running = self._running(shared.subjects, key, frame)
        opened = (running >= threshold) | shared.ungated.to(running.device)
        if shared.bare is not None:
            opened |= (self._running(shared.bare, (key, "bare"), frame) >= threshold) & shared.held.to(running.device)
        return opened if shared.inverse is None else opened[..., shared.inverse.to(running.device)]

    def running(self, subjects: torch.Tensor, key: Any, frame: torch.Tensor | None = None) -> torch.Tensor:
        """Per position of this pass and subject row (read in ``frame``), the highest cosine between a position read
        so far and the row, shape (batch, positions, patches), carried on from the last pass under ``key`` in a
        cached decode."""
        return self._running(normalize(subjects.detach().float(), dim=1), key, frame)

    def _running(self, rows: torch.Tensor, key: Any, frame: torch.Tensor | None) -> torch.Tensor:
        """``running`` for unit subject rows."""
        reads = self.reads(frame)
        if rows.shape[1] != reads.shape[-1]:
            raise RuntimeError(f"subject reads of width {rows.shape[1]} meet a gate block of {reads.shape[-1]}")
        running = (reads @ rows.to(reads.device).T).cummax(dim=1).values
        carried = self._carry.get(key)
        if self._continues and carried is not None and carried.shape == running[:, 0].shape:
            running = torch.maximum(running, carried[:, None])
        self._carry[key] = running[:, -1]
        return running


class SharedReads:
    """A patch set's subject reads (and bare reads) with each run of neighbouring patches that hold the same ones
    folded into one row, as unit vectors; ``inverse`` maps each patch to its run's row (None: no two fold).

    ``matches`` tells whether the patch set's rows are still the ones folded: the same tensor objects (held here, so
    their memory is not handed to another), at the same place and unchanged since (their version counters; a tensor
    made in inference mode keeps none, and is folded again each time)."""

    def __init__(self, subjects: torch.Tensor, bare: torch.Tensor | None) -> None:
        self._sources = (subjects, bare)
        self._stamp = _stamp(subjects, bare)
        subjects = subjects.detach()
        bare = bare.detach() if bare is not None and bool(bare.any()) else None
        both = subjects if bare is None else torch.cat([subjects, bare.to(subjects.device)], dim=1)
        starts = torch.ones(len(both), dtype=torch.bool, device=both.device)
        if len(both) > 1:
            starts[1:] = (both[1:] != both[:-1]).any(dim=1)
        first = starts.nonzero().squeeze(1)
        self.inverse = None if len(first) == len(both) else starts.cumsum(0) - 1
        self.subjects = normalize(subjects[first].float(), dim=1)
        self.ungated = subjects[first].norm(dim=1) == 0
        self.bare = None if bare is None else normalize(bare[first].float(), dim=1)
        self.held = None if bare is None else bare[first].norm(dim=1) > 0

    def matches(self, subjects: torch.Tensor, bare: torch.Tensor | None) -> bool:
        """Whether these are the rows folded, unchanged."""
        if subjects is not self._sources[0] or bare is not self._sources[1]:
            return False
        stamp = _stamp(subjects, bare)
        return stamp is not None and stamp == self._stamp


def _stamp(*tensors: torch.Tensor | None) -> tuple[Any, ...] | None:
    """Where tensors' contents are and how often they were changed in place, without reading them; None when one was
    made in inference mode and keeps no version counter."""
    if any(tensor is not None and tensor.is_inference() for tensor in tensors):
        return None
    return tuple(None if t is None else (t.data_ptr(), tuple(t.shape), t.device, t._version) for t in tensors)


def split_reads(reads: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A patch's subject reads, (hidden,) or (k, hidden) with the edit's first and then its bare one, as the layer takes
    them: (the edit's read as one row, the bare read as one row or None); (None, None) for None."""
    if reads is None:
        return None, None
    rows = reads.reshape(-1, reads.shape[-1])
    return rows[:1], rows[1:2] if len(rows) > 1 else None


def subject_position(tokenizer: Any, token_ids: list[int], subject: str) -> int | None:
    """Index of the last token of ``subject``'s last mention in ``token_ids`` (decoded as they are, template and all),
    or None when the text does not mention it."""
    text = tokenizer.decode(token_ids, clean_up_tokenization_spaces=False)
    start = text.rfind(subject)
    if not subject or start < 0:
        return None
    end = start + len(subject)
    for i in range(len(token_ids)):
        if len(tokenizer.decode(token_ids[: i + 1], clean_up_tokenization_spaces=False)) >= end:
            return i
    return None


def block_list(model: nn.Module, module_name: str) -> tuple[str, int]:
    """The block list holding ``module_name`` and the block's index in it: the innermost ``nn.ModuleList`` ancestor
    indexed by a number (``model.layers`` and 29 for ``model.layers.29.mlp.down_proj``)."""
    parts = module_name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if parts[k].isdigit() and isinstance(model.get_submodule(".".join(parts[:k])), nn.ModuleList):
            return ".".join(parts[:k]), int(parts[k])
    raise ValueError(f"'{module_name}' is not inside a numbered list of blocks; a subject gate needs one")
