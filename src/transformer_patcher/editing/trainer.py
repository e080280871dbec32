"""``PatchTrainer``: fix one mistake by training new patch neurons, as Transformer-Patcher does (paper §4, App. B).

Per edit: find the wrong reads (at most ``max_patches``), add one patch per wrong read with key ``q/‖q‖²`` (it fires
with pre-activation 1 on its mistake) and value ``v'⊙a``, then train only those patches with

    L = L_edit + alc·L_act + mlc·L_mem

using Adam (lr 1e-2, weight decay 0.01), gradient clipping at 5 and a batch of the edit repeated 8 times. Checks run
on the official schedule; once the edit is fixed, training stops when the validation memory loss stops improving.
The patches are then committed (frozen) and the edit's queries join the memory, so later patches stay silent on it.

Numerics: the loss is checked with one ``isfinite`` per step (the value is read for the record anyway), the patch
parameters once after training. A NaN/inf there, or in the base model's logits/queries at the edit, raises
:class:`~transformer_patcher.errors.NonFiniteError` and rolls the edit back: no patch is added, the memory banks are not
extended, the model's outputs are bit-identical to before. Patches are trained and stored in the adapter's
``patch_dtype`` (float32 by default, also on bf16/fp16 base models); the FFN query is cast to that dtype and the patch
output back to the FFN's dtype, and the edit loss is computed in float32. float16 patches are refused here (Adam
underflows in float16); bfloat16 ones train.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..adapter.keys import init_key
from ..adapter.layer import PatcherLayer
from ..errors import NonFiniteError
from .config import EditConfig
from .losses import activation_loss, memory_loss
from .memory import MemoryBank
from .modes import eval_mode
from .replay import ForwardReplay
from .tasks import Batch, EditExample, Task


@dataclass
class EditRecord:
    """What happened to one example of the stream. ``edit_id`` ties it to the neurons it created."""

    edit_id: int
    needed: bool  # the model was wrong before the edit
    success: bool  # the model is right after the edit (True when no edit was needed)
    steps: int = 0
    seconds: float = 0.0
    neurons: int = 0
    mistakes: int = 0  # wrong reads before the edit (tokens for generation)
    loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Forward:
    logits: torch.Tensor  # (n_reads, classes)
    query: torch.Tensor | None  # (n_reads, d) FFN queries at the reads
    preactivations: torch.Tensor | None  # (n_reads, n_trainable)


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
    ) -> None:
        self.model = model
        self.task = task
        self.config = config or EditConfig()
        self.memory = memory
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

    # ------------------------------------------------------------------------------------------ forwards
    def _forward(self, batch: Batch, replay: bool = False, record: bool = False) -> _Forward:
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
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.layer.restore_committed({k: v for k, v in tensors.items() if k.startswith("patch_")}, self.adapter)
        for prefix, bank in (("memory", self.memory), ("val_memory", self.val_memory)):
            if bank is not None:
                bank.truncate_appended()
                if f"{prefix}.appended" in tensors:
                    bank.append(tensors[f"{prefix}.appended"])

    def reset(self) -> None:
        """Remove every patch of the adapter and forget the edits' memory rows."""
        empty = {name: tensor[:0] for name, tensor in self.layer.committed(self.adapter).items()}
        self.load_state_tensors(empty)

    # ---------------------------------------------------------------------------------------------- edit
    def edit(self, example: EditExample, edit_id: int) -> EditRecord:
        """Fix ``example`` if the model gets it wrong. Invalid examples raise before anything changes."""
        started = time.perf_counter()
        single = self._batch(example)
        with eval_mode(self.model):
            return self._edit(edit_id, single, started)

    def _edit(self, edit_id: int, single: Batch, started: float) -> EditRecord:
        cfg = self.config
        try:
            with torch.no_grad():
                first = self._forward(single, record=not cfg.dropout)
            _require_finite(first.logits, "the model's logits at the edit (before any patch was added)")
            wrong = (~self.task.correct(first.logits, single.labels)).nonzero().squeeze(1)
            if wrong.numel() == 0:
                return EditRecord(edit_id, needed=False, success=True, seconds=time.perf_counter() - started)
            reads = wrong[: cfg.max_patches]
            _require_finite(first.query, "the FFN queries at the edit (before any patch was added)")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed * 1_000_003 + edit_id)
                self._add_patches(first.query[reads], edit_id)
                success, steps, loss = self._train(single, reads)
            if success or cfg.keep_failed:
                self.layer.commit(self.adapter)
            else:
                self.layer.discard(self.adapter)
            for bank in (self.memory, self.val_memory):
                if bank is not None:
                    bank.append(first.query)
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

    def _add_patches(self, queries: torch.Tensor, edit_id: int) -> None:
        keys = torch.stack([init_key(q.float()) for q in queries])
        scale = float(self.layer.patch_config[self.adapter].init_value_scale)
        shape = (len(queries), self.layer.output_dim)
        v_prime = torch.randn(shape) if self.config.value_init == "normal" else torch.rand(shape)
        self.layer.add_patches(keys, torch.zeros(len(queries)), v_prime * scale, edit_id, self.adapter)

    def _params(self) -> list[nn.Parameter]:
        params = [getattr(self.layer, name)[self.adapter] for name in self.layer.adapter_layer_names]
        for p in params:
            p.requires_grad_(True)
        return params

    def _edit_activations(self, pre: torch.Tensor, reads: torch.Tensor, n_reads: int, copies: int) -> torch.Tensor:
        """a_e of shape (copies, n_patches): patch i's pre-activation at its own read in each copy."""
        index = torch.arange(copies)[:, None] * n_reads + reads[None, :]
        return pre[index, torch.arange(len(reads))[None, :]]

    def _memory_term(self, bank: MemoryBank | None, a_e: torch.Tensor) -> torch.Tensor | None:
        if bank is None or len(bank) == 0:
            return None
        keys, bias = self.layer.patch_keys[self.adapter], self.layer.patch_bias[self.adapter]
        index = bank.candidates(keys, bias, self.config.memory_top_k)
        rows = bank.rows(index).to(device=keys.device, dtype=keys.dtype)
        a_mem = rows @ keys.T + bias
        return memory_loss(a_mem, a_e, self.config.memory_top_k, self.gamma, self.beta)

    def _losses(self, out: _Forward, batch: Batch, reads: torch.Tensor, n_reads: int) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        copies = batch.size
        a_e = self._edit_activations(out.preactivations, reads, n_reads, copies)
        if copies == 1:  # identical copies (no dropout): the official repeated batch, without recomputing it
            a_e = a_e.expand(cfg.repeats, -1)
        edit = self.task.edit_loss(out.logits, batch.labels)
        act = activation_loss(a_e, cfg.act_top_k, self.act_margin)
        return edit, act, a_e

    def _train(self, single: Batch, reads: torch.Tensor) -> tuple[bool, int, float | None]:
        cfg = self.config
        n_reads = single.rows.numel()
        identical = not cfg.dropout and cfg.cache
        batch = single if identical else self.task.repeat(single, cfg.repeats)
        if not identical and self._replay is not None:
            with torch.no_grad():
                self._forward(batch, record=True)
        params = self._params()
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, threshold=cfg.lr_threshold
        )
        val_losses: list[float] = []
        fixed, loss_value, step = False, None, 0
        self.model.train(cfg.dropout)
        for step in range(1, cfg.max_steps + 1):
            out = self._forward(batch, replay=True)
            edit, act, a_e = self._losses(out, batch, reads, n_reads)
            loss = edit + cfg.act_loss_weight * act
            mem = self._memory_term(self.memory, a_e)
            if mem is not None:
                loss = loss + self.memory_weight * mem
            loss_value = float(loss.detach())  # the one sync per step; it also checks the loss is finite
            if not math.isfinite(loss_value):
                raise NonFiniteError(
                    f"the edit's training loss became {loss_value} at step {step} (edit {float(edit.detach())}, "
                    f"activation {float(act.detach())}, memory {None if mem is None else float(mem.detach())}); "
                    "the edit was rolled back"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
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
            val_losses.append(float(val_mem))
            if _plateaued(val_losses, cfg.early_threshold, cfg.early_patience):
                break
        else:
            fixed = self._validate(batch, reads, n_reads)[0]
        for name, param in zip(self.layer.adapter_layer_names, params, strict=True):
            _require_finite(param.detach(), f"the trained patch tensor {name!r} after step {step}")
        return fixed, step, loss_value

    def _validate(self, batch: Batch, reads: torch.Tensor, n_reads: int) -> tuple[bool, float, torch.Tensor]:
        """Eval-mode check of the edit (dropout off): fixed?, edit loss, and a_e for the validation memory loss."""
        with torch.no_grad(), eval_mode(self.model):
            out = self._forward(batch, replay=True)
            edit, _, a_e = self._losses(out, batch, reads, n_reads)
        fixed = bool(self.task.correct(out.logits, batch.labels).all())
        edit_value = float(edit)
        if not math.isfinite(edit_value):
            raise NonFiniteError(f"the edit's validation loss became {edit_value}; the edit was rolled back")
        return fixed, edit_value, a_e


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
