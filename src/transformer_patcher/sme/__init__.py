"""Sequential model editing: the runner, its evaluation and its resumable checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .evaluation import Outcome, score_pairs
from .runner import FoldResult, SMEConfig, SMERunner

__all__ = ["FoldResult", "Outcome", "SMEConfig", "SMERunner", "load_checkpoint", "save_checkpoint", "score_pairs"]
