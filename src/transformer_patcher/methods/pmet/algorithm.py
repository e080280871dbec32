"""The PMET layer loop: from target vectors to one low-rank ΔW per edited FFN output projection.

For edited layer ``l_i`` (i = 0 … L−1, shallow to deep), with the updates of earlier layers already in effect:

- keys ``K``: the input of the FFN output projection at the subject's last token, averaged over the context templates
  of each group and then over groups (``compute_ks``), or read in the bare prompt alone (``key_reads="prompt"``);
- current values: the z layer's FFN output (PMET) or block output (MEMIT ablation) at the subject's last token of the
  bare prompt, under the partially edited model;
- residuals ``R = (z − current) · share(i)`` with ``share = 1/sqrt(L − i)`` (PMET) or ``1/(L − i)`` (MEMIT; either
  variant may take the other's with ``hparams.spread``);
- ``ΔW = R Kᵀ (K Kᵀ + λC)⁻¹`` (:func:`solve_update`), kept as low-rank factors.

Each step reads its keys, current values and kept prompts in one forward pass where they share their prompts
(:func:`layer_reads`), starting at the block written last (:mod:`.block_inputs`).

Earlier updates act through temporary forward hooks, so the model is the same object, unchanged, when this returns
(or raises): applying the deltas is the caller's decision. Keys, values and the solve stay on the model's device
(targets and key statistics, kept on the CPU, are moved there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from transformer_patcher.core.modes import eval_mode, up_to
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import Task
from transformer_patcher.methods.pmet.architecture import block_modules, unwrap
from transformer_patcher.methods.pmet.block_inputs import BlockInputs
from transformer_patcher.methods.pmet.covariance import SecondMoment
from transformer_patcher.methods.pmet.hparams import PMETHyperParams
from transformer_patcher.methods.pmet.requests import EditRequest, Encoded, encode, encode_request
from transformer_patcher.methods.pmet.targets import Targets, compute_targets, output_hook, pad_rows, rewrite_templates
from transformer_patcher.methods.pmet.update import LowRankDelta, penalty, residual_share, solve_joint, solve_update
from transformer_patcher.methods.pmet.written_facts import WrittenFacts
from transformer_patcher.methods.pmet.written_keys import WrittenKeys

logger = logging.getLogger(__name__)


def _captured(
    model: nn.Module,
    tokenizer: Any,
    encodings: Sequence[Encoded],
    reads: Sequence[tuple[str, str]],
    batch_size: int,
    record: BlockInputs | None = None,
    replay: BlockInputs | None = None,
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Per chunk of ``batch_size`` encodings: the value of each ``(module, side)`` read (its input or output; shallow
    to deep: the forward pass stops at the last module), the chunk's lookup-token mask and its other-token mask.
    ``record`` keeps a block's input chunk by chunk; ``replay`` starts every chunk's pass at a block with the input
    an earlier pass over the same chunks recorded (:mod:`.block_inputs`)."""
    base = unwrap(model)
    device = next(base.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seen: list[list[torch.Tensor]] = [[] for _ in reads]

    def keep(into: list[torch.Tensor], value: Any) -> None:
        into.append((value[0] if isinstance(value, tuple) else value).detach())

    modules = [base.get_submodule(name) for name, _ in reads]
    handles = []
    for module, (_, side), into in zip(modules, reads, seen, strict=True):
        if side == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, into=into: keep(into, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, output, into=into: keep(into, output)))
    try:
        with ExitStack() as stack, eval_mode(model), torch.no_grad():
            for blocks, how in ((record, BlockInputs.recorded), (replay, BlockInputs.replayed)):
                if blocks is not None:
                    stack.enter_context(how(blocks))
            for start in range(0, len(encodings), batch_size):
                chunk = encodings[start : start + batch_size]
                ids, mask = pad_rows([e.ids for e in chunk], pad, device)
                for into in seen:
                    into.clear()
                with up_to(modules[-1]):  # only the modules' values are read: no later block, no LM head
                    base.base_model(input_ids=ids, attention_mask=mask)
                lookups = torch.tensor([e.lookup for e in chunk], device=device)
                at_lookup = torch.arange(mask.shape[1], device=device) == lookups[:, None]
                yield [into[0] for into in seen], at_lookup, mask.bool() & ~at_lookup
    finally:
        for handle in handles:
            handle.remove()


def read_modules_values(
    model: nn.Module,
    tokenizer: Any,
    encodings: Sequence[Encoded],
    module_names: Sequence[str],
    side: str,
    at_subject: bool = True,
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """The input (``side="input"``) or output of each of ``module_names`` (shallow to deep: the forward pass stops at
    the last) as float32 rows on the model's device, one tensor per module, all read in the same forward passes: at
    each encoding's lookup token (``at_subject``), or at every other token of each encoding (rows in order, encoding
    by encoding)."""
    rows: list[list[torch.Tensor]] = [[] for _ in module_names]
    reads = [(name, side) for name in module_names]
    for values, at_lookup, others in _captured(model, tokenizer, encodings, reads, batch_size):
        chosen = at_lookup if at_subject else others
        for value, out in zip(values, rows, strict=True):
            out.append(value[chosen].float())
    return [torch.cat(out) for out in rows]


def read_with_moments(
    model: nn.Module,
    tokenizer: Any,
    encodings: Sequence[Encoded],
    reads: Sequence[tuple[str, str]],
    moment_reads: int,
    subject_weight: float = 1.0,
    batch_size: int = 32,
    record: BlockInputs | None = None,
    replay: BlockInputs | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """In the same forward passes: each ``(module, side)`` read at every encoding's lookup token (n × d, float32),
    and, for the first ``moment_reads`` reads, ``Kₒ W Kₒᵀ`` (d × d, float64) over every other token, weighed 1 or
    ``subject_weight`` at the subject's other tokens. The moments are summed chunk by chunk (each chunk's in
    float32, at half float64's cost on a CPU), so the other tokens' rows (a prompt's dozen or more per fact, at
    every edited layer) are never held together. ``record`` and ``replay``: as in :func:`_captured`."""
    rows: list[list[torch.Tensor]] = [[] for _ in reads]
    moments: list[torch.Tensor] = []
    done = 0
    for values, at_lookup, others in _captured(model, tokenizer, encodings, reads, batch_size, record, replay):
        chunk = encodings[done : done + at_lookup.shape[0]]
        done += len(chunk)
        for value, out in zip(values, rows, strict=True):
            out.append(value[at_lookup].float())
        if len(moments) < moment_reads:  # the first chunk: a zero d × d per moment
            moments = [value.new_zeros(value.shape[-1], value.shape[-1], dtype=torch.float64) for value in values]
            moments = moments[:moment_reads]
        device = at_lookup.device
        positions = torch.arange(at_lookup.shape[1], device=device)
        starts = torch.tensor([e.subject_start for e in chunk], device=device)[:, None]
        inside = (positions >= starts) & (positions < torch.tensor([e.lookup for e in chunk], device=device)[:, None])
        weights = torch.where(inside, subject_weight, 1.0)[others].float()[:, None]
        for moment, value in zip(moments, values, strict=False):
            keys = value[others].float()
            moment += ((keys * weights).T @ keys).double()  # a chunk's few hundred rows in float32, summed in float64
    return [torch.cat(out) for out in rows], moments


def read_module_values(
    model: nn.Module,
    tokenizer: Any,
    encodings: Sequence[Encoded],
    module_name: str,
    side: str,
    at_subject: bool = True,
    batch_size: int = 32,
) -> torch.Tensor:
    """:func:`read_modules_values` for one module."""
    return read_modules_values(model, tokenizer, encodings, [module_name], side, at_subject, batch_size)[0]


def read_at_subject(
    model: nn.Module, tokenizer: Any, encodings: Sequence[Encoded], module_name: str, side: str
) -> torch.Tensor:
    """The input or output of ``module_name`` at each encoding's lookup token (:func:`read_module_values`)."""
    return read_module_values(model, tokenizer, encodings, module_name, side)


def prompt_moments(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    module_names: Sequence[str],
    answers: bool = False,
    subject_weight: float = 1.0,
) -> list[torch.Tensor]:
    """``Kₒ W Kₒᵀ`` (d_in × d_in, float64) for each of ``module_names`` (shallow to deep): the keys at every token but
    the subject's last of each request's bare prompt, weighed 1, or ``subject_weight`` at the subject's other tokens.
    Counted in a solve with no residual, it keeps what the write would otherwise change at the prompt's other tokens
    (the relation's words, the subject's first words), which the fact's answer is read through. With ``answers`` the
    prompt is followed by its target's tokens but the last (teacher forcing), where a multi-token answer's later
    tokens are read."""
    encodings = [encode_request(tokenizer, request, answers) for request in requests]
    reads = [(name, "input") for name in module_names]
    return read_with_moments(model, tokenizer, encodings, reads, len(reads), subject_weight)[1]


def prompt_moment(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    module_name: str,
    answers: bool = False,
    subject_weight: float = 1.0,
) -> torch.Tensor:
    """:func:`prompt_moments` for one module."""
    return prompt_moments(model, tokenizer, requests, [module_name], answers, subject_weight)[0]


def compute_layer_keys(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    templates: Sequence[Sequence[str]],
    module_names: Sequence[str],
) -> list[torch.Tensor]:
    """``K`` (d_in × n) for each of ``module_names`` (shallow to deep), read in the same forward passes: FFN keys at
    the subject's last token, mean within each template group, then across groups."""
    encodings = [
        encode(tokenizer, template, request.subject)
        for request in requests
        for template in rewrite_templates(templates, request)
    ]
    sizes = [len(group) for group in templates]
    out = []
    for keys in read_modules_values(model, tokenizer, encodings, module_names, "input"):
        per_request = keys.reshape(len(requests), sum(sizes), -1)
        groups = torch.split(per_request, sizes, dim=1)
        out.append(torch.stack([group.mean(1) for group in groups]).mean(0).T)
    return out


def compute_keys(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    templates: Sequence[Sequence[str]],
    module_name: str,
) -> torch.Tensor:
    """:func:`compute_layer_keys` for one module."""
    return compute_layer_keys(model, tokenizer, requests, templates, [module_name])[0]


@contextmanager
def applied(model: nn.Module, deltas: dict[str, LowRankDelta], at: torch.Tensor | None = None) -> Iterator[None]:
    """Add ``x @ ΔWᵀ`` to each named module's output while inside (forward hooks; the weights are never touched).
    A delta of higher rank than ``d_in·d_out / (d_in + d_out)`` (a batch of more facts than that) acts as its dense
    ``ΔW``, which costs fewer multiplications than its two factors.

    ``at``: a 0/1 mask over the token positions (broadcast over the batch) where the update acts; every token when
    not given (a weight edit acts everywhere; the mask is for studying where it matters)."""
    base = unwrap(model)
    handles = []

    def hook_for(delta: LowRankDelta):
        up, down = delta.up.float(), delta.down.float()
        (d_out, rank), d_in = up.shape, down.shape[1]
        dense = delta.dense().float() if rank * (d_in + d_out) > d_in * d_out else None  # fewer multiplications

        def add(_module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            x = args[0]
            if dense is None:
                shift = (x.float() @ down.T.to(x.device)) @ up.T.to(x.device)
            else:
                shift = x.float() @ dense.T.to(x.device)
            if at is not None:
                shift = shift * at.to(shift)[..., None]
            return output_hook(lambda out: out + shift.to(out.dtype))(_module, args, output)

        return add

    try:
        for name, delta in deltas.items():
            handles.append(base.get_submodule(name).register_forward_hook(hook_for(delta)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def written_values(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], hparams: PMETHyperParams, targets: Targets
) -> tuple[str, torch.Tensor]:
    """What the layer loop reads at the z layer (a module name) and the value it drives there (d × n, float64).

    The target ``z`` at the FFN output (PMET's ``track="ffn"``) or the block output (the MEMIT ablation), or, for
    PMET's ``track="residual"``, the block output read now plus the optimised change, since the block output is where
    every layer's write adds up and the change was optimised on the FFN output. The change is scaled by
    ``hparams.write_scale``."""
    device = next(unwrap(model).parameters()).device
    change = targets.change(hparams.fold_attention).to(device).double().T * hparams.write_scale  # d × n
    read_module = z_read_module(model, hparams)
    if hparams.variant == "pmet" and hparams.track == "residual":  # the FFN change, carried by the residual stream
        return read_module, read_z(model, tokenizer, requests, read_module) + change  # read now, not at optimisation
    return read_module, targets.init.to(device).double().T + change


def z_read_module(model: nn.Module, hparams: PMETHyperParams) -> str:
    """Where the layer loop reads what a fact's write achieved: the z layer's FFN output (PMET's ``track="ffn"``)
    or its block output."""
    z_block = block_modules(model, hparams.layers[-1])
    return z_block.ffn_out if hparams.variant == "pmet" and hparams.track == "ffn" else z_block.block


def read_z(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], read_module: str) -> torch.Tensor:
    """``read_module``'s output at each request's subject (its last token, the bare prompt): d × n, float64."""
    bare = [encode(tokenizer, request.template, request.subject) for request in requests]
    return read_at_subject(model, tokenizer, bare, read_module, "output").double().T


def layer_reads(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hparams: PMETHyperParams,
    templates: Sequence[Sequence[str]],
    names: Sequence[str],
    read_module: str,
    held: Sequence[EditRequest],
    record: BlockInputs | None = None,
    replay: BlockInputs | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor | None]]:
    """What one step of the layer loop reads under the updates so far: the keys of ``names`` (d_in × n each; in
    the bare prompt for ``key_reads="prompt"``, else averaged over ``templates``), the z layer's value now
    (:func:`read_z`) and, with ``hparams.keep_prompts``, the kept prompts' moments scaled by it (:func:`prompt_moments`;
    None per name without).

    The bare prompt is a prefix of the prompt followed by its answer and attention is causal, so when the keys are
    read in the bare prompt and the kept prompts are the driven facts' own, the three come from one forward pass over
    the prompts (with their answers for ``keep_answers``) instead of three. ``record`` and ``replay`` act on that
    pass (:func:`_captured`)."""
    subject_weight = 1.0
    if hparams.keep_prompts:
        subjects = hparams.keep_prompts if hparams.keep_subjects is None else hparams.keep_subjects
        subject_weight = subjects / hparams.keep_prompts
    keep = bool(hparams.keep_prompts and held)
    shared_moments = keep and held is requests
    shared_keys = hparams.key_reads == "prompt"
    encodings = [encode_request(tokenizer, request, shared_moments and hparams.keep_answers) for request in requests]
    reads = [(name, "input") for name in names] if shared_keys or shared_moments else []
    moment_reads = len(reads) if shared_moments else 0
    everything = [*reads, (read_module, "output")]
    rows, moments = read_with_moments(
        model, tokenizer, encodings, everything, moment_reads, subject_weight, record=record, replay=replay
    )
    current = rows[-1].double().T
    if shared_keys:
        keys = [row.T for row in rows[:-1]]
    else:
        keys = compute_layer_keys(model, tokenizer, requests, templates, names)
    if keep and not shared_moments:
        moments = prompt_moments(model, tokenizer, held, names, hparams.keep_answers, subject_weight)
    kept: list[torch.Tensor | None] = [None] * len(names)
    if keep:
        kept = [hparams.keep_prompts * moment for moment in moments]
    return keys, current, kept


def joint_penalties(
    hparams: PMETHyperParams,
    moments: dict[int, SecondMoment],
    layers: Sequence[int],
    kept: Sequence[torch.Tensor | None],
    device: torch.device | str,
) -> list[torch.Tensor]:
    """The joint solve's penalty per block of ``layers``: λ times its ``layer_weights`` entry times its key statistics,
    plus the kept prompts' moment read at it (:func:`layer_reads`)."""
    return [
        penalty(moments[index].regularized(hparams.mom2_ridge), hparams.penalty_weight(index), moment, device)
        for index, moment in zip(layers, kept, strict=True)
    ]


def compute_deltas(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hparams: PMETHyperParams,
    moments: dict[int, SecondMoment],
    templates: Sequence[Sequence[str]],
    targets: Targets,
    written: WrittenKeys | None = None,
    progress: bool = False,
    wanted: tuple[str, torch.Tensor] | None = None,
    shown: str | None = None,
    kept_prompts: Sequence[EditRequest] | None = None,
) -> dict[str, LowRankDelta]:
    """One ``ΔW`` per edited FFN output projection (module name → factors) for this batch of requests.

    ``wanted`` is :func:`written_values` (read under the model as it is now when not given). With ``written``
    each update is its solve, which counts the keys earlier batches wrote (AlphaEdit's projected solve, or the
    paper's with those keys) and then holds the batch's keys as pending. With ``hparams.keep_prompts`` each solve
    also keeps the keys at the other tokens of the ``kept_prompts`` requests' prompts (by default every driven
    fact's; :func:`prompt_moment`, read under the updates so far). ``shown``: how the progress bar counts the facts (by
    default their number).
    """
    read_module, values = wanted if wanted is not None else written_values(model, tokenizer, requests, hparams, targets)
    deltas: dict[str, LowRankDelta] = {}
    joint = hparams.spread_rule == "joint"
    held = requests if kept_prompts is None else kept_prompts
    desc = f"PMET layer loop, {shown or len(requests)} facts"
    bar = tqdm(hparams.layers, desc=desc, unit="layer", disable=not progress)
    below: BlockInputs | None = None  # what entered the block written last (the next read starts there)
    for position, layer in enumerate(bar):
        solved = hparams.layers[position:] if joint else (layer,)  # the layers this solve writes (only the first now)
        names = [block_modules(model, index).ffn_out for index in solved]
        record = BlockInputs(unwrap(model), layer)
        with applied(model, deltas):
            keys, current, kept = layer_reads(
                model, tokenizer, requests, hparams, templates, names, read_module, held, record, below
            )
        below = record if record.replayable else None
        if joint:
            systems = joint_penalties(hparams, moments, solved, kept, keys[0].device)
            deltas[names[0]] = solve_joint(keys, values - current, systems)
            continue
        residuals = (values - current) * residual_share(position, len(hparams.layers), hparams.spread_rule)
        if written is not None:
            deltas[names[0]] = written.solve(layer, keys[0], residuals, kept[0])
        else:
            covariance = moments[layer].regularized(hparams.mom2_ridge)
            deltas[names[0]] = solve_update(keys[0], residuals, covariance, hparams.penalty_weight(layer), kept[0])
    return deltas


def landed_share(moved: torch.Tensor, aim: torch.Tensor) -> torch.Tensor:
    """Per column (fact), the share of ``aim`` that ``moved`` carries: ``⟨moved, aim⟩ / ‖aim‖²`` (1: all of it)."""
    return (moved * aim).sum(0) / (aim * aim).sum(0).clamp_min(torch.finfo(aim.dtype).tiny)


# A re-aimed fact's aim is at most this many times the asked one, so a fact the solve barely moves (or moves away)
# is not driven without bound; each round divides by at least this share of the aim
MAX_AIM = 3.0
MIN_LANDED = 0.25


def aimed_deltas(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hparams: PMETHyperParams,
    moments: dict[int, SecondMoment],
    templates: Sequence[Sequence[str]],
    targets: Targets,
    wanted: tuple[str, torch.Tensor],
    written: WrittenKeys | None = None,
    progress: bool = False,
    shown: str | None = None,
    kept_prompts: Sequence[EditRequest] | None = None,
) -> dict[str, LowRankDelta]:
    """:func:`compute_deltas`, solved ``hparams.aim_rounds`` more times from the same weights, each fact's aim scaled
    by the inverse of the share of it the previous solve landed.

    The aim of fact i is ``a_i = wanted_i − z_i`` (``z_i`` read at its key now); a solve lands ``l_i = ⟨Δz_i, a_i⟩ /
    ‖a_i‖²`` of it, and the next solve aims at ``z_i + s_i a_i`` with ``s_i ← s_i / max(l_i, MIN_LANDED)``, capped at
    ``MAX_AIM``: a fact the ridge solve lands short of its aim is aimed further, one it overshoots less far. Only the
    last solve is returned."""
    read_module, values = wanted
    solve = (model, tokenizer, requests, hparams, moments, templates, targets, written, progress)
    deltas = compute_deltas(*solve, wanted, shown, kept_prompts)
    if not hparams.aim_rounds:
        return deltas
    now = read_z(model, tokenizer, requests, read_module)
    aim = values - now
    scale = torch.ones(aim.shape[1], dtype=aim.dtype, device=aim.device)
    for round_ in range(1, hparams.aim_rounds + 1):
        with applied(model, deltas):
            moved = read_z(model, tokenizer, requests, read_module) - now
        landed = landed_share(moved, aim)
        scale = (scale / landed.clamp_min(MIN_LANDED)).clamp_max(MAX_AIM)
        logger.info(
            "aim round %d: landed share median %.3f (10th percentile %.3f)",
            round_,
            landed.median().item(),
            landed.quantile(0.1).item(),
        )
        deltas = compute_deltas(*solve, (read_module, now + aim * scale), shown, kept_prompts)
    return deltas


def refined_deltas(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hparams: PMETHyperParams,
    moments: dict[int, SecondMoment],
    templates: Sequence[Sequence[str]],
    targets: Targets,
    task: Task,
    written: WrittenKeys | None = None,
    progress: bool = False,
    replay: WrittenFacts | None = None,
    wanted: tuple[str, torch.Tensor] | None = None,
) -> tuple[dict[str, LowRankDelta], torch.Tensor]:
    """:func:`aimed_deltas`, then ``hparams.refine_rounds`` more rounds for the facts the write missed; returns the
    deltas and the values every fact the write drove was last aimed at (d × n, the replayed facts first: ``wanted``'s,
    or further for the facts a resolve round aimed further, which a rewritten stream aims them at again in every later
    batch).

    The closed-form write lands only part of each target (λ trades the fit against typical keys), so an optimised
    target that was likely is not always the greedy answer after the write. Each round reads, under the deltas so
    far, which requests' answers are not the greedy continuation of their own prompt, and adds a layer loop's update
    for those (the factors are concatenated). ``refine="retarget"`` first optimises new targets for them against the
    edited model; ``"rewrite"`` drives the values the first write aimed at again, from where that write left them,
    which costs no optimisation. With ``written`` every round's update is weighed against the keys written before it
    (earlier batches' and this batch's), and its keys join the batch's pending keys. With ``replay`` the first layer
    loop also drives every fact earlier batches wrote back to where its batch's write left it, its key and where it
    stands read now (or, for ``rewrite_written``, to the value it was aimed at); with ``refine_written`` a resolve
    round checks those facts too. ``wanted`` is :func:`written_values` (read under the model as it is now when not
    given).
    """
    read_module, values = wanted if wanted is not None else written_values(model, tokenizer, requests, hparams, targets)
    everything, aims = (requests, values) if replay is None else replay.joined(requests, values)
    shown = f"{len(everything)} ({len(everything) - len(requests)} written before)" if replay else None  # empty: none
    wanted = (read_module, aims)
    kept = list(replay.requests) if replay is not None and hparams.keep_prompts_of == "written" else None
    checked = everything if hparams.refine_written else requests  # the facts a round checks: the last of everything
    first = len(everything) - len(checked)

    def write_all(aimed: tuple[str, torch.Tensor]) -> dict[str, LowRankDelta]:
        """The whole write (every driven fact) from the weights as they are, each fact aimed at its column."""
        everyone = (model, tokenizer, everything, hparams, moments, templates, targets)
        return aimed_deltas(*everyone, aimed, written, progress, shown, kept)

    deltas = write_all(wanted)
    for round_ in range(1, hparams.refine_rounds + 1):
        with applied(model, deltas):
            prompts = [(r.template.format(r.subject), r.target) for r in checked]
            label = f"refine round {round_}: which facts the write missed" if progress else None
            outcomes = score_pairs(model, task, prompts, progress=label)
            index = [i for i, outcome in enumerate(outcomes) if not outcome.correct]
            logger.info("refine round %d: the write missed %d of %d facts", round_, len(index), len(checked))
            if not index:
                break
            missed = [checked[i] for i in index]
            if hparams.refine == "rewrite":
                aim, again = (read_module, values[:, index]), targets.select(index)
            else:
                aim, again = None, compute_targets(model, tokenizer, missed, hparams, templates, progress=progress)
            more = None
            if hparams.refine != "resolve":
                more = compute_deltas(
                    model, tokenizer, missed, hparams, moments, templates, again, written, progress, aim, None, kept
                )
        if more is not None:
            deltas = {name: deltas[name].joined(more[name]) for name in deltas}
            continue
        # resolve: the missed facts aim further by their new change, and the whole write is solved again
        columns = [first + i for i in index]
        aims = aims.clone()
        aims[:, columns] += again.change(hparams.fold_attention).to(aims).T * hparams.write_scale
        deltas = write_all((read_module, aims))
    return deltas, aims
