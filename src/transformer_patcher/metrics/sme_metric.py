"""Sequential-model-editing (SME) metrics of Transformer-Patcher as an ``evaluate`` metric.

Use the class directly (``SMEMetric().compute(...)``), call ``transformer_patcher.metrics.load_sme_metric()``, or load
the script with ``evaluate.load`` by its file path::

    evaluate.load("/path/to/transformer_patcher/metrics/sme_metric.py")

Loading by the containing directory does not work: evaluate looks for ``<dirname>/<dirname>.py``. ``evaluate.load``
copies this file alone into its modules cache and imports it from there, so every import below is absolute (one per
line, which is what evaluate's import scanner understands) and ``transformer_patcher`` must be installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate

from transformer_patcher.metrics.core import summarize

_CITATION = """\
@inproceedings{huang2023transformerpatcher,
  title     = {Transformer-Patcher: One Mistake Worth One Neuron},
  author    = {Huang, Zeyu and Shen, Yikang and Zhang, Xiaofeng and Zhou, Jie and Rong, Wenge and Xiong, Zhang},
  booktitle = {The Eleventh International Conference on Learning Representations (ICLR)},
  year      = {2023},
  url       = {https://arxiv.org/abs/2301.09785}
}
"""

_DESCRIPTION = """\
Sequential model editing (SME) metrics of Transformer-Patcher (Huang et al., ICLR 2023, eqs. 20-24). Each row of the
evaluation table is tagged with a group: "edit" (the examples that were edited), "rephrase" (rephrasings of them),
"retain" (earlier edits, re-checked after later ones), "train" / "test" (held-out data that editing should not break)
and "locality" (unrelated inputs whose pre-edit prediction should not change). A prediction is correct when it equals
the reference after lower-casing, stripping and collapsing whitespace. Reported: SR, GR, ER (exact match on edit,
rephrase, retain), TrainR, TestR (accuracy after editing divided by accuracy before), locality (agreement with the
pre-edit prediction), locality_acc (exact match on locality rows) and, given token counts, <group>_token_acc
(micro-averaged teacher-forced token accuracy). Only the keys whose group has rows are returned.
"""

_KWARGS_DESCRIPTION = """
Args:
    groups (`list` of `str`): group of each row, one of "edit", "rephrase", "retain", "train", "test", "locality".
    predictions (`list` of `str`): the edited model's prediction per row; class labels as strings, e.g. "0"/"1".
    references (`list` of `str`): the gold answer per row.
    base_predictions (`list` of `str`, *optional*): the pre-edit model's prediction per row; required when there are
        "train", "test" or "locality" rows.
    correct_tokens (`list` of `int`, *optional*): teacher-forced target tokens predicted correctly, per row.
    total_tokens (`list` of `int`, *optional*): target tokens per row (0 skips the row); give with correct_tokens.
Returns:
    `dict` of `float`, with the keys whose group is present: "SR", "GR", "ER", "TrainR", "TestR", "locality",
    "locality_acc" and "<group>_token_acc".
Examples:
    >>> sme = SMEMetric()
    >>> sme.compute(groups=["edit", "edit", "rephrase"], predictions=["Paris", "Rome", "paris"],
    ...             references=["paris", "Berlin", "Paris"])
    {'SR': 0.5, 'GR': 1.0}
"""

_NO_BASE_PREDICTION = "\x00no base prediction\x00"
"""Stored for rows added without base_predictions: evaluate rejects None in string columns."""

_OPTIONAL_COLUMNS: dict[str, str | None] = {
    "base_predictions": _NO_BASE_PREDICTION,
    "correct_tokens": None,
    "total_tokens": None,
}


def _fill_optional_columns(kwargs: dict[str, Any], rows: int | None) -> dict[str, Any]:
    """Mark every optional column left out as absent: per row for a batch of ``rows``, as a scalar for one example."""
    missing = {
        name: fill if rows is None else [fill] * rows
        for name, fill in _OPTIONAL_COLUMNS.items()
        if kwargs.get(name) is None
    }
    return {**kwargs, **missing}


def _column_or_none(name: str, column: Sequence[Any]) -> Sequence[Any] | None:
    """The column, or None if it was left out on every row; a column given for only some rows is an error."""
    absent = [value == _OPTIONAL_COLUMNS[name] for value in column]
    if all(absent):
        return None
    if any(absent):
        raise ValueError(f"{name} was given for some rows only; give it for every row or for none")
    return column


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SMEMetric(evaluate.Metric):
    """SR, GR, ER, TrainR, TestR, locality and token accuracy over a group-tagged evaluation table.

    ``base_predictions``, ``correct_tokens`` and ``total_tokens`` are optional in ``compute``, ``add_batch`` and
    ``add``: evaluate requires every feature column, so the ones left out are stored as absent and dropped again
    before :func:`~transformer_patcher.metrics.core.summarize` runs.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "groups": datasets.Value("string"),
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "base_predictions": datasets.Value("string"),
                    "correct_tokens": datasets.Value("int64"),
                    "total_tokens": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2301.09785"],
            codebase_urls=["https://github.com/ZeroYuHuang/Transformer-Patcher"],
        )

    def compute(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> dict[str, float] | None:
        """Compute the SME metrics; optional columns may be left out."""
        if predictions is not None:
            kwargs = _fill_optional_columns(kwargs, len(predictions))
        return super().compute(predictions=predictions, references=references, **kwargs)

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Add a batch of rows; optional columns may be left out."""
        if predictions is not None:
            kwargs = _fill_optional_columns(kwargs, len(predictions))
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """Add one row; optional columns may be left out."""
        super().add(prediction=prediction, reference=reference, **_fill_optional_columns(kwargs, None))

    def _compute(
        self,
        groups: list[str],
        predictions: list[str],
        references: list[str],
        base_predictions: list[str],
        correct_tokens: list[int | None],
        total_tokens: list[int | None],
    ) -> dict[str, float]:
        return summarize(
            groups,
            predictions,
            references,
            base_predictions=_column_or_none("base_predictions", base_predictions),
            correct_tokens=_column_or_none("correct_tokens", correct_tokens),
            total_tokens=_column_or_none("total_tokens", total_tokens),
        )
