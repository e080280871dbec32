"""Fine-tuning baselines of the paper (App. B): FT(last), FT(all), FT(last)+KL and FT(all)+KL.

Adam with lr 1e-5 on the edit loss until the example is corrected (bounded by ``max_steps``). The +KL variants add
KL(original ‖ edited) on the task's reads of a memory batch (512 examples in the paper), sampled once per edit; the
original outputs come from the saved original weights through ``torch.func.functional_call``, so no second model
copy is kept. "last" tunes the transformer block that holds the last FFN — the block Transformer-Patcher patches.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from transformer_patcher.core.editor import EditRecord
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.modes import eval_mode
from transformer_patcher.core.tasks import Batch, Task
from transformer_patcher.core.validation import check_bool, check_int, check_number
from transformer_patcher.tuners.architectures import resolve_patch_target


@dataclass
class FineTuneConfig:
    scope: str = "last"  # "last" (the block holding the last FFN) or "all"
    kl: bool = False
    lr: float = 1e-5
    max_steps: int = 100
    kl_batch: int = 512
    kl_weight: float = 1.0
    seed: int = 42

    def __post_init__(self) -> None:
        if self.scope not in ("last", "all"):
            raise ValueError(f"scope must be 'last' or 'all', got {self.scope!r}")
        check_bool("FineTuneConfig.kl", self.kl)
        check_number("FineTuneConfig.lr", self.lr, 0.0, strict=True)
        check_number("FineTuneConfig.kl_weight", self.kl_weight, 0.0)
        check_int("FineTuneConfig.max_steps", self.max_steps, minimum=1)
        check_int("FineTuneConfig.kl_batch", self.kl_batch, minimum=1)
        check_int("FineTuneConfig.seed", self.seed, minimum=0)

    @property
    def name(self) -> str:
        return f"FT({self.scope})" + ("+KL" if self.kl else "")


class FineTuneEditor:
    """Edits by fine-tuning weights in place; ``reset`` restores the original weights."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: FineTuneConfig | None = None,
        memory_pairs: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.model = model
        self.task = task
        self.config = config or FineTuneConfig()
        if self.config.kl and not memory_pairs:
            raise ValueError(f"{self.config.name} needs memory_pairs for its KL term")
        self.memory_pairs = list(memory_pairs)
        prefix = self._last_block(model) if self.config.scope == "last" else ""
        self.params = {n: p for n, p in model.named_parameters() if n.startswith(prefix)}
        for name, param in model.named_parameters():
            param.requires_grad_(name in self.params)
        self._original = {n: p.detach().clone() for n, p in self.params.items()}

    @staticmethod
    def _last_block(model: nn.Module) -> str:
        target = resolve_patch_target(model)
        marker = f".{target.layer}."
        if target.layer is None or marker not in target.value_module:
            raise ValueError(f"cannot find the block of '{target.value_module}'; use scope='all'")
        return target.value_module.split(marker)[0] + marker

    def _read(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        kwargs = batch.model_kwargs()
        output = self.model(**kwargs) if params is None else functional_call(self.model, params, (), kwargs)
        return self.task.read_logits(output, batch)

    def edit(self, example: EditExample, edit_id: int) -> EditRecord:
        """Fine-tune until ``example`` is right (dropout off; every module's mode is restored afterwards)."""
        started = time.perf_counter()
        batch = self.task.batch_for(self.model, [(example.text, example.target)])
        with eval_mode(self.model):
            return self._edit(batch, edit_id, started)

    def _edit(self, batch: Batch, edit_id: int, started: float) -> EditRecord:
        cfg = self.config
        with torch.no_grad():
            wrong = int((~self.task.correct(self._read(batch), batch.labels)).sum())
        if wrong == 0:
            return EditRecord(edit_id, needed=False, success=True, seconds=time.perf_counter() - started)
        kl_batch, reference = None, None
        if cfg.kl:
            rng = random.Random(cfg.seed * 1_000_003 + edit_id)
            sample = rng.sample(self.memory_pairs, min(cfg.kl_batch, len(self.memory_pairs)))
            kl_batch = self.task.batch_for(self.model, sample)
            with torch.no_grad():
                original = {**dict(self.model.named_parameters()), **self._original}
                reference = F.log_softmax(self._read(kl_batch, original).float(), -1)
        optimizer = torch.optim.Adam(list(self.params.values()), lr=cfg.lr)
        fixed, step = False, 0
        for step in range(1, cfg.max_steps + 1):
            logits = self._read(batch)
            fixed = bool(self.task.correct(logits, batch.labels).all())
            if fixed:
                step -= 1
                break
            loss = self.task.edit_loss(logits, batch.labels)
            if kl_batch is not None:
                current = F.log_softmax(self._read(kl_batch).float(), -1)
                loss = loss + cfg.kl_weight * F.kl_div(current, reference, log_target=True, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                fixed = bool(self.task.correct(self._read(batch), batch.labels).all())
        return EditRecord(
            edit_id, needed=True, success=fixed, steps=step, seconds=time.perf_counter() - started, mistakes=wrong
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().cpu().clone() for name, param in self.params.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.params):
            raise ValueError("the checkpoint does not hold the weights this fine-tuning editor tunes")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[name])

    def reset(self) -> None:
        self.load_state_tensors(self._original)
