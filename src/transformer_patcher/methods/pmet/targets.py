"""Target vectors ``z``: what the z layer should output at the subject's last token for each request to hold.

PMET (``compute_zs``) adds two zero-initialised vectors at the subject's last token of every prompt of a request:
``δ_attn`` to the z layer's attention output and ``δ_mlp`` to its FFN output. They minimise the target's NLL over
the context-template prompts, plus a KL term keeping "{subject} is a" unchanged, plus a weight decay, under a norm
clamp, with the official early exits. The FFN target ``z = h_mlp + δ_mlp`` is what the layer loop writes. The MEMIT
ablation optimises one ``δ`` on the block output (the residual stream) instead.

Several requests are optimised in one forward pass (``requests_per_step``). Each has its own parameters, its own
Adam state, its own loss terms and its own early exit, so the result equals optimising each request alone; batching
only fills the matrix units. A finished request leaves the step and the next waiting request of its window
(``WINDOW`` steps' worth) takes its place, so a fact that needs many steps shares its steps with others. On 2 CPU
cores that neither gains nor costs (a step's time grows with its tokens: 0.27 s with one zsRE request, 0.71 s with
eight; docs/results.md, Issue 18, thirty-third round).

``target_precision="bfloat16"`` runs the steps on bfloat16 copies of the weights (:func:`weights_as`); the pre-edit
values, the prefix keys and the lower blocks' output are read in float32 once per window, so only the steps differ.
``"mixed"`` then goes on in float32, with the same Adam state, from where each request exited, until the float32
model has it on target too (:func:`to_finish`); most requests need one float32 forward, a few some steps more.
``"auto"`` is ``"mixed"`` where bfloat16 products are native and ``"float32"`` elsewhere (:func:`steps_precision`).

Only the tokens from the subject's last token on are run at each step. The deltas are added there, and attention is
causal, so every earlier token's keys and values, at every layer, are the same at every step: they are computed once
per window (:func:`prefix_keys`) and each step attends to them. A step's tokens are packed, ``GROUP`` requests to a
sequence, with a block mask (each token sees its own prompt only), rather than one padded row per prompt: the parts
after the subject are 1–8 tokens long, and padding them to the longest would more than double the work. One sequence
for the whole step would score every token against every key of the step. The blocks below the deltas' layer give
the same output on those tokens at every step too, so no step runs them (:class:`LowerBlocks`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from transformer_patcher.core.modes import eval_mode, frozen, weights_as
from transformer_patcher.core.native_bfloat16 import native_bfloat16
from transformer_patcher.methods.pmet.architecture import block_modules, unwrap
from transformer_patcher.methods.pmet.hparams import PMETHyperParams
from transformer_patcher.methods.pmet.lower_blocks import LowerBlocks
from transformer_patcher.methods.pmet.requests import EditRequest, Encoded, encode, target_ids

KL_TEMPLATE = "{} is a"
LOSS_EXIT = 5e-2
KL_EXIT = 0.01
# Requests per window, in steps' worth (requests_per_step each): a window's prompts share one forward for their prefix
# keys and lower blocks' output, and its waiting requests fill the places finished ones leave
WINDOW = 8
# Requests per packed sequence of a step (step_reads): a sequence's attention scores every token against all its keys,
# so the cost grows with the square of what it packs; 16 requests in 4 sequences beat 8 in one (docs/results.md,
# Issue 18, thirty-fourth round)
GROUP = 4


@dataclass
class Targets:
    """Per request (rows): the target ``z`` at the z layer, its pre-edit value, steps taken and final probability,
    and (PMET) the optimised ``δ_attn``, the part of the change the paper does not write (``fold_attention`` does)."""

    values: torch.Tensor  # (n, d) float32
    init: torch.Tensor  # (n, d)
    steps: list[int]
    probabilities: list[float]
    attention: torch.Tensor | None = None  # (n, d) δ_attn; None: the MEMIT ablation, or saved without it

    @property
    def attention_norms(self) -> list[float] | None:
        return None if self.attention is None else self.attention.norm(dim=1).tolist()

    def change(self, fold_attention: bool = False) -> torch.Tensor:
        """``z − init`` per row (``δ_mlp``), plus ``δ_attn`` when it is folded into the written target."""
        change = self.values - self.init
        if not fold_attention:
            return change
        if self.attention is None:
            raise ValueError(
                "fold_attention needs the optimised attention deltas, which these targets lack "
                "(the MEMIT ablation has none; targets saved by an older version were written without them)"
            )
        return change + self.attention

    @staticmethod
    def concatenated(parts: Sequence[Targets]) -> Targets:
        """The rows of ``parts``, in order; all of them carry attention deltas or none does."""
        if not parts:
            raise ValueError("no targets to concatenate")
        attention = [p.attention for p in parts]
        if any(a is None for a in attention) and any(a is not None for a in attention):
            raise ValueError("targets with and without attention deltas cannot be concatenated")
        return Targets(
            torch.cat([p.values for p in parts]),
            torch.cat([p.init for p in parts]),
            [s for p in parts for s in p.steps],
            [q for p in parts for q in p.probabilities],
            None if attention[0] is None else torch.cat(attention),
        )

    def select(self, indices: Sequence[int]) -> Targets:
        index = list(indices)
        return Targets(
            self.values[index],
            self.init[index],
            [self.steps[i] for i in index],
            [self.probabilities[i] for i in index],
            None if self.attention is None else self.attention[index],
        )


def rewrite_templates(templates: Sequence[Sequence[str]], request: EditRequest) -> list[str]:
    """Every context template around the request's prompt, still with the subject slot."""
    return [context.format(request.template) for group in templates for context in group]


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of token rows, padded on the right (or the left) to the longest."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def output_hook(add: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """A forward hook that replaces a module's (first) output by ``add(output)``."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (add(output[0]), *output[1:])
        return add(output)

    return hook


@contextmanager
def output_hooks(base: nn.Module, adds: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """While inside, each named module's (first) output is replaced by its ``add(output)`` (:func:`output_hook`)."""
    handles = [base.get_submodule(name).register_forward_hook(output_hook(add)) for name, add in adds.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def compute_targets(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hparams: PMETHyperParams,
    templates: Sequence[Sequence[str]],
    progress: bool = True,
) -> Targets:
    """Optimise the target vector of every request against ``model`` as it is now (earlier edits included)."""
    results: list[RequestTarget] = []
    bar = tqdm(total=len(requests), desc="PMET targets", unit="req", disable=not progress)
    size = WINDOW * hparams.requests_per_step
    with bar, eval_mode(model), frozen(model):
        for start in range(0, len(requests), size):
            window = requests[start : start + size]
            results.extend(_optimise_window(model, tokenizer, window, hparams, templates, bar.update))
    return Targets(
        torch.stack([r.value for r in results]),
        torch.stack([r.init for r in results]),
        [r.steps for r in results],
        [r.probability for r in results],
        None if hparams.variant == "memit" else torch.stack([r.attention for r in results]),
    )


def next_token_log_probs(base: nn.Module, reads: Any, **inputs: Any) -> Any:
    """Log-probabilities of the next token at ``reads = (rows, positions)`` only, ``inputs`` going to the body.

    The LM head runs on the read positions alone (a few per prompt) rather than on every position: the head and the
    softmax over a large vocabulary (49k tokens for SmolLM2) at every position would be computed and back-propagated
    for nothing.
    """
    hidden = base.base_model(**inputs).last_hidden_state
    logits = base.get_output_embeddings()(hidden[reads]).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


# ------------------------------------------------------------------------------------------ one chunk of requests
@dataclass
class RequestTarget:
    """What optimising one request gave: its target ``z``, its pre-edit value, the steps taken and the final mean
    probability of the target over its prompts."""

    value: torch.Tensor  # (d,) float32, on the CPU
    init: torch.Tensor  # (d,)
    steps: int
    probability: float
    attention: torch.Tensor  # (d,) δ_attn on the CPU (PMET; empty for the MEMIT ablation)


@dataclass
class PromptBatch:
    """Every prompt of a chunk of requests, cut at the subject's last token, with where each is written and read.

    Per request (in order) the rows are its context-template prompts, with the answer appended (teacher forcing),
    starting at ``first_row`` (the bare prompt, template ``"{}"``, where the pre-edit values are read), then one KL
    prompt (``"{subject} is a"``) at ``kl_rows``. The reads are the positions whose next token is an answer token.

    Each row is split in two: the **prefix**, every token before the subject's last one (left-padded; the deltas
    never reach it), and the **suffix**, from that token to the last read (right-padded; what each step runs).
    ``input_ids``, ``attention``, ``lookups`` and the reads index the suffix, so every lookup is 0.
    """

    prefix_ids: torch.Tensor  # (rows, prefix width)
    prefix_attention: torch.Tensor
    input_ids: torch.Tensor  # (rows, width) the suffixes
    attention: torch.Tensor  # (rows, width)
    positions: torch.Tensor  # (rows, width) the suffix tokens' positions in the whole prompt
    lookups: torch.Tensor  # (rows,) the subject's last token in the suffix: where the deltas are added
    owner: list[int]  # request index of each row
    owners: torch.Tensor  # the same, as a tensor
    first_row: list[int]
    kl_rows: list[int]
    read_row: torch.Tensor  # (reads,)
    read_pos: torch.Tensor
    read_label: torch.Tensor
    answer_length: torch.Tensor  # (rows,) answer tokens per row (at least 1): the NLL is a per-token mean

    @property
    def n_rows(self) -> int:
        return len(self.owner)

    @property
    def n_requests(self) -> int:
        return len(self.first_row)


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def build_batch(
    tokenizer: Any, requests: Sequence[EditRequest], templates: Sequence[Sequence[str]], device: torch.device
) -> PromptBatch:
    """Encode and pad the template prompts and the KL prompt of every request (see :class:`PromptBatch`)."""
    encodings: list[Encoded] = []
    owner: list[int] = []
    first_row: list[int] = []
    kl_rows: list[int] = []
    for r, request in enumerate(requests):
        answer = target_ids(tokenizer, request.target)
        first_row.append(len(encodings))
        for template in rewrite_templates(templates, request):
            encodings.append(encode(tokenizer, template, request.subject, answer))
            owner.append(r)
        kl_rows.append(len(encodings))
        encodings.append(encode(tokenizer, KL_TEMPLATE, request.subject))
        owner.append(r)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix_ids, prefix_attention = pad_rows([e.ids[: e.lookup] or [pad] for e in encodings], pad, device, left=True)
    prefix_attention[[row for row, e in enumerate(encodings) if e.lookup == 0], -1] = 0  # an empty prefix
    suffixes = [e.ids[e.lookup : max([e.lookup, *e.target_positions]) + 1] for e in encodings]
    input_ids, attention = pad_rows(suffixes, pad, device)
    starts = torch.tensor([e.lookup for e in encodings], device=device)
    return PromptBatch(
        prefix_ids=prefix_ids,
        prefix_attention=prefix_attention,
        input_ids=input_ids,
        attention=attention,
        positions=starts[:, None] + torch.arange(input_ids.shape[1], device=device),
        lookups=torch.zeros(len(encodings), dtype=torch.long, device=device),
        owner=owner,
        owners=torch.tensor(owner, device=device),
        first_row=first_row,
        kl_rows=kl_rows,
        read_row=_long([row for row, e in enumerate(encodings) for _ in e.target_positions], device),
        read_pos=_long([p - e.lookup for e in encodings for p in e.target_positions], device),
        read_label=_long([t for e in encodings for t in e.target_ids], device),
        answer_length=torch.tensor([max(len(e.target_ids), 1) for e in encodings], device=device),
    )


class SubjectShift:
    """The optimised deltas of a chunk, one per request and site, and the forward hooks that add them.

    While attached, each site's output gets its request's delta added at the subject's last token of every batch row
    in :attr:`rows` (the rows of the current forward, in order), which :attr:`where` locates in the output (batch
    index, position). The first forward that holds a request's bare prompt (the window's float32 whole-prompt
    forward, the deltas still zero) records each site's pre-edit output there (:attr:`init`): the clamp, the decay and
    the written target use it.
    """

    def __init__(self, batch: PromptBatch, sites: Sequence[str], hidden: int, device: torch.device) -> None:
        n = batch.n_requests
        self.batch = batch
        self.deltas = {
            site: [torch.zeros(hidden, device=device, requires_grad=True) for _ in range(n)] for site in sites
        }
        self.init: dict[str, list[torch.Tensor | None]] = {site: [None] * n for site in sites}
        self.rows: list[int] = []
        self.where: tuple[torch.Tensor, torch.Tensor] = (_long([], device), _long([], device))

    def parameters(self) -> list[torch.Tensor]:
        return [p for params in self.deltas.values() for p in params]

    def add(self, site: str, output: torch.Tensor) -> torch.Tensor:
        """``output`` with each row's delta added at its lookup token (:attr:`where`)."""
        batch = self.batch
        for i, row in enumerate(self.rows):
            r = batch.owner[row]
            if self.init[site][r] is None and row == batch.first_row[r]:
                self.init[site][r] = output[self.where[0][i], self.where[1][i]].detach().clone()
        shift = torch.stack([self.deltas[site][batch.owner[row]] for row in self.rows]).to(output.dtype)
        return output.index_put(self.where, shift, accumulate=True)

    def attached(self, base: nn.Module, modules: dict[str, str]) -> AbstractContextManager[None]:
        """Hook :meth:`add` onto each site's module (``modules``: site → module name) while inside."""
        return output_hooks(base, {name: partial(self.add, site) for site, name in modules.items()})

    def initial(self, site: str, r: int) -> torch.Tensor:
        value = self.init[site][r]
        if value is None:
            raise RuntimeError(f"no pre-edit value of request {r} at {site}: it is recorded by the first forward")
        return value.float()

    def decay(self, r: int) -> Any:
        """Request ``r``'s weight-decay term: ``Σ_site ‖δ‖ / ‖init‖²``."""
        return sum(
            self.deltas[site][r].norm() / self.initial(site, r).norm().clamp_min(1e-12) ** 2 for site in self.deltas
        )

    def drop_gradients(self, r: int) -> None:
        for site in self.deltas:
            self.deltas[site][r].grad = None

    @torch.no_grad()
    def clamp_(self, r: int, factor: float) -> None:
        """Scale request ``r``'s deltas back to at most ``factor × ‖init‖`` each."""
        for site in self.deltas:
            limit = factor * self.initial(site, r).norm()
            norm = self.deltas[site][r].norm()
            if norm > limit:
                self.deltas[site][r].mul_(limit / norm)

    def target(self, site: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(init + δ, init)`` of request ``r`` at ``site``, float32 on the CPU."""
        init = self.initial(site, r)
        return (init + self.deltas[site][r].detach()).cpu(), init.cpu()


@dataclass
class RequestState:
    """What one request carries from step to step."""

    nll_factor: float
    steps: int = 0  # steps taken so far
    on_target_run: int = 0  # steps in a row, up to this one, with the target the argmax on every prompt
    probability: float = 0.0
    kl_init: torch.Tensor | None = None


@dataclass
class StepReads:
    """The suffixes of the active requests' rows, packed a few requests to a sequence (:func:`balanced_groups`), and
    the positions read from the output. A sequence's padding tokens have row -1."""

    rows: list[int]  # batch rows in this forward, in order
    group: torch.Tensor  # batch row -> the sequence holding its suffix (-1 when absent)
    start: torch.Tensor  # batch row -> where its suffix starts in that sequence (-1 when absent)
    token_row: torch.Tensor  # (sequences, width) the batch row of each packed token, -1 for padding
    token_col: torch.Tensor  # (sequences, width) its column in the batch's suffixes (0 for padding)
    input_ids: torch.Tensor  # (sequences, width)
    positions: torch.Tensor  # (sequences, width) each token's position in its whole prompt
    t_row: torch.Tensor  # answer reads: batch row, position in its suffix, label
    t_pos: torch.Tensor
    t_label: torch.Tensor
    k_row: torch.Tensor  # the KL row of each active request, in ``active`` order

    @property
    def writes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each row's subject token is in the packed output (sequence, position): the deltas go there."""
        return self.group[self.rows], self.start[self.rows]

    @property
    def read_at(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, position) of the answer reads, then of each active request's KL read."""
        rows = torch.cat([self.t_row, self.k_row])
        offsets = torch.cat([self.t_pos, torch.zeros_like(self.k_row)])
        return self.group[rows], self.start[rows] + offsets

    @property
    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch row, suffix column) of every packed token, padding at row 0: what the lower blocks' record is read
        at."""
        return self.token_row.clamp_min(0), self.token_col


def balanced_groups(sizes: Sequence[int], per_group: int) -> list[list[int]]:
    """Indices of ``sizes`` in ``ceil(len / per_group)`` groups of about equal total size (largest first, each into
    the lightest group), each group in index order.

    A packed sequence's attention scores every token against every key of the sequence, masked, so its cost grows
    with the square of what it packs; a step's requests go into several sequences of a few requests each instead, and
    balanced ones keep their padding small."""
    count = max(1, -(-len(sizes) // per_group))
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += sizes[index]
    return [sorted(group) for group in groups if group]


def step_reads(batch: PromptBatch, active: Sequence[int], per_sequence: int | None = None) -> StepReads:
    """The packed forward and the reads of the requests in ``active``, ``per_sequence`` requests to a sequence
    (default :data:`GROUP`)."""
    device = batch.input_ids.device
    is_active = torch.zeros(batch.n_requests, dtype=torch.bool, device=device)
    is_active[list(active)] = True
    lengths = batch.attention.sum(1).tolist()
    own_rows = [list(range(batch.first_row[r], batch.kl_rows[r] + 1)) for r in active]
    groups = balanced_groups([sum(lengths[row] for row in rows) for rows in own_rows], per_sequence or GROUP)
    sequences = [[row for a in group for row in own_rows[a]] for group in groups]
    width = max(sum(lengths[row] for row in rows) for rows in sequences)
    group = torch.full((batch.n_rows,), -1, dtype=torch.long, device=device)
    start = torch.full((batch.n_rows,), -1, dtype=torch.long, device=device)
    token_row = torch.full((len(sequences), width), -1, dtype=torch.long, device=device)
    token_col = torch.zeros_like(token_row)
    for g, rows in enumerate(sequences):
        offset = 0
        for row in rows:
            group[row], start[row] = g, offset
            token_row[g, offset : offset + lengths[row]] = row
            token_col[g, offset : offset + lengths[row]] = torch.arange(lengths[row], device=device)
            offset += lengths[row]
    real = token_row >= 0
    reads = is_active[batch.owners[batch.read_row]]
    return StepReads(
        rows=[row for rows in sequences for row in rows],
        group=group,
        start=start,
        token_row=token_row,
        token_col=token_col,
        input_ids=batch.input_ids[token_row.clamp_min(0), token_col].masked_fill(~real, 0),
        positions=batch.positions[token_row.clamp_min(0), token_col].masked_fill(~real, 0),
        t_row=batch.read_row[reads],
        t_pos=batch.read_pos[reads],
        t_label=batch.read_label[reads],
        k_row=_long([batch.kl_rows[r] for r in active], device),
    )


def packed_mask(query_row: torch.Tensor, key_row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4-D mask of packed sequences (``query_row``: (sequences, width), ``key_row``: (sequences,
    slots)): a query sees the cached prefix slots of its own row and the packed tokens of its own row up to itself.
    Padding (row -1) sees the padding before it, so no row of scores is empty."""
    index = torch.arange(query_row.shape[-1], device=query_row.device)
    own = query_row[..., :, None] == query_row[..., None, :]
    causal = own & (index[None, :] <= index[:, None])
    allowed = torch.cat([key_row[..., None, :] == query_row[..., :, None], causal], dim=-1)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)[
        :, None
    ]


@dataclass
class PrefixKeys:
    """Every prefix token's keys and values at every layer, packed along the sequence (``(1, heads, slots, d)``)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    slot_row: torch.Tensor  # (slots,) the batch row of each slot

    def to(self, dtype: torch.dtype) -> PrefixKeys:
        return PrefixKeys([k.to(dtype) for k in self.keys], [v.to(dtype) for v in self.values], self.slot_row)


@torch.no_grad()
def prefix_keys(
    base: nn.Module,
    batch: PromptBatch,
    lower: LowerBlocks | None = None,
    shift: SubjectShift | None = None,
    requests_per_forward: int = 8,
) -> PrefixKeys:
    """Every row run once whole (its prefix left-padded, its suffix right-padded), ``requests_per_forward`` requests'
    rows at a time (a window's widest prompts would widen every row), then the prefixes' real slots packed: what every
    step's suffixes attend to. On the way ``lower`` records its block's input at the suffix tokens, and ``shift``
    (attached, its deltas still zero) the pre-edit values at each request's bare prompt."""
    width = batch.prefix_ids.shape[1]
    bounds = [*batch.first_row[::requests_per_forward], batch.n_rows]
    layers: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    cuts: list[tuple[slice, int, int]] = []  # rows, prefix width and suffix width of each forward
    with lower.recording() if lower is not None else nullcontext([]) as inputs:
        for first, end in itertools.pairwise(bounds):
            rows = slice(first, end)
            prefix = int(batch.prefix_attention[rows].sum(1).max().clamp_min(1))
            suffix = int(batch.attention[rows].sum(1).max())
            mask = torch.cat([batch.prefix_attention[rows, width - prefix :], batch.attention[rows, :suffix]], 1)
            if shift is not None:  # each row's subject token: its suffix's first column
                shift.rows = list(range(first, end))
                shift.where = (torch.arange(end - first, device=mask.device), torch.full_like(mask[:, 0], prefix))
            cache = base.base_model(
                input_ids=torch.cat([batch.prefix_ids[rows, width - prefix :], batch.input_ids[rows, :suffix]], 1),
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                use_cache=True,
            ).past_key_values
            real = batch.prefix_attention[rows, width - prefix :].bool()
            # (rows, heads, width, d) -> (heads, slots, d): the prefix's real slots
            layers.append(
                (
                    [layer.keys[:, :, :prefix].transpose(1, 2)[real].transpose(0, 1) for layer in cache.layers],
                    [layer.values[:, :, :prefix].transpose(1, 2)[real].transpose(0, 1) for layer in cache.layers],
                )
            )
            cuts.append((rows, prefix, suffix))
    if lower is not None and inputs:  # each forward's suffix columns, at their rows of the batch's suffixes
        lower.recorded = inputs[0].new_zeros(*batch.input_ids.shape, inputs[0].shape[-1])
        for (rows, prefix, suffix), hidden in zip(cuts, inputs, strict=True):
            lower.recorded[rows, :suffix] = hidden[:, prefix:]
    real = batch.prefix_attention.bool()
    slot_row = torch.arange(batch.n_rows, device=real.device)[:, None].expand_as(real)[real]
    keys, values = zip(*layers, strict=True)
    return PrefixKeys(
        [torch.cat(parts, 1)[None] for parts in zip(*keys, strict=True)],
        [torch.cat(parts, 1)[None] for parts in zip(*values, strict=True)],
        slot_row,
    )


def forward_reads(base: nn.Module, batch: PromptBatch, reads: StepReads, prefix: PrefixKeys) -> torch.Tensor:
    """Next-token log-probabilities at the answer reads, then at the KL prompt's subject token of each request.

    The active rows' suffixes run in their packed sequences, each on a fresh cache holding its rows' prefix slots (a
    forward appends to its cache), padded to the most slots of a sequence.
    """
    owner = reads.group[prefix.slot_row]
    slots = [torch.nonzero(owner == g).squeeze(1) for g in range(reads.token_row.shape[0])]
    width = max(len(index) for index in slots)
    index = torch.stack([F.pad(s, (0, width - len(s))) for s in slots])
    key_row = torch.stack([F.pad(prefix.slot_row[s], (0, width - len(s)), value=-1) for s in slots])
    cache = DynamicCache(config=base.config)
    for layer, (keys, values) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
        cache.update(keys[0][:, index].transpose(0, 1), values[0][:, index].transpose(0, 1), layer)
    return next_token_log_probs(
        base,
        reads.read_at,
        input_ids=reads.input_ids,
        attention_mask=packed_mask(reads.token_row, key_row, prefix.keys[0].dtype),
        position_ids=reads.positions,
        past_key_values=cache,
        use_cache=True,
    )


def answer_scores(
    batch: PromptBatch, reads: StepReads, log_probs: torch.Tensor, margin: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row its answer's mean NLL per token, and per request how many answer tokens do not lead every other
    token by at least ``margin`` nats (0: are not the argmax)."""
    answer = log_probs[: len(reads.t_row)]
    target_lp = answer.gather(1, reads.t_label[:, None]).squeeze(1)
    if margin > 0:
        others = answer.detach().scatter(1, reads.t_label[:, None], float("-inf")).max(-1).values
        wrong = (target_lp.detach() - others < margin).float()
    else:
        wrong = (answer.argmax(-1) != reads.t_label).float()
    device = batch.input_ids.device
    row_nll = torch.zeros(batch.n_rows, device=device).index_add(0, reads.t_row, -target_lp) / batch.answer_length
    wrong_count = torch.zeros(batch.n_requests, device=device).index_add(0, batch.owners[reads.t_row], wrong)
    return row_nll, wrong_count


def request_loss(
    hparams: PMETHyperParams, state: RequestState, nll_each: torch.Tensor, kl_now: torch.Tensor, decay: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's ``(loss, kl)``: weighted NLL over its prompts + KL to its first step's "is a" distribution +
    weight decay."""
    if state.kl_init is None:
        state.kl_init = kl_now.detach().clone()
    kl = hparams.kl_factor * F.kl_div(state.kl_init, kl_now, log_target=True, reduction="sum")
    loss = state.nll_factor * nll_each.mean() + kl + hparams.v_weight_decay * decay
    return loss, kl


def is_done(hparams: PMETHyperParams, step: int, loss: torch.Tensor, kl: torch.Tensor, on_target_run: int) -> bool:
    """The official early exits: a small loss, the last step, or the target already the argmax and a small KL; with
    ``settled_steps``, also the target the argmax for that many steps in a row.

    The official KL exit (0.01 nats on "{subject} is a") is rarely met once the target is reached: on SmolLM2 the
    KL falls slowly while the target stays the argmax, so nearly every request ran all 30 steps, most of them after
    the target was reached (docs/pmet.md, "Deviations from the paper")."""
    if bool(loss < LOSS_EXIT) or step == hparams.v_num_grad_steps - 1:
        return True
    if hparams.settled_steps and on_target_run >= hparams.settled_steps:
        return True
    return on_target_run > 0 and bool(kl <= KL_EXIT)


def step_losses(
    hparams: PMETHyperParams,
    batch: PromptBatch,
    reads: StepReads,
    log_probs: torch.Tensor,
    shift: SubjectShift,
    states: list[RequestState],
    active: Sequence[int],
) -> tuple[list[torch.Tensor], list[int]]:
    """The losses of the active requests that go on, and those that are done; updates each request's state."""
    row_nll, wrong_count = answer_scores(batch, reads, log_probs, hparams.target_margin)
    losses: list[torch.Tensor] = []
    finished: list[int] = []
    for a, r in enumerate(active):
        state = states[r]
        nll_each = row_nll[torch.arange(batch.first_row[r], batch.kl_rows[r], device=batch.input_ids.device)]
        loss, kl = request_loss(hparams, state, nll_each, log_probs[len(reads.t_row) + a], shift.decay(r))
        state.probability = float(torch.exp(-nll_each.detach()).mean())
        on_target = bool(wrong_count[r] == 0)  # the target already leads by the margin everywhere
        state.on_target_run = state.on_target_run + 1 if on_target else 0
        state.nll_factor = 0.1 * hparams.nll_loss_factor if on_target else hparams.nll_loss_factor
        done = is_done(hparams, state.steps, loss, kl, state.on_target_run)
        state.steps += 1
        if done:
            finished.append(r)
        else:
            losses.append(loss)
    return losses, finished


@dataclass
class Window:
    """What a window's steps share: its prompts, their prefix keys, the delta hooks, the lower blocks' record, each
    request's state, and the steps' precision (``target_precision``)."""

    batch: PromptBatch
    prefix: PrefixKeys
    shift: SubjectShift
    lower: LowerBlocks
    states: list[RequestState]
    dtype: torch.dtype

    def autocast(self) -> torch.autocast:
        """What a step's forward runs under (off for float32). The weights are cast for the window's steps
        (:func:`weights_as`); autocast casts what else meets them (an adapter's float32 factors, the deltas)."""
        device = self.batch.input_ids.device
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def backward_step(base: nn.Module, hparams: PMETHyperParams, window: Window, active: Sequence[int]) -> list[int]:
    """One forward over the active requests' rows and the backward of the summed losses of those that go on;
    returns the requests that are done."""
    batch, prefix, shift, lower, states = window.batch, window.prefix, window.shift, window.lower, window.states
    reads = step_reads(batch, active)
    shift.rows, shift.where = reads.rows, reads.writes
    lower.tokens = reads.tokens
    with torch.enable_grad():
        with window.autocast():
            log_probs = forward_reads(base, batch, reads, prefix)
        losses, finished = step_losses(hparams, batch, reads, log_probs, shift, states, active)
        if losses:
            torch.stack(losses).sum().backward()
    return finished


def delta_sites(base: nn.Module, hparams: PMETHyperParams) -> dict[str, str]:
    """Site → module name of the deltas: attention and FFN outputs (PMET) or the block output (MEMIT ablation)."""
    modules = block_modules(base, hparams.layers[-1])
    if hparams.variant == "memit":
        return {"block": modules.block}
    return {"attn": modules.attention_out, "mlp": modules.ffn_out}


def _run_steps(
    base: nn.Module,
    hparams: PMETHyperParams,
    window: Window,
    optimizer: torch.optim.Optimizer,
    requests: Sequence[int],
    finished: Callable[[int], Any],
) -> None:
    """Step ``requests``, ``requests_per_step`` at a time, until each has exited; a waiting request takes a finished
    one's place at the next step."""
    shift = window.shift
    waiting = list(requests)[::-1]
    active: list[int] = []
    while waiting or active:
        while waiting and len(active) < hparams.requests_per_step:
            active.append(waiting.pop())
        optimizer.zero_grad(set_to_none=True)
        done = backward_step(base, hparams, window, active)
        for r in done:
            active.remove(r)
            shift.drop_gradients(r)
        finished(len(done))
        if active:
            optimizer.step()
        for r in active:
            shift.clamp_(r, hparams.clamp_norm_factor)


def steps_precision(precision: str, device: torch.device) -> str:
    """``target_precision`` as it runs on ``device``: ``"auto"`` is ``"mixed"`` where bfloat16 products are native
    (elsewhere bfloat16 steps save no time) and ``"float32"`` otherwise; the others are themselves."""
    if precision != "auto":
        return precision
    return "mixed" if native_bfloat16(device) else "float32"


def to_finish(hparams: PMETHyperParams, states: Sequence[RequestState]) -> list[int]:
    """The requests a float32 finish checks (``target_precision="mixed"``): those that exited before the last step,
    each to be on target again in float32 before it exits (its run of steps on target starts over)."""
    todo = [r for r, state in enumerate(states) if state.steps < hparams.v_num_grad_steps]
    for r in todo:
        states[r].on_target_run = 0
    return todo


def _optimise_window(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hparams: PMETHyperParams,
    templates: Sequence[Sequence[str]],
    finished: Callable[[int], Any],
) -> list[RequestTarget]:
    """Optimise the deltas of ``requests``, ``requests_per_step`` at a step: each request leaves the step at its own
    early exit and the next waiting one takes its place. Adam keeps a state per parameter and skips those without a
    gradient, so a request's steps are the same whenever it runs. ``finished(n)`` is told of each step's exits."""
    base = unwrap(model)
    device = next(base.parameters()).device
    sites = delta_sites(base, hparams)
    batch = build_batch(tokenizer, requests, templates, device)
    shift = SubjectShift(batch, list(sites), base.get_output_embeddings().weight.shape[1], device)
    states = [RequestState(hparams.nll_loss_factor) for _ in requests]
    lower = LowerBlocks(base, hparams.layers[-1])
    with shift.attached(base, sites):  # in float32 whatever the steps' precision: the pre-edit values are exact
        prefix = prefix_keys(base, batch, lower, shift, hparams.requests_per_step)
    precision = steps_precision(hparams.target_precision, device)
    dtype = torch.float32 if precision == "float32" else torch.bfloat16
    optimizer = torch.optim.Adam(shift.parameters(), lr=hparams.v_lr)
    recorded = lower.recorded
    lower.recorded = None if recorded is None else recorded.to(dtype)
    with weights_as(base, dtype), shift.attached(base, sites), lower.attached():
        window = Window(batch, prefix.to(dtype), shift, lower, states, dtype)
        _run_steps(base, hparams, window, optimizer, range(len(requests)), finished)
    if precision == "mixed":  # the same steps and Adam state, on to a float32 exit
        lower.recorded = recorded
        with shift.attached(base, sites), lower.attached():
            window = Window(batch, prefix, shift, lower, states, torch.float32)
            _run_steps(base, hparams, window, optimizer, to_finish(hparams, states), lambda _: None)
    written = "block" if hparams.variant == "memit" else "mlp"
    return [
        RequestTarget(
            *shift.target(written, r),
            steps=state.steps,
            probability=state.probability,
            attention=shift.deltas["attn"][r].detach().float().cpu() if "attn" in sites else torch.zeros(0),
        )
        for r, state in enumerate(states)
    ]
