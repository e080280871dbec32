"""Target vectors ``z``: what the z layer should output at the subject's last token for each request to hold.

PMET (``compute_zs``) adds two zero-initialised vectors at the subject's last token of every prompt of a request:
``δ_attn`` to the z layer's attention output and ``δ_mlp`` to its FFN output. They minimise the target's NLL over
the context-template prompts, plus a KL term keeping "{subject} is a" unchanged, plus a weight decay, under a norm
clamp, with the official early exits. The FFN target ``z = h_mlp + δ_mlp`` is what the layer loop writes. The MEMIT
ablation optimises one ``δ`` on the block output (the residual stream) instead.

Several requests are optimised in one forward pass (``requests_per_step``). Each has its own parameters, its own
loss terms and its own early exit, and a finished request leaves the batch, so the result equals optimising each
request alone; batching only fills the matrix units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transformer_patcher.core.modes import eval_mode, frozen
from transformer_patcher.methods.pmet.architecture import block_modules, unwrap
from transformer_patcher.methods.pmet.hparams import PMETHyperParams
from transformer_patcher.methods.pmet.requests import EditRequest, Encoded, encode, target_ids

KL_TEMPLATE = "{} is a"
LOSS_EXIT = 5e-2
KL_EXIT = 0.01


@dataclass
class Targets:
    """Per request (rows): the target ``z`` at the z layer, its pre-edit value, steps taken and final probability."""

    values: torch.Tensor  # (n, d) float32
    init: torch.Tensor  # (n, d)
    steps: list[int]
    probabilities: list[float]

    def select(self, indices: Sequence[int]) -> Targets:
        index = list(indices)
        return Targets(
            self.values[index], self.init[index], [self.steps[i] for i in index], [self.probabilities[i] for i in index]
        )


def rewrite_templates(templates: Sequence[Sequence[str]], request: EditRequest) -> list[str]:
    """Every context template around the request's prompt, still with the subject slot."""
    return [context.format(request.template) for group in templates for context in group]


def pad_encodings(encodings: Sequence[Encoded], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask of encodings (right padding keeps every lookup index valid)."""
    width = max(len(e.ids) for e in encodings)
    ids = torch.full((len(encodings), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encodings), width), dtype=torch.long)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
    return ids.to(device), mask.to(device)


def output_hook(add: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """A forward hook that replaces a module's (first) output by ``add(output)``."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (add(output[0]), *output[1:])
        return add(output)

    return hook


def compute_targets(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hparams: PMETHyperParams,
    templates: Sequence[Sequence[str]],
    progress: bool = True,
) -> Targets:
    """Optimise the target vector of every request against ``model`` as it is now (earlier edits included)."""
    results: list[tuple[torch.Tensor, torch.Tensor, int, float]] = []
    bar = tqdm(total=len(requests), desc="PMET targets", unit="req", disable=not progress)
    with bar, eval_mode(model), frozen(model):
        for start in range(0, len(requests), hparams.requests_per_step):
            chunk = requests[start : start + hparams.requests_per_step]
            results.extend(_optimise_chunk(model, tokenizer, chunk, hparams, templates))
            bar.update(len(chunk))
    return Targets(
        torch.stack([r[0] for r in results]),
        torch.stack([r[1] for r in results]),
        [r[2] for r in results],
        [r[3] for r in results],
    )


def next_token_log_probs(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, reads: Any) -> Any:
    """Log-probabilities of the next token at ``reads = (rows, positions)`` only.

    The LM head runs on the read positions alone (a few per prompt) rather than on every position: the head and the
    softmax over a large vocabulary (49k tokens for SmolLM2) at every position would be computed and back-propagated
    for nothing.
    """
    hidden = base.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = base.get_output_embeddings()(hidden[reads]).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def _optimise_chunk(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hparams: PMETHyperParams,
    templates: Sequence[Sequence[str]],
) -> list[tuple[torch.Tensor, torch.Tensor, int, float]]:
    base = unwrap(model)
    device = next(base.parameters()).device
    modules = block_modules(base, hparams.layers[-1])
    sites = (
        {"block": modules.block}
        if hparams.variant == "memit"
        else {"attn": modules.attention_out, "mlp": modules.ffn_out}
    )
    hidden = base.get_output_embeddings().weight.shape[1]

    encodings: list[Encoded] = []
    owner: list[int] = []  # request index of each row
    first_row: list[int] = []  # the bare prompt (template "{}") of each request: where initial values are read
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
    input_ids, attention = pad_encodings(encodings, pad, device)
    lookups = torch.tensor([e.lookup for e in encodings], device=device)
    owners = torch.tensor(owner, device=device)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    read_row = as_tensor([row for row, e in enumerate(encodings) for _ in e.target_positions])
    read_pos = as_tensor([p for e in encodings for p in e.target_positions])
    read_label = as_tensor([t for e in encodings for t in e.target_ids])
    answer_length = torch.tensor([max(len(e.target_ids), 1) for e in encodings], device=device)

    n = len(requests)
    deltas = {site: [torch.zeros(hidden, device=device, requires_grad=True) for _ in range(n)] for site in sites}
    init: dict[str, list[torch.Tensor | None]] = {site: [None] * n for site in sites}
    optimizer = torch.optim.Adam([p for params in deltas.values() for p in params], lr=hparams.v_lr)
    active = list(range(n))
    rows_now: list[int] = []
    kl_init: dict[int, torch.Tensor] = {}
    nll_factor = [hparams.nll_loss_factor] * n
    steps = [0] * n
    probability = [0.0] * n

    def adder(site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def add(output: torch.Tensor) -> torch.Tensor:
            for position, row in enumerate(rows_now):
                r = owner[row]
                if init[site][r] is None and row == first_row[r]:
                    init[site][r] = output[position, lookups[row]].detach().clone()
            local = torch.arange(len(rows_now), device=device)
            shift = torch.stack([deltas[site][owner[row]] for row in rows_now]).to(output.dtype)
            return output.index_put((local, lookups[rows_now]), shift, accumulate=True)

        return add

    handles = [base.get_submodule(name).register_forward_hook(output_hook(adder(site))) for site, name in sites.items()]
    try:
        for step in range(hparams.v_num_grad_steps):
            is_active = torch.zeros(n, dtype=torch.bool, device=device)
            is_active[active] = True
            rows_now[:] = [row for row in range(len(encodings)) if owner[row] in active]
            local = torch.full((len(encodings),), -1, dtype=torch.long, device=device)
            local[rows_now] = torch.arange(len(rows_now), device=device)
            reads = is_active[owners[read_row]]
            t_row, t_pos, t_label = read_row[reads], read_pos[reads], read_label[reads]
            k_row = as_tensor([kl_rows[r] for r in active])
            width = int(attention[rows_now].sum(1).max())
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                log_probs = next_token_log_probs(
                    base,
                    input_ids[rows_now, :width],
                    attention[rows_now, :width],
                    (local[torch.cat([t_row, k_row])], torch.cat([t_pos, lookups[k_row]])),
                )
                target_lp = log_probs[: len(t_row)].gather(1, t_label[:, None]).squeeze(1)
                wrong = (log_probs[: len(t_row)].argmax(-1) != t_label).float()
                row_nll = torch.zeros(len(encodings), device=device).index_add(0, t_row, -target_lp) / answer_length
                wrong_count = torch.zeros(n, device=device).index_add(0, owners[t_row], wrong)
                losses = []
                finished = []
                for a, r in enumerate(active):
                    rows = torch.arange(first_row[r], kl_rows[r], device=device)
                    nll_each = row_nll[rows]
                    kl_now = log_probs[len(t_row) + a]
                    if r not in kl_init:
                        kl_init[r] = kl_now.detach().clone()
                    kl = hparams.kl_factor * F.kl_div(kl_init[r], kl_now, log_target=True, reduction="sum")
                    decay = sum(
                        deltas[site][r].norm() / init[site][r].float().norm().clamp_min(1e-12) ** 2 for site in sites
                    )
                    loss = nll_factor[r] * nll_each.mean() + kl + hparams.v_weight_decay * decay
                    probability[r] = float(torch.exp(-nll_each.detach()).mean())
                    steps[r] = step
                    done = bool(loss < LOSS_EXIT) or step == hparams.v_num_grad_steps - 1
                    if wrong_count[r] == 0:  # the target is already the argmax everywhere
                        nll_factor[r] = 0.1 * hparams.nll_loss_factor
                        done = done or bool(kl <= KL_EXIT)
                    else:
                        nll_factor[r] = hparams.nll_loss_factor
                    if done:
                        finished.append(r)
                    else:
                        losses.append(loss)
                if losses:
                    torch.stack(losses).sum().backward()
            for r in finished:
                active.remove(r)
                for site in sites:
                    deltas[site][r].grad = None
            if not active:
                break
            optimizer.step()
            with torch.no_grad():
                for r in active:
                    for site in sites:
                        limit = hparams.clamp_norm_factor * init[site][r].float().norm()
                        norm = deltas[site][r].norm()
                        if norm > limit:
                            deltas[site][r].mul_(limit / norm)
    finally:
        for handle in handles:
            handle.remove()
    written = "block" if hparams.variant == "memit" else "mlp"
    return [
        (
            (init[written][r].float() + deltas[written][r].detach()).cpu(),
            init[written][r].float().cpu(),
            steps[r] + 1,
            probability[r],
        )
        for r in range(n)
    ]
