"""PMET: precise mass editing of decoder-only LMs, its edits kept in a low-rank weight-delta adapter.

``PMETEditor`` edits batches of ``EditRequest``\\ s (many facts in one closed-form update, and batch after batch);
``PMETHyperParams`` / ``PRESETS`` hold the official, EasyEdit and SmolLM2 settings, and ``variant="memit"`` is the
MEMIT-style ablation.
"""

from transformer_patcher.methods.pmet.algorithm import compute_deltas, compute_keys, refined_deltas
from transformer_patcher.methods.pmet.covariance import SecondMoment, collect_second_moments, second_moments
from transformer_patcher.methods.pmet.editor import BatchResult, PMETEditor
from transformer_patcher.methods.pmet.hparams import DEFAULT_PRESET, PRESETS, PMETHyperParams, pmet_hparams
from transformer_patcher.methods.pmet.null_space import NullSpace, null_space_projection, solve_projected_update
from transformer_patcher.methods.pmet.requests import EditRequest
from transformer_patcher.methods.pmet.targets import Targets, compute_targets
from transformer_patcher.methods.pmet.templates import context_templates
from transformer_patcher.methods.pmet.update import LowRankDelta, residual_share, solve_joint, solve_update
from transformer_patcher.methods.pmet.written_keys import CovarianceSolve, WrittenKeys

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "BatchResult",
    "CovarianceSolve",
    "EditRequest",
    "LowRankDelta",
    "NullSpace",
    "PMETEditor",
    "PMETHyperParams",
    "SecondMoment",
    "Targets",
    "WrittenKeys",
    "collect_second_moments",
    "compute_deltas",
    "compute_keys",
    "compute_targets",
    "context_templates",
    "null_space_projection",
    "pmet_hparams",
    "refined_deltas",
    "residual_share",
    "second_moments",
    "solve_joint",
    "solve_projected_update",
    "solve_update",
]
