"""Token agreement per part, as an ``evaluate`` metric: the locality suite's exact/token measures and EasyEdit's
teacher-forced accuracies.

Use the class directly (``AgreementMetric().compute(...)``), call
``transformer_patcher.metrics.load_agreement_metric()``, or load the script by its file path with ``evaluate.load``.
As for the SME metric, every import below is absolute (``evaluate.load`` copies this file alone).
"""

from __future__ import annotations

import datasets
import evaluate

from transformer_patcher.metrics.core import token_agreement

_DESCRIPTION = """\
Agreement of predicted tokens with reference tokens, per part. Each row is one sequence: `predictions` are the
edited model's argmax tokens at the positions read (teacher forcing), `references` the tokens they are compared with —
the pre-edit model's argmax tokens (the locality suite: is the greedy output unchanged?) or a target's tokens
(EasyEdit's rewrite/rephrase accuracy; our SR/GR when the target ends with its stop token). Reported per part:
`<part>.exact`, the fraction of rows whose tokens all agree, and `<part>.token`, the mean per-row fraction of
agreeing tokens (EasyEdit's token-level accuracy and locality).
"""

_KWARGS_DESCRIPTION = """
Args:
    parts (`list` of `str`): the part each row belongs to, e.g. "unrelated-raw", "neighbours-chat", "rewrite".
    predictions (`list` of `list` of `int`): the edited model's argmax tokens of each row.
    references (`list` of `list` of `int`): the tokens to agree with, as many per row as predictions.
Returns:
    `dict` of `float`: "<part>.exact" and "<part>.token" for every part.
Examples:
    >>> AgreementMetric().compute(parts=["loc", "loc"], predictions=[[1, 2], [3, 4]], references=[[1, 2], [3, 5]])
    {'loc.exact': 0.5, 'loc.token': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AgreementMetric(evaluate.Metric):
    """``exact`` and ``token`` agreement of predicted with reference tokens, per part."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "parts": datasets.Value("string"),
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, parts: list[str], predictions: list[list[int]], references: list[list[int]]) -> dict[str, float]:
        rows: dict[str, list[int]] = {}
        for index, part in enumerate(parts):
            rows.setdefault(part, []).append(index)
        result = {}
        for part, index in rows.items():
            measures = token_agreement([predictions[i] for i in index], [references[i] for i in index])
            result |= {f"{part}.{name}": value for name, value in measures.items()}
        return result
