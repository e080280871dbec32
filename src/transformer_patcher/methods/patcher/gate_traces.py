"""Which earlier edits' memory rows a new gated patch can meet: the gate reads each edit's own text passed.

A patch behind a subject gate (``tuners/patcher/gate.py``) is open at a position once the running maximum, over the
positions read so far, of the cosine between the gate block's output (in the gate frame) and the patch's subject read
reaches the threshold. An earlier edit's memory row is the FFN query at one of its answer reads; whether a new patch
can fire there is that running maximum over the earlier edit's text up to that read. Its subject read alone does not
tell: over the 993 gated edits of the 1,000-record zsRE stream, 369 (row, later patch) pairs open the later gate, and
84 of them only at a position other than the earlier subject's (``bench/gate_rows.py``). So each edit keeps its
text's gate reads, and the question is answered exactly, as the adapter will answer it.
"""

from __future__ import annotations

import torch
from torch.nn.functional import normalize

_BLOCK_GAP = 4.0  # cosines lie in [-1, 1]: an offset this large keeps each edit's running maximum to its own text


class GateTraces:
    """Per appended memory row, the gate reads (unit vectors in the gate frame, zero where the gate leaves a position
    out) of its edit's text up to the row's read; a row without them (no gate, or appended from outside) opens every
    gate, as an ungated row would have to be treated."""

    def __init__(self, dim: int, reads: torch.Tensor | None = None, spans: torch.Tensor | None = None) -> None:
        self.reads = torch.zeros(0, dim) if reads is None else reads.float()
        self.spans = torch.zeros(0, 2, dtype=torch.long) if spans is None else spans.long()
        ends, starts = self.spans[:, 1], self.spans[:, 0]
        if self.reads.dim() != 2 or self.reads.shape[1] != dim:
            raise ValueError(f"gate reads must have shape (n, {dim}), got {tuple(self.reads.shape)}")
        if self.spans.dim() != 2 or self.spans.shape[1] != 2:
            raise ValueError(f"gate spans must have shape (rows, 2), got {tuple(self.spans.shape)}")
        if bool((starts < 0).any() | (ends < starts).any() | (ends > len(self.reads)).any()):
            raise ValueError(f"gate spans must lie within the {len(self.reads)} gate reads, start <= end")
        if not bool(torch.isfinite(self.reads).all()):
            raise ValueError("gate reads contain NaN or inf")

    def __len__(self) -> int:
        return len(self.spans)

    def append(self, reads: torch.Tensor | None, cols: torch.Tensor) -> None:
        """One edit's rows, one per read column in ``cols``: its text's gate reads (positions, dim), or None for rows
        that open every gate."""
        if reads is None:
            self.spans = torch.cat([self.spans, torch.zeros(len(cols), 2, dtype=torch.long)])
            return
        start = len(self.reads)
        ends = start + cols.detach().long().cpu() + 1
        self.reads = torch.cat([self.reads, reads.detach().float().cpu()[: int(cols.max()) + 1]])
        self.spans = torch.cat([self.spans, torch.stack([torch.full_like(ends, start), ends], dim=1)])

    def opening(self, subject: torch.Tensor, threshold: float) -> torch.Tensor:
        """Per row, whether a patch gated on ``subject`` is open at that row's read: a subject read (hidden,), or
        reads (k, hidden) any of which opens it (the edit's and its bare read)."""
        starts, ends = self.spans[:, 0], self.spans[:, 1]
        traced = ends > starts
        if not bool(traced.any()):
            return torch.ones(len(self), dtype=torch.bool)
        rows = normalize(subject.detach().float().cpu().reshape(-1, self.reads.shape[1]), dim=1)
        edits = torch.unique(starts[traced])
        block = (torch.searchsorted(edits, torch.arange(len(self.reads)), right=True) - 1).double()[:, None]
        running = torch.cummax((self.reads @ rows.T).double() + _BLOCK_GAP * block, dim=0).values - _BLOCK_GAP * block
        return ~traced | (running[(ends - 1).clamp_min(0)] >= threshold).any(dim=1)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.gate_reads": self.reads, f"{prefix}.gate_spans": self.spans}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str, rows: int, dim: int) -> GateTraces:
        """The traces a checkpoint holds for its ``rows`` appended rows; one written before them holds none, and its
        rows open every gate."""
        if f"{prefix}.gate_spans" not in tensors:
            return cls(dim, spans=torch.zeros(rows, 2, dtype=torch.long))
        traces = cls(dim, tensors.get(f"{prefix}.gate_reads"), tensors[f"{prefix}.gate_spans"])
        if len(traces) != rows:
            raise ValueError(f"{prefix}.gate_spans has {len(traces)} rows, expected {rows}")
        return traces
