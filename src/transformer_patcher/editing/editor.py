"""The interface the SME runner drives: T-Patcher and the fine-tuning baselines both implement it."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .tasks import EditExample, Task
from .trainer import EditRecord


class Editor(Protocol):
    """An editor fixes one example at a time and can save, restore and reset everything it changed."""

    model: nn.Module
    task: Task

    def edit(self, example: EditExample, edit_id: int) -> EditRecord: ...

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the edits so far changed (patches, memory additions, tuned weights)."""
        ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``state_tensors()`` output onto the original model (resume)."""
        ...

    def reset(self) -> None:
        """Back to the original model and memory: the start of a new fold."""
        ...
