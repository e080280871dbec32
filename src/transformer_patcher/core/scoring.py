"""Score a model on (input, target) pairs in batches: what the SME metrics are computed from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transformer_patcher.core.modes import eval_mode
from transformer_patcher.core.tasks import Task


@dataclass(frozen=True)
class Outcome:
    """One scored pair. For generation ``prediction`` is the teacher-forced argmax answer, which greedy decoding
    reproduces exactly when ``correct`` (every target token is the argmax given the correct prefix)."""

    correct: bool
    prediction: str
    reference: str
    correct_tokens: int
    total_tokens: int
    log_prob: float = 0.0  # mean log-probability of the target's tokens (the label's, for classification)
    predicted_ids: tuple[int, ...] = ()  # the argmax at each read (EasyEdit-style locality compares these)

    @property
    def token_acc(self) -> float:
        """The share of the target's tokens that are the argmax given their prefix (0 for an empty target)."""
        return self.correct_tokens / self.total_tokens if self.total_tokens else 0.0


def score_pairs(
    model: nn.Module,
    task: Task,
    pairs: Sequence[tuple[str, Any]],
    batch_size: int = 32,
    progress: str | None = None,
) -> list[Outcome]:
    """Evaluate ``model`` on every pair without gradients, in eval mode, keeping input order; ``progress`` names a
    progress bar (None: no bar)."""
    outcomes: list[Outcome] = []
    starts = range(0, len(pairs), batch_size)
    with eval_mode(model):
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
            batch = task.batch_for(model, pairs[start : start + batch_size])
            with torch.no_grad():
                logits = task.read_logits(model(**batch.model_kwargs()), batch)
            # per read, on the CPU: one copy per batch rather than a device sync per example
            predicted = task.predictions(logits).cpu()
            right = task.correct(logits, batch.labels).cpu()
            log_probs = _label_log_probs(logits.float(), batch.labels).cpu()
            example, labels = batch.example.cpu(), batch.labels.cpu()
            for i in range(batch.size):
                reads = example == i
                outcomes.append(
                    Outcome(
                        correct=bool(right[reads].all()),
                        prediction=_render(task, predicted[reads]),
                        reference=_render(task, labels[reads]),
                        correct_tokens=int(right[reads].sum()),
                        total_tokens=int(reads.sum()),
                        log_prob=float(log_probs[reads].mean()),
                        predicted_ids=tuple(predicted[reads].tolist()),
                    )
                )
    return outcomes


def _label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per read, log p(label); a single-logit (binary) head scores label 1 as sigmoid(logit)."""
    if logits.shape[-1] == 1:
        logit = logits[:, 0]
        return torch.where(labels == 1, F.logsigmoid(logit), F.logsigmoid(-logit))
    return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)


def _render(task: Task, ids: torch.Tensor) -> str:
    if task.kind == "classification":
        return str(int(ids[0]))
    return task.decode(ids.tolist())
