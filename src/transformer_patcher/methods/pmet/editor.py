"""``PMETEditor``: batch and sequential-batch PMET editing, its edits held in a DELTA (low-rank weight) adapter.

The model is wrapped once with :func:`get_delta_model` over the edited FFN output projections. Each call to
:meth:`PMETEditor.edit_batch` computes target vectors against the model as it is now (earlier batches included),
solves the per-layer updates in closed form and appends their factors to the adapter — so a stream of batches is
"sequential batch editing", and the adapter saves, loads, disables, unloads and merges like any PEFT adapter.

The editor also implements the SME :class:`~transformer_patcher.core.editor.Editor` protocol (one example per
call), which is what ``transformer-patcher sme run --editor pmet`` drives.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transformer_patcher.core.editor import EditRecord
from transformer_patcher.core.errors import InvalidExampleError, InvalidPatchError
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import CausalLMTask, Task
from transformer_patcher.methods.pmet.algorithm import read_z, refined_deltas, written_values, z_read_module
from transformer_patcher.methods.pmet.architecture import block_modules, unwrap
from transformer_patcher.methods.pmet.covariance import SecondMoment, second_moments
from transformer_patcher.methods.pmet.hparams import PMETHyperParams
from transformer_patcher.methods.pmet.null_space import NullSpace
from transformer_patcher.methods.pmet.requests import EditRequest
from transformer_patcher.methods.pmet.targets import Targets, compute_targets
from transformer_patcher.methods.pmet.written_facts import WrittenFacts
from transformer_patcher.methods.pmet.written_keys import CovarianceSolve, WrittenKeys
from transformer_patcher.tuners.delta.config import DeltaConfig
from transformer_patcher.tuners.delta.layer import DeltaLayer
from transformer_patcher.tuners.delta.model import get_delta_model


def written_solve(
    hparams: PMETHyperParams, moments: dict[int, SecondMoment], device: torch.device | str
) -> WrittenKeys | None:
    """The solve that counts the keys earlier batches wrote, on ``device``: AlphaEdit's projected one
    (``null_space``), the paper's with those keys (``keep_written``), or None (the paper's)."""
    if hparams.null_space:
        return NullSpace.from_moments(
            {layer: moments[layer].matrix.to(device) for layer in hparams.layers},
            hparams.null_space_threshold,
            hparams.null_space_l2,
        )
    if hparams.keep_written:
        return CovarianceSolve(
            {layer: moments[layer].regularized(hparams.mom2_ridge).to(device) for layer in hparams.layers},
            hparams.mom2_update_weight,
        )
    return None


@dataclass
class BatchResult:
    """What one batch edit did: its requests' targets (steps, probabilities) and the rank it added per layer (one
    per request, plus one per fact a refine round wrote again)."""

    requests: int
    seconds: float
    targets: Targets
    rank_added: int


class PMETEditor:
    """PMET (``hparams.variant="pmet"``) or its MEMIT ablation over a decoder-only LM."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hparams: PMETHyperParams,
        stats_texts: Sequence[str] = (),
        moments: dict[int, SecondMoment] | None = None,
        task: Task | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        adapter_name: str = "default",
        templates: Sequence[Sequence[str]] | None = None,
        progress: bool = True,
    ) -> None:
        base = unwrap(model)
        self.blocks = [block_modules(base, layer) for layer in hparams.layers]  # unsupported models stop here
        if moments is None:
            if not stats_texts:
                raise ValueError("PMET needs key statistics: pass stats_texts (any local text) or moments")
            moments = second_moments(
                base,
                tokenizer,
                list(stats_texts)[: hparams.mom2_n_texts],
                hparams.layers,
                cache_dir=cache_dir,
                max_length=hparams.mom2_max_length,
                progress=progress,
            )
        missing = [layer for layer in hparams.layers if layer not in moments]
        if missing:
            raise ValueError(f"no key statistics for layers {missing}")
        self.hparams = hparams
        self.tokenizer = tokenizer
        self.moments = moments
        self.adapter_name = adapter_name
        self.progress = progress
        self.task = task or CausalLMTask(tokenizer)
        if hasattr(model, "peft_config") and adapter_name in model.peft_config:
            self.model = model
        else:
            config = DeltaConfig(target_modules=[b.ffn_out for b in self.blocks], method=hparams.variant)
            self.model = get_delta_model(model, config, adapter_name=adapter_name)
        self.templates = [list(group) for group in templates] if templates is not None else None
        device = next(base.parameters()).device  # the solves run where the model is
        self.written = written_solve(hparams, moments, device)
        prefix = "rewritten_facts" if hparams.rewrite_written else "written_facts"  # what the record holds differs
        self.replay = WrittenFacts(prefix) if hparams.replay_written or hparams.rewrite_written else None

    # ------------------------------------------------------------------------------------------- batches
    def context_templates(self) -> list[list[str]]:
        """The context templates, generated (seeded) on first use with the edits switched off."""
        if self.templates is None:
            with self.model.disable_adapter():
                self.templates = self.hparams.templates(self.model, self.tokenizer)
        return self.templates

    def compute_targets(self, requests: Sequence[EditRequest]) -> Targets:
        """Target vectors of ``requests`` against the model as it is now (reusable while the model is unchanged), or
        against the unedited model with ``rewrite_written``, whose writes start from it."""
        with self.written_from():
            return compute_targets(
                self.model, self.tokenizer, requests, self.hparams, self.context_templates(), progress=self.progress
            )

    def written_from(self) -> AbstractContextManager[Any]:
        """Where a batch's write starts: the model as it is (the edits switched off with ``rewrite_written``)."""
        return self.model.disable_adapter() if self.hparams.rewrite_written else nullcontext()

    def edit_batch(self, requests: Sequence[EditRequest], targets: Targets | None = None) -> BatchResult:
        """Write every request into the model at once; on any error the adapter is left as it was.

        With ``rewrite_written`` the write covers every fact written so far too, from the unedited weights, and
        replaces the adapter's factors."""
        if not requests:
            raise InvalidExampleError("no requests to edit")
        start = time.perf_counter()
        targets = targets if targets is not None else self.compute_targets(requests)
        if targets.values.shape[0] != len(requests):
            raise ValueError(f"{targets.values.shape[0]} targets for {len(requests)} requests")
        rewrite = self.hparams.rewrite_written
        try:
            with self.written_from():
                wanted = written_values(self.model, self.tokenizer, requests, self.hparams, targets)
                deltas, aimed = refined_deltas(
                    self.model,
                    self.tokenizer,
                    requests,
                    self.hparams,
                    self.moments,
                    self.context_templates(),
                    targets,
                    self.task,
                    self.written,
                    self.progress,
                    self.replay,
                    wanted,
                )
            bad = [n for n, d in deltas.items() if not (torch.isfinite(d.up).all() and torch.isfinite(d.down).all())]
            if bad:
                raise InvalidPatchError(f"the PMET update for {bad} is not finite; nothing was changed")
            layers = self.delta_layers()
            ranks = {name: layer.rank(self.adapter_name) for name, layer in layers.items()}
            previous = self._factors() if rewrite else None  # a rewrite replaces the factors: keep them to roll back
            try:
                for name, delta in deltas.items():
                    write = layers[name].replace_delta if rewrite else layers[name].add_delta
                    write(self.adapter_name, delta.up, delta.down)
                if rewrite:  # what every fact so far was aimed at: every later batch aims them there again
                    self.replay.hold([*self.replay.requests, *requests], aimed, replacing=True)
                elif self.replay is not None:  # where the batch's facts stand once written: later batches keep them
                    written = read_z(self.model, self.tokenizer, requests, z_read_module(self.model, self.hparams))
                    self.replay.hold(requests, written)
            except BaseException:
                if previous is not None:
                    self._set_factors(previous)
                else:
                    self._truncate(ranks)  # no copy on the normal path: only a failed append (or read) is rolled back
                raise
        except BaseException:
            for bookkeeping in self._bookkeeping():
                bookkeeping.discard()
            raise
        for bookkeeping in self._bookkeeping():
            bookkeeping.commit()
        rank = max(delta.rank for delta in deltas.values())
        return BatchResult(len(requests), time.perf_counter() - start, targets, rank)

    def _truncate(self, ranks: dict[str, int]) -> None:
        """Cut each layer whose rank grew back to ``ranks`` (copies of the kept columns only)."""
        a = self.adapter_name
        self._set_factors(
            {
                name: (
                    layer.delta_up[a][:, : ranks[name]].detach().clone(),
                    layer.delta_down[a][: ranks[name]].detach().clone(),
                )
                for name, layer in self.delta_layers().items()
                if layer.rank(a) != ranks[name]
            }
        )

    def _factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each edited layer's factors (up, down), copied."""
        return {
            name: (
                layer.delta_up[self.adapter_name].detach().clone(),
                layer.delta_down[self.adapter_name].detach().clone(),
            )
            for name, layer in self.delta_layers().items()
        }

    def _set_factors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make the named layers' factors exactly ``factors``."""
        layers = self.delta_layers()
        for name, (up, down) in factors.items():
            layers[name].replace_delta(self.adapter_name, up, down)

    def delta_layers(self) -> dict[str, DeltaLayer]:
        base = unwrap(self.model)
        return {b.ffn_out: base.get_submodule(b.ffn_out) for b in self.blocks}

    # ------------------------------------------------------------------------------------ SME protocol
    def edit(self, example: EditExample, edit_id: int) -> EditRecord:
        """One SME step: edit ``example`` (as a batch of one) only if the model gets it wrong."""
        if not example.subject:
            raise InvalidExampleError(
                f"PMET needs the subject of each example (the fact is written at its last token); {example.text!r} "
                "has none — use a benchmark with subjects (zsRE, CounterFact) or give EditExample.subject"
            )
        if not isinstance(example.target, str):
            raise InvalidExampleError("PMET edits text targets of causal language models")
        request = EditRequest(example.text, example.subject, example.target)
        before = score_pairs(self.model, self.task, [(example.text, example.target)])[0]
        if before.correct:
            return EditRecord(edit_id, needed=False, success=True)
        result = self.edit_batch([request])
        after = score_pairs(self.model, self.task, [(example.text, example.target)])[0]
        return EditRecord(
            edit_id,
            needed=True,
            success=after.correct,
            steps=result.targets.steps[0],
            seconds=result.seconds,
            mistakes=before.total_tokens - before.correct_tokens,
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self.delta_layers().items():
            tensors[f"{name}.up"] = layer.delta_up[self.adapter_name].detach().cpu().clone()
            tensors[f"{name}.down"] = layer.delta_down[self.adapter_name].detach().cpu().clone()
        for bookkeeping in self._bookkeeping():
            tensors.update(bookkeeping.state_tensors())
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.reset()
        for name, layer in self.delta_layers().items():
            layer.add_delta(self.adapter_name, tensors[f"{name}.up"], tensors[f"{name}.down"])
        for bookkeeping in self._bookkeeping():
            bookkeeping.load_state_tensors(tensors)

    def reset(self) -> None:
        for layer in self.delta_layers().values():
            layer.clear_delta(self.adapter_name)
        for bookkeeping in self._bookkeeping():
            bookkeeping.reset()

    def _bookkeeping(self) -> list[WrittenKeys | WrittenFacts]:
        """What the solves keep of earlier batches (the written keys, the written facts), where the settings ask."""
        return [b for b in (self.written, self.replay) if b is not None]
