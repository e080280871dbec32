"""Perplexity before and after editing and its relative change, as an ``evaluate`` metric (general ability).

Unlike evaluate's own ``perplexity`` metric, which downloads a model and runs it, this one takes the log-probabilities
the two models gave the same text, so it works offline and on any model. Every import below is absolute
(``evaluate.load`` copies this file alone).
"""

from __future__ import annotations

import datasets
import evaluate

from transformer_patcher.metrics.core import perplexity, relative_change

_DESCRIPTION = """\
Perplexity of a text before and after editing, and the relative change `after / before - 1`. Each row is one window
of the text: `log_probs_before` and `log_probs_after` are the log-probabilities the unedited and the edited model
gave each of its tokens (the same tokens in both).
"""

_KWARGS_DESCRIPTION = """
Args:
    log_probs_before (`list` of `list` of `float`): per window, log p(token) under the unedited model.
    log_probs_after (`list` of `list` of `float`): the same windows under the edited model.
Returns:
    `dict`: "before", "after" (perplexities) and "change" (relative).
Examples:
    >>> PerplexityChangeMetric().compute(log_probs_before=[[-1.0, -1.0]], log_probs_after=[[-1.0, -1.2]])["change"]
    0.1051...
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerplexityChangeMetric(evaluate.Metric):
    """Perplexity before and after editing, from the two models' log-probabilities of the same text."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "log_probs_before": datasets.Sequence(datasets.Value("float64")),
                    "log_probs_after": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, log_probs_before: list[list[float]], log_probs_after: list[list[float]]) -> dict[str, float]:
        for row, (before, after) in enumerate(zip(log_probs_before, log_probs_after, strict=True)):
            if len(before) != len(after):
                raise ValueError(f"row {row}: {len(before)} log-probabilities before editing but {len(after)} after")
        before = perplexity([value for row in log_probs_before for value in row])
        after = perplexity([value for row in log_probs_after for value in row])
        return {"before": before, "after": after, "change": relative_change(after, before)}
