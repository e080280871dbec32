"""Sequential model editing: the runner, its evaluation and its resumable checkpoints."""

from transformer_patcher.core.scoring import Outcome, score_pairs
from transformer_patcher.experiments.sme.run_state import load_checkpoint, save_checkpoint
from transformer_patcher.experiments.sme.runner import FoldResult, SMEConfig, SMERunner

__all__ = ["FoldResult", "Outcome", "SMEConfig", "SMERunner", "load_checkpoint", "save_checkpoint", "score_pairs"]
