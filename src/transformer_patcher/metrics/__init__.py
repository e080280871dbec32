"""Model-editing metrics: pure functions, and ``evaluate`` metrics for the SME table (SR, GR, ER, TrainR, TestR,
locality), token agreement per part (the evaluation suite's exact/token measures, EasyEdit's accuracies) and the
perplexity change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

from transformer_patcher.metrics.agreement_metric import AgreementMetric
from transformer_patcher.metrics.core import (
    GROUPS,
    exact_match,
    locality,
    normalize_answer,
    perplexity,
    relative_change,
    retention_ratio,
    row_agreement,
    success_rate,
    summarize,
    token_accuracy,
    token_agreement,
)
from transformer_patcher.metrics.perplexity_metric import PerplexityChangeMetric
from transformer_patcher.metrics.sme_metric import SMEMetric

SME_METRIC_PATH = Path(__file__).with_name("sme_metric.py")
"""The metric scripts, for ``evaluate.load``."""
AGREEMENT_METRIC_PATH = Path(__file__).with_name("agreement_metric.py")
PERPLEXITY_METRIC_PATH = Path(__file__).with_name("perplexity_metric.py")


def load_sme_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` the SME metric from its script path; ``kwargs`` go to ``evaluate.load``."""
    return evaluate.load(str(SME_METRIC_PATH), **kwargs)


def load_agreement_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` the token-agreement metric (suite parts, EasyEdit accuracies) from its script path."""
    return evaluate.load(str(AGREEMENT_METRIC_PATH), **kwargs)


def load_perplexity_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` the perplexity-change metric from its script path."""
    return evaluate.load(str(PERPLEXITY_METRIC_PATH), **kwargs)


__all__ = [
    "AGREEMENT_METRIC_PATH",
    "GROUPS",
    "PERPLEXITY_METRIC_PATH",
    "SME_METRIC_PATH",
    "AgreementMetric",
    "PerplexityChangeMetric",
    "SMEMetric",
    "exact_match",
    "load_agreement_metric",
    "load_perplexity_metric",
    "load_sme_metric",
    "locality",
    "normalize_answer",
    "perplexity",
    "relative_change",
    "retention_ratio",
    "row_agreement",
    "success_rate",
    "summarize",
    "token_accuracy",
    "token_agreement",
]
