"""``PatchTrainer``: fix one mistake by training new patch neurons, as Transformer-Patcher does (paper §4, App. B).

Per edit: find the wrong reads (at most ``max_patches``), add one patch per wrong read, then train only those
patches with

    L = L_edit + alc·L_act + mlc·L_mem

using Adam (lr 1e-2, weight decay 0.01), gradient clipping at 5 and a batch of the edit repeated 8 times. The patches
are then committed (frozen) and the edit's queries join the memory, so later patches stay silent on it.

How the patches start and when training stops are the two modes (``EditConfig.init`` / ``stop``):

- faithful (``paper`` / ``plateau``): key ``q/‖q‖²`` (pre-activation 1 on the mistake), bias 0, random value; checks
  on the official schedule, and once the edit is fixed, training stops when the validation memory loss plateaus.
- default (``solve`` / ``constraints``): each key is Fisher's discriminant between its query and the memory (whitened
  by the memory covariance), scaled and biased so the patch fires at ``act_margin + key_gap`` on its mistake while the
  highest memory row sits below the memory margin; the values are solved (least squares) for the FFN-output change
  that gives every read a ``solve_margin`` logit lead. Training, often zero steps of it, stops as soon as every read
  leads by ``edit_margin``, every patch fires above the activation margin and the memory constraints hold; it gives
  up after ``give_up_after`` steps without a better loss, and a failed edit's patches are dropped. The first answer
  token's threshold also rises above the edit's ``contrasts`` (its question asked of other subjects), a later answer
  token's above running text that ends in the token it reads at (``contexts``); later answer tokens fire only
  ``answer_gate`` of the way from the memory to the edit (docs/editing.md, rules 7-9).

Numerics: the loss is checked with one ``isfinite`` per step (the value is read for the record anyway), the patch
parameters once after training. A NaN/inf there, or in the base model's logits/queries at the edit, raises
:class:`~transformer_patcher.core.errors.NonFiniteError` and rolls the edit back: no patch is added, the memory banks
are not extended, the model's outputs are bit-identical to before. Patches are trained and stored in the adapter's
``patch_dtype`` (float32 by default, also on bf16/fp16 base models); the FFN query is cast to that dtype and the patch
output back to the FFN's dtype, and the edit loss is computed in float32. float16 patches are refused here (Adam
underflows in float16); bfloat16 ones train.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transformer_patcher.core.editor import EditRecord
from transformer_patcher.core.errors import NonFiniteError
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.modes import eval_mode, up_to
from transformer_patcher.core.tasks import Batch, Task
from transformer_patcher.data.neighbours import subject_of
from transformer_patcher.data.questions import subject_contrasts
from transformer_patcher.methods.patcher.config import EditConfig
from transformer_patcher.methods.patcher.contexts import TokenContexts
from transformer_patcher.methods.patcher.gate_traces import GateTraces
from transformer_patcher.methods.patcher.losses import activation_loss, memory_loss
from transformer_patcher.methods.patcher.memory import MemoryBank, answer_start_queries, question_formats
from transformer_patcher.methods.patcher.replay import ForwardReplay
from transformer_patcher.methods.patcher.subjects import SubjectIndex
from transformer_patcher.methods.patcher.views import EditViews
from transformer_patcher.tuners.patcher.gate import split_reads, subject_position
from transformer_patcher.tuners.patcher.keys import discriminant, init_key, preactivation, separating_scale
from transformer_patcher.tuners.patcher.layer import PatcherLayer
from transformer_patcher.tuners.patcher.schema import SPECS

_SILENCE_ABOVE = 0.9  # a memory row scoring this close to the query's 1 is projected out of the key ...
_SILENT_ROWS = 32  # ... with the other top rows scoring above half of it
_SOLVE_ROUNDS = 10  # Gauss-Newton rounds of the value solve at most; most edits need 2-4
_CLOSED = -1e4  # the pre-activation a memory row is given for a patch it cannot reach (exp() of it is 0)


@dataclass
class _Forward:
    logits: torch.Tensor  # (n_reads, classes)
    query: torch.Tensor | None  # (n_reads, d) FFN queries at the reads
    preactivations: torch.Tensor | None  # (n_reads, n_trainable)


@dataclass
class LossTerms:
    """The training loss and its named terms, plus what the stopping rules read off them."""

    total: torch.Tensor
    edit: torch.Tensor
    activation: torch.Tensor
    memory: torch.Tensor | None
    a_e: torch.Tensor  # (copies, n_patches): each patch's pre-activation on its own read
    memory_max: torch.Tensor | None  # (n_patches,): the highest memory pre-activation of each patch


class PatchTrainer:
    """Edits a PEFT-wrapped model (``get_patcher_model``) one example at a time."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: EditConfig | None = None,
        memory: MemoryBank | None = None,
        val_memory: MemoryBank | None = None,
        adapter_name: str = "default",
        contrasts: Callable[..., Sequence[str]] | None = None,
        contexts: TokenContexts | None = None,
        subjects: SubjectIndex | None = None,
        views: EditViews | None = None,
        asked_about: Callable[[str, str, int], Sequence[str]] = subject_contrasts,
    ) -> None:
        self.model = model
        self.asked_about = asked_about  # subject_key: (edit text, subject, count) -> other questions about it
        self.views = views  # key_views, causal LMs: the edit behind other words, its first answer token's key's LDA
        self.contrasts = contrasts  # mode default: the edit asked of other subjects, which its patch stays below
        self.contexts = contexts  # mode default: running text a later answer token's patch stays below
        self.subjects = subjects  # mode default: which contrast subjects are nearest to an edit's own
        self.task = task
        self.config = config or EditConfig()
        self.memory = memory
        if memory is None:
            warnings.warn(
                "PatchTrainer has no memory: nothing keeps the new patches silent on other inputs, so they may change "
                "unrelated answers; build one with build_trainer(...) or pass memory=",
                UserWarning,
                stacklevel=2,
            )
        self.val_memory = val_memory
        self.adapter = adapter_name
        self.layer: PatcherLayer = model.base_model.patch_layer(adapter_name)
        if self.layer.patch_keys[adapter_name].dtype == torch.float16:
            raise ValueError(
                "PatchTrainer cannot train float16 patches (patch_dtype='float16', or None on a float16 model): Adam's "
                "eps (1e-8) and squared gradients underflow in float16 and the loss turns NaN within a few steps. Use "
                "patch_dtype='float32' (the default; float32 patches on a float16 base model are fine) or 'bfloat16'"
            )
        activation = self.layer.patch_config[adapter_name].patch_activation
        self.beta, self.gamma = self.config.margins(activation)
        self.act_margin = self.config.activation_margin(activation)
        self.memory_weight = self.config.memory_weight(task.kind)
        self._replay = ForwardReplay(model, self.layer) if self.config.cache else None
        self._traces = GateTraces(self.layer.output_dim)  # per appended memory row, the gate reads of its edit's text
        self._local: tuple[torch.Tensor, torch.Tensor] | None = None  # subject_key: (patches, the rows bounding them)

    # ------------------------------------------------------------------------------------------ forwards
    def _forward(self, batch: Batch, replay: bool = False, record: bool = False) -> _Forward:
        """One forward pass read at the reads; ``record`` keeps it for replay (the one place a replay is recorded),
        ``replay`` recomputes only what the patches can change."""
        kwargs = batch.model_kwargs()
        with self.layer.capture(self.adapter) as capture:
            if record and self._replay is not None:
                output = self._replay.record(lambda: self.model(**kwargs))
            elif replay and self._replay is not None:
                with self._replay.replaying():
                    output = self.model(**kwargs)
            else:
                output = self.model(**kwargs)
        pre = capture.preactivations
        return _Forward(
            self.task.read_logits(output, batch),
            None if capture.query is None else self.task.at_reads(capture.query, batch),
            None if pre is None else self.task.at_reads(pre, batch),
        )

    def _batch(self, example: EditExample) -> Batch:
        return self.task.batch_for(self.model, [(example.text, example.target)])

    def check(self, example: EditExample) -> tuple[bool, int]:
        """(is the model right on ``example``, how many reads are wrong) — one forward pass, no gradients."""
        batch = self._batch(example)
        with torch.no_grad(), eval_mode(self.model):
            out = self._forward(batch)
        wrong = int((~self.task.correct(out.logits, batch.labels)).sum())
        return wrong == 0, wrong

    # ------------------------------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Committed patches plus the memory rows edits appended: all a resumable run needs to continue."""
        state = self.layer.committed(self.adapter)
        for prefix, bank in (("memory", self.memory), ("val_memory", self.val_memory)):
            if bank is not None:
                state[f"{prefix}.appended"] = bank.appended()
        if self.memory is not None:
            state.update(self._traces.state("memory.appended"))
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.layer.restore_committed({k: v for k, v in tensors.items() if k.startswith("patch_")}, self.adapter)
        for prefix, bank in (("memory", self.memory), ("val_memory", self.val_memory)):
            if bank is not None:
                bank.truncate_appended()
                if f"{prefix}.appended" in tensors:
                    bank.append(tensors[f"{prefix}.appended"])
        rows = self.memory.n_appended if self.memory is not None else 0
        # a checkpoint from before the traces: its edits' rows open every gate (they bound every key)
        self._traces = GateTraces.from_state(tensors, "memory.appended", rows, self.layer.output_dim)

    def reset(self) -> None:
        """Remove every patch of the adapter and forget the edits' memory rows."""
        # only the per-patch tensors: the gate frame, which describes the model, not an edit, is kept as it is
        committed = self.layer.committed(self.adapter)
        empty = {name: tensor[:0] for name, tensor in committed.items() if SPECS[name].per_row}
        self.load_state_tensors(empty)

    # ---------------------------------------------------------------------------------------------- edit
    def edit(self, example: EditExample, edit_id: int) -> EditRecord:
        """Fix ``example`` if the model gets it wrong. Invalid examples raise before anything changes."""
        started = time.perf_counter()
        single = self._batch(example)
        with eval_mode(self.model):
            return self._edit(edit_id, single, started, example)

    def _edit(self, edit_id: int, single: Batch, started: float, example: EditExample) -> EditRecord:
        cfg = self.config
        try:
            with torch.no_grad():
                first = self._forward(single, record=not cfg.dropout)
            _require_finite(first.logits, "the model's logits at the edit (before any patch was added)")
            wrong = (~self.task.correct(first.logits, single.labels)).nonzero().squeeze(1)
            if wrong.numel() == 0:
                return EditRecord(edit_id, needed=False, success=True, seconds=time.perf_counter() - started)
            reads = self._patched_reads(first.logits, single.labels, wrong)
            _require_finite(first.query, "the FFN queries at the edit (before any patch was added)")
            trace = self._gate_reads()  # taken now: the contrasts and views below run the gate block on other texts
            subject = self._subject_read(example, single, trace)
            opens = self._rows_opening(subject) if subject is not None and cfg.gated_edit_rows else None
            with ExitStack() as stack, torch.random.fork_rng(devices=[]):
                for bank in (self.memory, self.val_memory):
                    if bank is not None and opens is not None:
                        stack.enter_context(bank.skipping(_shut(bank, opens)))
                torch.manual_seed(cfg.seed * 1_000_003 + edit_id)
                if cfg.init == "solve":
                    contrasts = self._read_contrasts(example, single, reads, subject)
                    views = self._read_views(example, reads, gated=subject is not None)
                    about = self._subject_rows(example, subject) if cfg.subject_key and int(reads[0]) == 0 else None
                    reads, required = self._add_solved_patches(
                        first, single, reads, edit_id, contrasts, views, subject, about
                    )
                    success, steps, loss = (False, 0, None)  # no read can be patched locally: hopeless
                    if reads.numel():
                        success, steps, loss = self._train_to_constraints(single, reads, required)
                else:
                    self._add_patches(first.query[reads], edit_id, subject)
                    success, steps, loss = self._train(single, reads)
            if success or cfg.keep_failed:
                self.layer.commit(self.adapter)
            else:
                self.layer.discard(self.adapter)
            for bank in (self.memory, self.val_memory):
                if bank is not None:
                    bank.append(first.query)
            if self.memory is not None:
                self._traces.append(trace, single.cols)
            return EditRecord(
                edit_id,
                needed=True,
                success=success,
                steps=steps,
                seconds=time.perf_counter() - started,
                neurons=int(reads.numel()) if (success or cfg.keep_failed) else 0,
                mistakes=int(wrong.numel()),
                loss=loss,
            )
        except BaseException:
            self.layer.discard(self.adapter)
            raise
        finally:
            self._local = None

    def _patched_reads(self, logits: torch.Tensor, labels: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
        """The reads that get a patch, in order: the wrong ones (at most ``max_patches``) and, with ``weak_lead``
        (init="solve"), the right ones whose logit lead is under it, while ``max_patches`` leaves room. A later answer
        token the edit gets right by a hair gets none otherwise, and a rephrase flips it: on the zsRE dev stream 7 of
        30 wrong rephrases failed at such a read, six with a lead of 0.0-0.8 on the edit (docs/editing.md, rule 14)."""
        cap = self.config.max_patches
        reads = wrong[:cap]
        if self.config.init != "solve" or self.config.weak_lead <= 0:
            return reads
        margins = self.task.margins(logits, labels)
        weak = ((margins > 0) & (margins < self.config.weak_lead)).nonzero().squeeze(1)
        return torch.cat([reads, weak if cap is None else weak[: cap - len(reads)]]).sort().values

    def _subject_read(self, example: EditExample, single: Batch, reads: torch.Tensor | None) -> torch.Tensor | None:
        """What the subject gate of the edit's patches opens on, shape (k, hidden): of ``reads`` (:meth:`_gate_reads`
        of the edit's pass), the one at the last token of the edit's subject (``example.subject``, else the longest
        capitalised span of its text) in its prompt as the model reads it; then, with ``bare_subject``, the subject's
        read when a text opens with it (:meth:`_bare_read`) where there is one. None (ungated) without a gate, when no
        subject is found there, or when it is the text's first token, which names none."""
        subject = subject_of(example.text, example.subject)
        if reads is None or not subject:
            return None
        read = self._read_at_subject(single, reads, subject)
        if read is None:
            return None
        bare = self._bare_read(subject, example.target) if self.config.bare_subject else None
        return read[None] if bare is None else torch.stack([read, bare])

    def _read_at_subject(self, batch: Batch, reads: torch.Tensor, subject: str) -> torch.Tensor | None:
        """Of a one-text ``batch``'s gate ``reads``, the one at the last token of ``subject`` in its prompt; None when
        the prompt does not name it or its read is left out (the text's first token)."""
        if "input_ids" not in batch.inputs:
            return None
        prompt = batch.inputs["input_ids"][0, : int(batch.cols[0]) + 1].tolist()
        at = subject_position(self.task.tokenizer, prompt, subject)
        read = None if at is None else reads[at]
        return read if read is not None and bool(read.any()) else None

    def _bare_read(self, subject: str, target: Any) -> torch.Tensor | None:
        """The gate read of ``subject`` named alone in the task's prompt format (raw: at the text's start, with nothing
        before it): a rephrase that opens with its subject reads it so, unlike the edit, whose subject has words before
        it. None when the subject is the text's first token (left out: the attention sink)."""
        gate = self.layer.gate_reads(self.adapter)
        if gate is None:
            return None
        batch = self.task.batch_for(self.model, [(subject, target)])
        with torch.no_grad(), up_to(gate.block):
            self.model(**batch.model_kwargs())
        return self._read_at_subject(batch, gate.reads(self.layer.gate_frame(self.adapter))[0].clone(), subject)

    def _add_patches(self, queries: torch.Tensor, edit_id: int, subject: torch.Tensor | None = None) -> None:
        keys = torch.stack([init_key(q.float()) for q in queries])
        scale = float(self.layer.patch_config[self.adapter].init_value_scale)
        shape = (len(queries), self.layer.output_dim)
        v_prime = torch.randn(shape) if self.config.value_init == "normal" else torch.rand(shape)
        self.layer.add_patches(
            keys, torch.zeros(len(queries)), v_prime * scale, edit_id, self.adapter, *split_reads(subject)
        )

    def _read_contrasts(
        self, example: EditExample, single: Batch, reads: torch.Tensor, subject: torch.Tensor | None = None
    ) -> list[torch.Tensor | None]:
        """Per read, the queries its patch must stay below (n, d) or None: for the answer's first token the edit's
        contrasts (:meth:`_contrast_queries`), for a later one the running-text ``contexts`` of the token it reads
        at (:mod:`.contexts`). ``subject``: the patches' subject reads, when they are gated."""
        later = [int(r) for r in reads if int(r) > 0]
        at_later: list[torch.Tensor | None] = [None] * len(later)
        if later and self.contexts is not None and (self.config.gated_contexts or subject is None):
            ids = single.inputs["input_ids"][single.rows[later], single.cols[later]].tolist()
            at_later = self.contexts.queries(self.model, self.layer, ids, self.task.pad_id)
        contexts = iter(at_later)
        return [self._contrast_queries(example, subject) if int(r) == 0 else next(contexts) for r in reads]

    def _read_views(self, example: EditExample, reads: torch.Tensor, gated: bool = False) -> list[torch.Tensor | None]:
        """Per read, the edit's views there (n, d) (:mod:`.views`) or None: the first answer token's always (with
        views on); a later one's only behind a subject gate, which keeps its wider key away from running text."""
        if self.views is None or not self.config.key_views:
            return [None] * len(reads)
        found = self.views.queries(self.model, self.layer, self.task, example)
        return [found[int(r)] if int(r) == 0 or (gated and self.config.gated_views) else None for r in reads]

    def _contrast_texts(self, example: EditExample, gated: bool = False) -> list[str]:
        """The edit's question asked of other subjects (``contrasts``; the :attr:`subjects` nearest to its own
        first, ``config.nearest_contrasts`` of them), then the inputs it must keep (``example.keep``). A patch
        behind a subject gate (``gated``) skips the other subjects unless ``config.gated_contrasts``: the gate
        keeps them out."""
        texts: list[str] = []
        if self.contrasts is not None and (self.config.gated_contrasts or not gated):
            count = self.config.nearest_contrasts
            near = self.subjects.nearest(example.subject, count) if self.subjects and example.subject else []
            texts = list(self.contrasts(example, near) if near else self.contrasts(example))
        return texts + list(example.keep)

    def _contrast_queries(self, example: EditExample, subject: torch.Tensor | None = None) -> torch.Tensor | None:
        """FFN queries where the edit's contrasts (:meth:`_contrast_texts`) start their answer, shape (n, d); None
        when there are none. With views the key also reaches the edit in the other prompt formats, so the contrasts
        are asked in those too. Behind a subject gate (``subject``, the patches' read) only the contrasts that open
        it count: the others never meet the patch. A kept telephone question would otherwise hold the printing-press
        fix's threshold at 0.9 of its views key, sharp enough to miss both of that fix's rephrases."""
        rows = self._answer_starts(self._contrast_texts(example, subject is not None), example.target, subject)
        return rows if len(rows) else None

    def _answer_starts(self, texts: Sequence[str], target: Any, subject: torch.Tensor | None) -> torch.Tensor:
        """FFN queries where ``texts`` start their answer, (n, d), in every format the first answer token's key
        reaches (the task's, and with views the others); behind a gate (``subject``) only the texts that open it."""
        if not texts:
            return torch.zeros(0, self.layer.query_dim)
        formats = question_formats(self.task) if self.views is not None and self.config.key_views else []
        tasks = [self.task] + [self.task.formatted(fmt) for fmt in formats[1:]]
        return torch.cat(
            [answer_start_queries(self.model, self.layer, t, texts, target, self.adapter, subject) for t in tasks]
        )

    def _subject_rows(
        self, example: EditExample, subject: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``subject_key``: what a gated first answer token's key is told apart from, and what bounds it: (that many
        other questions about the edit's subject, from the package's templates, where their answer starts and the gate
        opens; the earlier edits' memory rows whose subject opens it, or whose subject is not known). None ungated
        or when the edit names no subject. Memory rows about other subjects never meet the patch: its gate is shut."""
        name = subject_of(example.text, example.subject)
        if subject is None or not name:
            return None
        asked = list(self.asked_about(example.text, name, self.config.subject_key))
        others = self._answer_starts(asked, example.target, subject)
        if self.memory is None:
            return others, torch.zeros(0, self.layer.query_dim)
        return others, self.memory.appended()[~_shut(self.memory, self._rows_opening(subject))]

    def _rows_opening(self, subject: torch.Tensor) -> torch.Tensor:
        """Per traced edit's row, whether a patch gated on ``subject`` (its subject reads) is open at that row's read,
        as the adapter's gate will be (:class:`GateTraces`)."""
        return self._traces.opening(subject, self.layer.patch_config[self.adapter].gate_threshold)

    def _gate_reads(self) -> torch.Tensor | None:
        """The gate reads (positions, dim) of the first text of the pass just run, or None without a gate."""
        gate = self.layer.gate_reads(self.adapter)
        if gate is None or gate.outputs is None:
            return None
        return gate.reads(self.layer.gate_frame(self.adapter))[0].clone()

    def _add_solved_patches(
        self,
        first: _Forward,
        single: Batch,
        reads: torch.Tensor,
        edit_id: int,
        contrasts: Sequence[torch.Tensor | None] = (),
        views: Sequence[torch.Tensor | None] = (),
        subject: torch.Tensor | None = None,
        about: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Separating keys and biases, then the values that solve the edit (module docstring, mode default). Returns
        the reads that got a patch (a read whose query the memory cannot be told apart from gets none) and the lead
        the stopping rule asks of them. ``contrasts``: per read, queries its patch must stay below (n, d) or None;
        ``views``: per read, the edit's other readings there (n, d) or None; ``subject``: the gate's
        subject reads (None: ungated); ``about``: the first read's :meth:`_subject_rows` (``subject_key``)."""
        queries = first.query.float()
        target = self.act_margin + self.config.key_gap
        keys, bias, local, bound = self._separating_keys(
            queries[reads], target, int(reads[0]) == 0, contrasts, views, about, gated=subject is not None
        )
        reads, keys, bias = reads[local], keys[local], bias[local]
        if reads.numel() == 0:
            return reads, self.config.edit_margin
        if bound is not None and bool(local[0]):  # the first read's patch: the memory loss reads its own rows
            self._local = (torch.arange(len(reads)) == 0, bound)
        activations = self.layer.activation(self.adapter)(preactivation(queries, keys, bias))  # (n_reads, n_patches)
        offsets, required = self._target_offsets(single, reads, queries.norm(dim=1))
        gram = activations.T @ activations
        gram += 1e-4 * gram.diagonal().mean() * torch.eye(len(reads))
        values = torch.linalg.solve(gram, activations.T @ offsets)
        self.layer.add_patches(keys, bias, values, edit_id, self.adapter, *split_reads(subject))
        return reads, required

    def _separating_keys(
        self,
        queries: torch.Tensor,
        target: float,
        first_read: bool = True,
        contrasts: Sequence[torch.Tensor | None] = (),
        views: Sequence[torch.Tensor | None] = (),
        about: tuple[torch.Tensor, torch.Tensor] | None = None,
        gated: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys/biases firing at ``target`` on their query and below the memory margin on every memory row, and
        which queries can have one. A query that some memory rows resemble (score above 0.9 along its discriminant)
        gets a key orthogonal to them; one that memory rows still outscore by more than the sharpest key allows
        gets none (:func:`separating_scale`). Each query's threshold also rises above its ``contrasts`` rows (n, d)
        (:meth:`_contrast_threshold`): the patch then fires only on inputs closer to the edit than those. The queries
        after the first (all of them when ``first_read`` is False) are later answer tokens, whose context already
        holds the start of the edit's answer: their threshold sits ``answer_gate`` (``gated_answer_gate`` behind a
        subject gate, ``gated``) of the way from the top memory or contrast row to the edit. ``views``: per query,
        its other readings (n, d) or None, which its key is the two-class LDA over (:func:`discriminant`); a query
        without keeps the one-query key. ``about``: the first read's :meth:`_subject_rows`, which then key and bound
        it (:meth:`_subject_key`). Also returns the rows that bound that patch in place of the memory, or None."""
        bank = self.memory
        if bank is None or len(bank) < 2:
            keys = torch.stack([init_key(q, target) for q in queries])
            return keys, torch.zeros(len(queries)), torch.ones(len(queries), dtype=torch.bool), None
        mean, precision = bank.statistics(self.config.whiten_ridge, self.config.whiten_edit_rows)
        scatter = self.config.view_scatter

        def key_direction(i: int, silent: torch.Tensor | None = None) -> torch.Tensor:
            return discriminant(queries[i], mean, precision, silent, views[i] if views else None, scatter)

        directions = torch.stack([key_direction(i) for i in range(len(queries))])
        t_max = bank.max_score(directions) - directions @ mean
        for i in (t_max > _SILENCE_ABOVE).nonzero().flatten().tolist():  # a memory row looks like this query
            rows, scores = bank.top_rows(directions[i], _SILENT_ROWS)
            silent = rows[scores - directions[i] @ mean > _SILENCE_ABOVE / 2]
            try:
                direction = key_direction(i, silent)
            except ValueError:  # the query is a combination of those rows
                continue
            projected = bank.max_score(direction[None])[0] - direction @ mean
            if projected < t_max[i]:  # kept only if it separates better (other rows may now score higher)
                directions[i], t_max[i] = direction, projected
        for i, rows in enumerate(contrasts):
            if rows is not None:
                t_max[i] = max(float(t_max[i]), self._contrast_threshold(rows @ directions[i] - directions[i] @ mean))
        bound = None
        if about is not None and first_read:
            kept = contrasts[0] if contrasts and contrasts[0] is not None else torch.zeros(0, len(mean))
            found = self._subject_key(queries[0], directions[0], views[0] if views else None, about, kept)
            if found is not None:
                directions[0], t_max[0], bound = found
        ceiling = min(self.beta, target - self.gamma)
        gate = self.config.gated_answer_gate if gated else self.config.answer_gate
        later = max(1.0, target * gate / (1 - gate) + ceiling)  # the slack that puts pre-activation 0 there
        found = [
            (separating_scale(float(t), target, ceiling, later) if i or not first_read else None)
            or separating_scale(float(t), target, ceiling)
            for i, t in enumerate(t_max)
        ]
        scales = torch.tensor([1.0 if s is None else s for s in found])
        keys = scales[:, None] * directions
        local = torch.tensor([s is not None for s in found])
        return keys, target - scales * (1.0 + directions @ mean), local, bound

    def _subject_key(
        self,
        query: torch.Tensor,
        direction: torch.Tensor,
        views: torch.Tensor | None,
        about: tuple[torch.Tensor, torch.Tensor],
        kept: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``subject_key``: behind its gate a first answer token's patch only meets text that names its subject, so
        its key tells the edit (and its views) from other questions about that subject (``about[0]``), the LDA of
        :func:`discriminant` with them as the other class, instead of from the memory. Those scoring 0.9 of the edit
        along the views key (``direction``) likely ask the same thing and are left out. The threshold sits
        ``contrast_spread`` deviations over them, and over the earlier edits' rows that open the gate (``about[1]``)
        and the kept prompts (``kept``), which are projected out where they score 0.9 of the edit. Returns the
        direction, its threshold and the rows that bound it; None (the views key stays) with fewer than two such
        questions or when one of them scores 0.9 of the edit along the new key as well."""
        mean, precision = self.memory.statistics(self.config.whiten_ridge, self.config.whiten_edit_rows)
        others, earlier = about
        others = others[(others - mean) @ direction < _SILENCE_ABOVE]
        if len(others) < 2:
            return None
        rows = torch.cat([earlier, kept])
        scatter = self.config.view_scatter
        key = discriminant(query, mean, precision, None, views, scatter, contrasts=others)
        silent = rows[(rows - mean) @ key > _SILENCE_ABOVE]
        if len(silent):
            try:
                key = discriminant(query, mean, precision, silent, views, scatter, contrasts=others)
            except ValueError:  # the edit is a combination of those rows: no key tells them apart
                return None
        threshold = self._contrast_threshold((others - mean) @ key)
        if threshold == -math.inf:  # one of them scores like the edit along this key too: keep the views key
            return None
        if len(rows):
            threshold = max(threshold, float(((rows - mean) @ key).max()))
        return key, torch.tensor(threshold), torch.cat([others, rows])

    def _contrast_threshold(self, scores: torch.Tensor) -> float:
        """Where a patch's threshold goes over contrast ``scores`` (the edit at 1): ``contrast_spread`` standard
        deviations above the highest, at most 0.9; -inf (no constraint) when the highest is already past 0.9.
        A handful of contrasts samples their population: on 95 dev edits, 6.3 % of 64 held-out contrasts fired
        above the highest of 8, 2.7 % above it plus half a standard deviation."""
        top = float(scores.max())
        if top >= _SILENCE_ABOVE:
            return -math.inf
        spread = float(scores.std()) if len(scores) > 1 else 0.0
        return min(top + self.config.contrast_spread * spread, _SILENCE_ABOVE)

    def _target_offsets(
        self, single: Batch, reads: torch.Tensor, query_norms: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """FFN-output changes at the reads (n_reads, d) that give each patched read a ``solve_margin`` logit lead
        (the other reads keep theirs: zero change). Gauss-Newton on each read's margin, aiming 10 % past it, one
        replayed forward and backward per round; a step grows the offset at most 5-fold, and rounds stop when the
        shortfalls stop shrinking for two rounds (a classifier's logits saturate); the best round is kept. Also returns
        the lead the stopping rule asks for: ``edit_margin``, or half the lead the solve reached when that is less."""
        margin = self.config.solve_margin
        offsets = torch.zeros(single.rows.numel(), self.layer.output_dim)
        patched = torch.zeros(single.rows.numel(), dtype=torch.bool)
        patched[reads] = True
        best, best_short, reached, stale = offsets, math.inf, -math.inf, 0
        for _ in range(_SOLVE_ROUNDS):
            offsets.requires_grad_(True)
            margins = self.task.margins(self._offset_logits(single, offsets), single.labels)
            short = torch.where(patched, 1.1 * margin - margins.detach(), 0.0).clamp(min=0)
            if float(short.sum()) < 0.99 * best_short:
                best, best_short, reached, stale = (
                    offsets.detach(),
                    float(short.sum()),
                    float(margins.detach()[reads].min()),
                    0,
                )
            else:
                stale += 1
            if stale == 2 or not bool((short > 0.1 * margin).any()):
                break
            (grad,) = torch.autograd.grad(margins[short > 0].sum(), offsets)
            with torch.no_grad():
                step = grad * (short / grad.pow(2).sum(1).clamp_min(1e-12))[:, None]
                room = 4 * torch.maximum(offsets.norm(dim=1), query_norms)  # the first step: 4x the FFN query
                step *= (room / step.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None]
                offsets = offsets.detach() + step
        return best, min(self.config.edit_margin, max(reached / 2, 0.0))

    def _offset_logits(self, batch: Batch, offsets: torch.Tensor) -> torch.Tensor:
        """Read logits of a replayed forward pass with ``offsets`` added to the patched FFN's output at the reads."""

        def add(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            shaped = output.reshape(batch.size, -1, output.shape[-1])
            added = torch.zeros_like(shaped).index_put((batch.rows, batch.cols), offsets.to(shaped.dtype))
            return (shaped + added).reshape(output.shape)

        handle = self.layer.register_forward_hook(add)
        try:
            return self._forward(batch, replay=True).logits
        finally:
            handle.remove()

    def _optimizer(self, params: list[nn.Parameter]) -> tuple[torch.optim.Adam, Any]:
        """The official optimiser: Adam with L2 weight decay, the learning rate halved on a plateau of the edit loss."""
        cfg = self.config
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, threshold=cfg.lr_threshold
        )
        return optimizer, scheduler

    def _params(self) -> list[nn.Parameter]:
        params = [getattr(self.layer, name)[self.adapter] for name in self.layer.adapter_layer_names]
        for p in params:
            p.requires_grad_(True)
        return params

    def _edit_activations(self, pre: torch.Tensor, reads: torch.Tensor, n_reads: int, copies: int) -> torch.Tensor:
        """a_e of shape (copies, n_patches): patch i's pre-activation at its own read in each copy."""
        index = torch.arange(copies)[:, None] * n_reads + reads[None, :]
        return pre[index, torch.arange(len(reads))[None, :]]

    def _memory_term(self, bank: MemoryBank | None, a_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(memory loss, each patch's highest memory pre-activation) over the rows its top-k can touch."""
        if bank is None or len(bank) == 0:
            return None
        keys, bias = self.layer.patch_keys[self.adapter], self.layer.patch_bias[self.adapter]
        index = bank.candidates(keys, bias, self.config.memory_top_k)
        rows = bank.rows(index).to(device=keys.device, dtype=keys.dtype)
        a_mem = preactivation(rows, keys, bias)
        if self._local is not None:  # subject_key: its patch meets its own rows instead of the memory
            patches, bound = self._local
            a_own = preactivation(bound.to(device=keys.device, dtype=keys.dtype), keys, bias)
            a_mem = torch.cat([a_mem.masked_fill(patches, _CLOSED), a_own.masked_fill(~patches, _CLOSED)])
        return memory_loss(a_mem, a_e, self.config.memory_top_k, self.gamma, self.beta), a_mem.detach().amax(0)

    def _loss_terms(
        self, out: _Forward, batch: Batch, reads: torch.Tensor, n_reads: int, memory: MemoryBank | None
    ) -> LossTerms:
        """The one place the loss is built: ``edit + alc·act (+ mlc·mem)``, the memory term over ``memory``."""
        cfg = self.config
        copies = batch.size
        a_e = self._edit_activations(out.preactivations, reads, n_reads, copies)
        if copies == 1:  # identical copies (no dropout): the official repeated batch, without recomputing it
            a_e = a_e.expand(cfg.repeats, -1)
        edit = self.task.edit_loss(out.logits, batch.labels)
        act = activation_loss(a_e, cfg.act_top_k, self.act_margin)
        total = edit + cfg.act_loss_weight * act
        term = self._memory_term(memory, a_e)
        mem, mem_max = term if term is not None else (None, None)
        if mem is not None:
            total = total + self.memory_weight * mem
        return LossTerms(total, edit, act, mem, a_e, mem_max)

    def _train(self, single: Batch, reads: torch.Tensor) -> tuple[bool, int, float | None]:
        cfg = self.config
        n_reads = single.rows.numel()
        identical = not cfg.dropout and cfg.cache
        batch = single if identical else self.task.repeat(single, cfg.repeats)
        if not identical and self._replay is not None:
            with torch.no_grad():
                self._forward(batch, record=True)
        params = self._params()
        optimizer, scheduler = self._optimizer(params)
        val_losses: list[float] = []
        fixed, loss_value, step = False, None, 0
        self.model.train(cfg.dropout)
        for step in range(1, cfg.max_steps + 1):
            terms = self._loss_terms(self._forward(batch, replay=True), batch, reads, n_reads, self.memory)
            loss_value = self._descend(terms, step, params, optimizer)
            lr_due, check_due = step % cfg.lr_every == 0, step % cfg.check_every == 0 and step > cfg.start_val_step
            if not (lr_due or check_due):
                continue
            fixed, val_edit, val_a_e = self._validate(batch, reads, n_reads)
            if lr_due:
                scheduler.step(val_edit)
            if not check_due or not fixed:
                continue
            if not cfg.use_validation:
                break
            with torch.no_grad():
                val_mem = self._memory_term(self.val_memory or self.memory, val_a_e)
            if val_mem is None:
                break
            val_losses.append(float(val_mem[0]))
            if _plateaued(val_losses, cfg.early_threshold, cfg.early_patience):
                break
        else:
            fixed = self._validate(batch, reads, n_reads)[0]
        self._require_finite_patches(params, step)
        return fixed, step, loss_value

    def _train_to_constraints(
        self, single: Batch, reads: torch.Tensor, required: float
    ) -> tuple[bool, int, float | None]:
        """Mode default: step 0 checks the solved patches; each step's own forward pass is its check, so a step
        costs one replayed forward and backward. Gives up after ``give_up_after`` steps without a 1 % better loss,
        or at ``max_steps``; then the edit keeps the lowest-loss patches that got it right, if any step did (the
        memory constraints are not all met, as the faithful mode's plateau does not guarantee them either)."""
        cfg = self.config
        n_reads = single.rows.numel()
        params = self._params()
        optimizer, scheduler = self._optimizer(params)
        best, best_step = math.inf, 0
        right: tuple[float, list[torch.Tensor]] | None = None  # (loss, patch tensors) of the best right state
        for step in range(cfg.max_steps + 1):
            out = self._forward(single, replay=True)
            terms = self._loss_terms(out, single, reads, n_reads, self.memory)
            if self._holds(out, single, reads, terms, required):
                break
            loss_value = float(terms.total.detach())
            is_right = bool(self.task.correct(out.logits, single.labels).all())
            if is_right and (right is None or loss_value < right[0]):
                right = (loss_value, [p.detach().clone() for p in params])
            stalled = cfg.give_up_after is not None and step - best_step >= cfg.give_up_after
            if step == cfg.max_steps or stalled:
                if not is_right and right is not None:
                    with torch.no_grad():
                        for param, saved in zip(params, right[1], strict=True):
                            param.copy_(saved)
                    self._require_finite_patches(params, step)
                    return True, step, right[0]
                break
            self._descend(terms, step, params, optimizer)
            if best == math.inf or loss_value < best - 0.01 * abs(best):
                best, best_step = loss_value, step
            if step and step % cfg.lr_every == 0:
                scheduler.step(float(terms.edit.detach()))
        self._require_finite_patches(params, step)
        return bool(self.task.correct(out.logits, single.labels).all()), step, float(terms.total.detach())

    def _holds(self, out: _Forward, batch: Batch, reads: torch.Tensor, terms: LossTerms, required: float) -> bool:
        """Every read is right and each patched one leads by ``required``, every patch fires above the activation
        margin, and each patch's highest memory pre-activation is below both beta and its edit activation minus
        gamma."""
        margins = self.task.margins(out.logits.detach(), batch.labels)
        if not bool((margins > 0).all()) or not bool((margins[reads] >= required).all()):
            return False
        a_e = terms.a_e.detach()[0]
        if not bool((a_e >= self.act_margin).all()):
            return False
        return terms.memory_max is None or bool(
            (terms.memory_max <= torch.clamp(a_e - self.gamma, max=self.beta)).all()
        )

    def _descend(
        self, terms: LossTerms, step: int, params: list[nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> float:
        """One optimiser step on ``terms.total``; returns the loss, refusing a non-finite one."""
        loss_value = float(terms.total.detach())  # the one sync per step; it also checks the loss is finite
        if not math.isfinite(loss_value):
            memory = None if terms.memory is None else float(terms.memory.detach())
            raise NonFiniteError(
                f"the edit's training loss became {loss_value} at step {step} (edit {float(terms.edit.detach())}, "
                f"activation {float(terms.activation.detach())}, memory {memory}); the edit was rolled back"
            )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        optimizer.step()
        return loss_value

    def _require_finite_patches(self, params: list[nn.Parameter], step: int) -> None:
        for name, param in zip(self.layer.adapter_layer_names, params, strict=True):
            _require_finite(param.detach(), f"the trained patch tensor {name!r} after step {step}")

    def _validate(self, batch: Batch, reads: torch.Tensor, n_reads: int) -> tuple[bool, float, torch.Tensor]:
        """Eval-mode check of the edit (dropout off): fixed?, edit loss, and a_e for the validation memory loss."""
        with torch.no_grad(), eval_mode(self.model):
            out = self._forward(batch, replay=True)
            terms = self._loss_terms(out, batch, reads, n_reads, None)
        fixed = bool(self.task.correct(out.logits, batch.labels).all())
        edit, a_e = terms.edit, terms.a_e
        edit_value = float(edit)
        if not math.isfinite(edit_value):
            raise NonFiniteError(f"the edit's validation loss became {edit_value}; the edit was rolled back")
        return fixed, edit_value, a_e


def _shut(bank: MemoryBank, opens: torch.Tensor) -> torch.Tensor:
    """Per edit's row in ``bank``, whether the gate is shut there, from ``opens`` (its last rows, the traced ones):
    rows appended without a trace (a session's earlier edits, an older checkpoint's) count as open."""
    return torch.cat([torch.zeros(bank.n_appended - len(opens), dtype=torch.bool), ~opens])


def _require_finite(tensor: torch.Tensor | None, what: str) -> None:
    if tensor is not None and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} contains NaN or inf; the edit was rolled back and nothing changed")


def _plateaued(losses: list[float], threshold: float, patience: int) -> bool:
    """The official early stop: no improvement larger than ``threshold`` for ``patience`` checks."""
    best = 0
    for i, value in enumerate(losses):
        if value < losses[best] - threshold:
            best = i
    return best < len(losses) - patience
