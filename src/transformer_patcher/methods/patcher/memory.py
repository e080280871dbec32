"""The memory bank: FFN queries a new patch must stay silent on (irrelevant inputs plus every earlier edit).

Scoring 40,000 memory rows every optimisation step is the editor's main cost on a CPU: one pass over the bank is
memory-bound. The bank keeps a transposed bfloat16 copy for a cheap first pass and recomputes in fp32 only the rows
that can reach the top-k. A rigorous rounding bound makes this exact: no row outside the candidate set can be in the
top-k, so the loss and its gradient equal the full-precision computation over the whole bank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from transformer_patcher.core.atomic import save_safetensors_atomic
from transformer_patcher.core.decoding import forced_batch, greedy_continuations
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.core.modes import eval_mode, up_to
from transformer_patcher.core.prompts import CHAT, RAW, PromptFormat
from transformer_patcher.core.tasks import Batch, Task
from transformer_patcher.tuners.fingerprint import content_key
from transformer_patcher.tuners.patcher.gate import split_reads

_BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_FILTER_MIN_ROWS = 4096  # below this a plain fp32 pass is as cheap as filtering
_EXACT_FALLBACK = 4  # more candidates than 1/4 of the bank: gathering them costs more than an exact fp32 ranking


def _whitening(total: torch.Tensor, outer: torch.Tensor, n: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision (float32) of ``n`` rows from their float64 sums ``Σx`` and ``Σxxᵀ``, the covariance
    ridged by ``ridge`` × its mean variance."""
    if n < 2:
        raise ValueError("a separating key needs a memory of at least 2 rows")
    mean = total / n
    covariance = outer / n - torch.outer(mean, mean)
    covariance += ridge * covariance.diagonal().mean() * torch.eye(len(mean), dtype=torch.float64)
    return mean.float(), torch.linalg.inv(covariance).float()


class MemoryBank:
    """Rows of FFN queries, appended to as edits are made; ``candidates`` finds the rows a loss top-k can use."""

    def __init__(self, rows: torch.Tensor | None = None, dim: int | None = None, half: bool = False) -> None:
        if rows is None:
            if dim is None:
                raise ValueError("give the memory rows or their dimension")
            rows = torch.zeros(0, dim)
        if rows.dim() != 2:
            raise ValueError(f"memory rows must be a 2-D (n, d) tensor, got shape {tuple(rows.shape)}")
        if not torch.isfinite(rows).all():
            raise ValueError("memory rows contain NaN or inf")
        self.half = half
        self._rows = rows.detach().to(torch.bfloat16 if half else torch.float32).contiguous()
        self._base = len(self._rows)
        self._filter: tuple[torch.Tensor, torch.Tensor] | None = None
        self._statistics: tuple[tuple[float, int], torch.Tensor, torch.Tensor] | None = None
        self._sums: tuple[torch.Tensor, torch.Tensor, int] | None = None  # Σx, Σxxᵀ, n (float64)
        self._base_statistics: tuple[float, torch.Tensor, torch.Tensor] | None = None
        self._skip: torch.Tensor | None = None  # rows the scoring methods leave out (see ``skipping``)

    def __len__(self) -> int:
        return self._rows.shape[0]

    @property
    def dim(self) -> int:
        return self._rows.shape[1]

    @property
    def n_appended(self) -> int:
        """Rows added by edits since the bank was built (what a resumable run must checkpoint)."""
        return len(self) - self._base

    def appended(self) -> torch.Tensor:
        return self._rows[self._base :].float()

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, self.dim).to(self._rows.dtype)
        self._rows = torch.cat([self._rows, rows])
        self._filter = None
        if self._sums is not None:
            added = rows.double()
            self._sums = (self._sums[0] + added.sum(0), self._sums[1] + added.T @ added, self._sums[2] + len(added))

    def truncate_appended(self) -> None:
        """Forget every edit's rows: back to the bank as built (a new fold starts from the original model)."""
        self._rows = self._rows[: self._base].clone()
        self._filter = None
        self._sums = None

    @contextmanager
    def skipping(self, appended: torch.Tensor | None) -> Iterator[None]:
        """Within the block ``candidates``, ``max_score`` and ``top_rows`` leave out the edits' rows where
        ``appended`` (a bool per appended row) is True: rows a patch cannot meet (its gate is shut on them). None
        leaves every row in. ``statistics`` ignores the skip (it whitens, it does not bound)."""
        if appended is not None and appended.shape != (self.n_appended,):
            raise ValueError(f"skipping needs a flag per appended row ({self.n_appended}), got {tuple(appended.shape)}")
        if appended is None or not bool(appended.any()):
            yield
            return
        self._skip = torch.cat([torch.zeros(self._base, dtype=torch.bool), appended.bool().cpu()])
        try:
            yield
        finally:
            self._skip = None

    def _left_out(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (…, n rows) with the skipped rows at -inf."""
        return scores if self._skip is None else scores.masked_fill(self._skip, -math.inf)

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        return (self._rows if index is None else torch.index_select(self._rows, 0, index)).float()

    def candidates(self, keys: torch.Tensor, bias: torch.Tensor, top_k: int) -> torch.Tensor | None:
        """Indices of rows that may be in the top-``top_k`` of ``rows @ keys.T + bias`` for any patch column.

        Returns None when every row must be used (small banks). The set is a superset of the union over patch
        columns of the exact top-k rows, which is all the memory loss's top-k over (rows, copies, patches) can touch.
        """
        n = len(self)
        if n <= max(_FILTER_MIN_ROWS, 2 * top_k):
            return None if self._skip is None else (~self._skip).nonzero().squeeze(1)
        transposed, norms = self._filter_tensors()
        keys = keys.detach().float()
        with torch.no_grad():
            approx = (keys.to(torch.bfloat16) @ transposed).float() + bias.detach().float()[:, None]  # (n_patches, n)
            error = norms[None, :] * keys.norm(dim=1, keepdim=True) * self._relative_error()
            error = error + (approx.abs() + bias.detach().float().abs()[:, None]) * 2.0**-23  # the fp32 bias add
            approx = self._left_out(approx)
            # k rows have exact value >= approx - error >= lower, so a row whose upper bound is below it is out.
            lower = torch.topk(approx - error, top_k, dim=1).values[:, -1:]
            keep = (approx + error >= lower).any(dim=0)
            if self._skip is not None:  # with fewer than top_k rows left, lower is -inf
                keep &= ~self._skip
            if int(keep.sum()) <= n // _EXACT_FALLBACK:
                return keep.nonzero().squeeze(1)
            # The bound is too loose (many rows tie near the threshold): rank exactly in fp32 instead.
            exact = self._left_out(keys @ self._rows.float().T + bias.detach().float()[:, None])
            found = torch.topk(exact, top_k, dim=1).indices.unique()
            return found if self._skip is None else found[~self._skip[found]]

    def statistics(self, ridge: float, edit_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and precision (inverse of the covariance plus ``ridge`` × its mean variance): what a separating key
        whitens with. ``edit_rows``: of every row, the edits' included (their sums are kept as rows arrive, so an
        edit pays one d×d inversion, not a pass over the bank); else of the rows the bank was built with, computed
        once (``EditConfig.whiten_edit_rows``)."""
        if not edit_rows:
            if self._base_statistics is None or self._base_statistics[0] != ridge:
                rows = self._rows[: self._base].double()
                self._base_statistics = (ridge, *_whitening(rows.sum(0), rows.T @ rows, len(rows), ridge))
            return self._base_statistics[1], self._base_statistics[2]
        if self._sums is None:
            rows = self._rows.double()
            self._sums = (rows.sum(0), rows.T @ rows, len(rows))
        if self._statistics is None or self._statistics[0] != (ridge, self._sums[2]):
            self._statistics = ((ridge, self._sums[2]), *_whitening(*self._sums, ridge))
        return self._statistics[1], self._statistics[2]

    def max_score(self, directions: torch.Tensor) -> torch.Tensor:
        """Approximate ``max_x d·x`` over every row, for each direction (n, d): the bfloat16 pass of the filter."""
        transposed, _ = self._filter_tensors()
        with torch.no_grad():
            return self._left_out((directions.detach().float().to(torch.bfloat16) @ transposed).float()).amax(dim=1)

    def top_rows(self, direction: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` rows with the highest exact ``direction·x`` and those scores (fp32, one pass over the bank)."""
        with torch.no_grad():
            scores = self._left_out(self._rows.float() @ direction.detach().float())
            top = torch.topk(scores, min(k, len(scores) if self._skip is None else int((~self._skip).sum())))
        return self.rows(top.indices), top.values

    def _relative_error(self) -> float:
        """Bound on |approx − exact| / Σ_j|m_j·k_j| for the bf16 first pass (Σ|m_j k_j| <= ‖m‖‖k‖).

        Each bf16 rounding is a factor (1 + δ), |δ| <= u: the key, the rows (unless they are stored in bf16 already)
        and the product written back in bf16. The fp32 accumulation adds at most d·2^-24, plus slack for the bias add.
        """
        roundings = 2 if self.half else 3
        return (1 + _BF16_U) ** roundings - 1 + (self.dim + 2) * 2.0**-24

    def _filter_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._filter is None:
            rows = self._rows.float()
            self._filter = (rows.T.contiguous().to(torch.bfloat16), rows.norm(dim=1))
        return self._filter

    # --------------------------------------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike[str], key: str) -> None:
        """Write the bank atomically as safetensors, tagged with ``key`` (what it was built from)."""
        save_safetensors_atomic({"rows": self._rows}, Path(path), metadata={"key": key, "format": "pt"})

    @classmethod
    def load(cls, path: str | os.PathLike[str], key: str, half: bool = False, dim: int | None = None) -> MemoryBank:
        """Read a bank written by ``save``; refuses a file built from another model, task or data (``key``), and rows
        that are not a finite float32/bfloat16 (n, ``dim``) matrix."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = (handle.metadata() or {}).get("key")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise AdapterFileError(f"cannot read memory file {path}: {error}") from error
        if stored != key:
            raise AdapterFileError(f"memory file {path} was built for another model/task/data ({stored} != {key})")
        if set(tensors) != {"rows"}:
            raise AdapterFileError(f"memory file {path} must hold exactly one tensor 'rows', has {sorted(tensors)}")
        rows = tensors["rows"]
        wrong_dim = rows.dim() == 2 and dim is not None and rows.shape[1] != dim
        if rows.dtype not in (torch.float32, torch.bfloat16) or rows.dim() != 2 or wrong_dim:
            raise AdapterFileError(
                f"memory file {path} must hold float32/bfloat16 rows of shape (n, {dim or 'd'}), has {rows.dtype} "
                f"{tuple(rows.shape)}"
            )
        if not torch.isfinite(rows).all():
            raise AdapterFileError(f"memory file {path} holds NaN or inf")
        return cls(rows, half=half)


def memory_key(fingerprint: dict[str, Any], task: Task, pairs: Sequence[tuple[str, Any]], size: int) -> str:
    """A content key for a memory bank: the base model (its digest), the task kind and prompt format, the examples."""
    digest = hashlib.sha256()
    digest.update(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    digest.update(f"{task.signature}|{size}|{len(pairs)}".encode())
    for text, target in pairs:
        digest.update(f"{text}\x1f{target}\x1e".encode())
    return digest.hexdigest()


def _answer_pass(
    model: nn.Module, layer: Any, task: Task, texts: Sequence[str], target: Any, adapter: str | None
) -> tuple[Batch, torch.Tensor]:
    """One forward pass over ``texts`` answered with ``target``, stopped at the layer: the batch and the FFN
    queries at every read, shape (len(texts), reads, d). The texts share the target, so each has the same reads."""
    batch = task.batch_for(model, [(text, target) for text in texts])
    with torch.no_grad(), layer.capture(adapter) as record, up_to(layer):
        model(**batch.model_kwargs())
    return batch, task.at_reads(record.query, batch).float().reshape(len(texts), -1, layer.query_dim)


def answer_queries(
    model: nn.Module, layer: Any, task: Task, texts: Sequence[str], target: Any, adapter: str | None = None
) -> torch.Tensor:
    """The FFN queries of ``layer`` at every read of each text answered with ``target``, shape (len(texts), reads,
    d): one forward pass, stopped at the layer."""
    return _answer_pass(model, layer, task, texts, target, adapter)[1]


def answer_start_queries(
    model: nn.Module,
    layer: Any,
    task: Task,
    texts: Sequence[str],
    target: Any,
    adapter: str | None = None,
    gated_on: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FFN queries of ``layer`` where each text's answer (``target``) starts, shape (n, d). With ``gated_on`` (a
    patch's subject read, or its reads (k, hidden): the edit's, then its bare one) only the texts whose subject gate is
    open there: a closed gate keeps the patch from a text whatever its key, so those rows need not bound it."""
    if not texts:
        return torch.zeros(0, layer.query_dim)
    batch, queries = _answer_pass(model, layer, task, texts, target, adapter)
    starts = queries[:, 0]
    subject, bare = split_reads(gated_on)
    opened = None if subject is None else layer.gate_opened(subject, adapter, bare=bare)
    if opened is None:
        return starts
    return starts[task.at_reads(opened, batch).reshape(len(texts), -1)[:, 0].to(starts.device)]


def collect_queries(
    model: nn.Module,
    layer: Any,
    task: Task,
    pairs: Sequence[tuple[str, Any]],
    max_rows: int,
    batch_size: int = 32,
    progress: bool = True,
    description: str = "building memory",
) -> torch.Tensor:
    """FFN queries at the task's reads over ``pairs``, in order, until ``max_rows`` rows are collected."""
    chunks: list[torch.Tensor] = []
    total = 0
    bar = tqdm(total=max_rows, desc=description, unit="row", disable=not progress, leave=False)
    with bar, eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            batch: Batch = task.batch_for(model, pairs[start : start + batch_size])
            with torch.no_grad(), layer.capture() as record, up_to(layer):
                model(**batch.model_kwargs())
            rows = task.at_reads(record.query, batch).float().cpu()[: max_rows - total]
            chunks.append(rows)
            total += len(rows)
            bar.update(len(rows))
            if total >= max_rows:
                break
    return torch.cat(chunks) if chunks else torch.zeros(0, layer.query_dim)


def question_formats(task: Task) -> list[PromptFormat]:
    """The prompt formats a deployed generator is asked in: the task's own, raw, and chat when the tokenizer has a
    chat template (answers end the way each format ends them)."""
    formats = [task.prompt_format, PromptFormat(RAW)]
    if getattr(getattr(task, "tokenizer", None), "chat_template", None):
        formats.append(PromptFormat(CHAT))
    return list(dict.fromkeys(formats))


def answered_queries(
    model: nn.Module,
    layer: Any,
    task: Task,
    questions: Sequence[str],
    max_rows: int,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """FFN queries where the model answers ``questions`` itself, in every :func:`question_formats` format: at the
    question's end and at each token of its own greedy answer (up to its stop token), what a user's question reads.
    Rows go question by question, each question in every format, until ``max_rows``."""
    asked = [task.formatted(fmt) for fmt in question_formats(task)]
    rows: list[torch.Tensor] = []
    total = 0
    bar = tqdm(total=max_rows, desc=f"memory: answering questions, {max_rows} rows", unit="row", disable=not progress)
    with bar:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            per_format = []
            for fmt in asked:
                prompts = [fmt.prompt_tokens(q) for q in chunk]
                answers = greedy_continuations(
                    model, prompts, fmt.prompter.stop_ids, max_new_tokens, fmt.pad_id, batch_size
                )
                per_format.append(queries_along(model, layer, prompts, answers, fmt.pad_id))
            added = [row for question in zip(*per_format, strict=True) for row in question]
            rows += added
            total += sum(len(r) for r in added)
            bar.update(min(sum(len(r) for r in added), max_rows - bar.n))
            if total >= max_rows:
                break
    return torch.cat(rows)[:max_rows] if rows else torch.zeros(0, layer.query_dim)


def queries_along(
    model: nn.Module, layer: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> list[torch.Tensor]:
    """Per prompt, the FFN queries at the positions that predict its answer's tokens, shape (len(answer), d): one
    teacher-forced forward pass."""
    batch = forced_batch(list(range(len(prompts))), prompts, answers, pad_id)
    with eval_mode(model), torch.no_grad(), layer.capture() as record, up_to(layer):
        model(**batch.inputs)
    query = record.query.reshape(len(prompts), batch.inputs["input_ids"].shape[1], -1)
    return list(query[batch.rows, batch.cols].float().cpu().split([len(a) for a in answers]))


def build_memory(
    model: nn.Module,
    layer: Any,
    task: Task,
    pairs: Sequence[tuple[str, Any]],
    max_rows: int,
    cache_dir: str | os.PathLike[str] | None = None,
    tag: str = "memory",
    batch_size: int = 32,
    progress: bool = True,
    adapter_name: str = "default",
    questions: Sequence[str] = (),
    question_rows: int = 0,
) -> MemoryBank:
    """A bank of at most ``max_rows`` queries over ``pairs`` plus at most ``question_rows`` over the model's own
    answers to ``questions`` (:func:`answered_queries`), read from ``cache_dir`` when built there before.

    The cache file is named by :func:`memory_key`, so a change of model, task, data or size builds a new bank.
    """
    asked = [(question, "?") for question in questions] if question_rows else []
    size = max_rows + (question_rows if asked else 0)
    # the rows are read from the attached model: keyed on it, not on the model a loaded patch set records
    base = {"model": content_key(model), "key_module": layer.key_module_name}
    key = memory_key(base, task, [*pairs, *asked], size)
    path = Path(cache_dir) / f"{tag}-{size}-{key[:16]}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return MemoryBank.load(path, key, dim=layer.query_dim)
    rows = collect_queries(model, layer, task, pairs, max_rows, batch_size, progress, f"{tag}: {max_rows} rows")
    if asked:
        answered = answered_queries(
            model, layer, task, questions, question_rows, batch_size=batch_size, progress=progress
        )
        rows = torch.cat([rows, answered])
    bank = MemoryBank(rows)
    if path is not None:
        bank.save(path, key)
    return bank
