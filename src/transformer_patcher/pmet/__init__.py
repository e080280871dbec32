"""PMET: precise mass editing of decoder-only LMs (in progress: key statistics and the closed-form update so far)."""

from .covariance import SecondMoment, collect_second_moments, second_moments
from .update import LowRankDelta, residual_share, solve_update

__all__ = [
    "LowRankDelta",
    "SecondMoment",
    "collect_second_moments",
    "residual_share",
    "second_moments",
    "solve_update",
]
