"""Sequential-model-editing metrics of Transformer-Patcher: pure functions and an ``evaluate`` metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

from .core import (
    GROUPS,
    exact_match,
    locality,
    normalize_answer,
    retention_ratio,
    success_rate,
    summarize,
    token_accuracy,
)
from .sme_metric import SMEMetric

SME_METRIC_PATH = Path(__file__).with_name("sme_metric.py")
"""The metric script, for ``evaluate.load``."""


def load_sme_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` the SME metric from its script path; ``kwargs`` go to ``evaluate.load``."""
    return evaluate.load(str(SME_METRIC_PATH), **kwargs)


__all__ = [
    "GROUPS",
    "SME_METRIC_PATH",
    "SMEMetric",
    "exact_match",
    "load_sme_metric",
    "locality",
    "normalize_answer",
    "retention_ratio",
    "success_rate",
    "summarize",
    "token_accuracy",
]
