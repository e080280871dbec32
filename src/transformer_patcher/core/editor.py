"""The interface the SME runner drives (T-Patcher, the fine-tuning baselines and PMET implement it) and its record."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.tasks import Task


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
