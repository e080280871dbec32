"""SME metrics (Transformer-Patcher eqs. 20–24) against hand-computed values, as functions and as an evaluate metric."""

from __future__ import annotations

import math
import os
from pathlib import Path

import evaluate
import pytest

from transformer_patcher.metrics import (
    SME_METRIC_PATH,
    AgreementMetric,
    PerplexityChangeMetric,
    SMEMetric,
    exact_match,
    load_agreement_metric,
    load_perplexity_metric,
    load_sme_metric,
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

# One row per line: group, prediction, reference, pre-edit prediction, correct tokens, total tokens.
TABLE = [
    ("edit", "Paris", "paris", "Lyon", 2, 2),
    ("edit", "Rome", "Berlin", "Rome", 1, 3),
    ("rephrase", " paris", "Paris", "Lyon", 1, 1),
    ("retain", "x", "y", "x", 0, 2),
    ("train", "1", "1", "1", 1, 1),
    ("train", "0", "1", "1", 0, 1),
    ("test", "0", "0", "0", 1, 1),
    ("test", "1", "1", "0", 1, 1),
    ("locality", "Tokyo", "Kyoto", "tokyo", 0, 0),
    ("locality", "Oslo", "Oslo", "Bergen", 0, 0),
]
COLUMNS = dict(
    zip(
        ("groups", "predictions", "references", "base_predictions", "correct_tokens", "total_tokens"),
        map(list, zip(*TABLE, strict=True)),
        strict=True,
    )
)
EXPECTED = {
    "SR": 1 / 2,  # Paris right, Rome wrong
    "GR": 1.0,
    "ER": 0.0,
    "TrainR": (1 / 2) / (2 / 2),  # one of two right after editing, both right before
    "TestR": (2 / 2) / (1 / 2),  # editing fixed a test example the base model got wrong
    "locality": 1 / 2,  # Tokyo == tokyo after normalization, Oslo != Bergen
    "locality_acc": 1 / 2,
    "edit_token_acc": 3 / 5,
    "rephrase_token_acc": 1.0,
    "retain_token_acc": 0.0,
    "train_token_acc": 1 / 2,
    "test_token_acc": 2 / 2,
}  # no locality_token_acc: its rows have 0 tokens


@pytest.fixture(autouse=True)
def _evaluate_cache(_isolated_hf_home: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate reads HF_HOME once at import, so point its module and metric caches into the isolated HF_HOME."""
    hf_home = Path(os.environ["HF_HOME"])
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", hf_home / "modules")
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", hf_home / "metrics")


def test_normalize_answer() -> None:
    assert normalize_answer("  New \t York\n") == "new york"


def test_exact_match_normalizes_and_accepts_lists_of_references() -> None:
    predictions = ["  Paris ", "berlin", "Rome"]
    references = [["Paris, France", "paris"], "Berlin", ["Milan", "Turin"]]
    assert exact_match(predictions, references) == pytest.approx(2 / 3)
    assert exact_match(["  Paris "], ["paris"], normalize=False) == 0.0
    assert exact_match(["Paris"], ["Paris"], normalize=False) == 1.0


def test_success_rate() -> None:
    assert success_rate([1, 0, 1, 1]) == 0.75
    assert success_rate([True, False]) == 0.5
    with pytest.raises(ValueError, match="0/1"):
        success_rate([1, 2])


def test_retention_ratio() -> None:
    assert retention_ratio(after_correct=[1, 1, 0, 1, 0], before_correct=[1, 1, 1, 1, 0]) == pytest.approx(0.75)


def test_retention_ratio_without_any_correct_before_points_to_locality() -> None:
    with pytest.raises(ValueError, match="locality"):
        retention_ratio([1, 0], [0, 0])


def test_locality_counts_agreement_with_the_base_model_not_correctness() -> None:
    assert locality(["a", "B", "c"], ["a", "b", "d"]) == pytest.approx(2 / 3)


def test_token_accuracy_is_micro_averaged() -> None:
    assert token_accuracy([3, 1], [4, 2]) == pytest.approx(4 / 6)  # the macro average would be 5/8
    with pytest.raises(ValueError, match="between 0 and"):
        token_accuracy([3], [2])
    with pytest.raises(ValueError, match="sums to 0"):
        token_accuracy([0], [0])


@pytest.mark.parametrize(
    ("function", "args", "name"),
    [
        (exact_match, ([], []), "predictions"),
        (success_rate, ([],), "correct"),
        (retention_ratio, ([], []), "after_correct"),
        (locality, ([], []), "predictions"),
        (token_accuracy, ([], []), "correct_tokens"),
        (summarize, ([], [], []), "groups"),
    ],
)
def test_empty_input_is_an_error(function, args, name) -> None:
    with pytest.raises(ValueError, match=f"^{name} is empty$"):
        function(*args)


@pytest.mark.parametrize(
    ("function", "args"),
    [
        (exact_match, (["a", "b"], ["a", "b", "c"])),
        (retention_ratio, ([1, 0], [1, 0, 1])),
        (locality, (["a", "b"], ["a", "b", "c"])),
        (token_accuracy, ([1, 1], [1, 1, 1])),
        (summarize, (["edit", "edit"], ["a", "b"], ["a", "b", "c"])),
    ],
)
def test_mismatched_lengths_name_both_lengths(function, args) -> None:
    with pytest.raises(ValueError, match=r"has 2 items but .* has 3"):
        function(*args)


def test_summarize_every_group() -> None:
    result = summarize(**COLUMNS)
    assert result.keys() == EXPECTED.keys()
    assert result == pytest.approx(EXPECTED)


def test_summarize_reports_only_present_groups() -> None:
    assert summarize(["edit", "rephrase"], ["a", "b"], ["a", "c"]) == {"SR": 1.0, "GR": 0.0}


def test_summarize_skips_rows_without_tokens() -> None:
    result = summarize(["edit", "edit"], ["a", "b"], ["a", "c"], correct_tokens=[0, 2], total_tokens=[0, 4])
    assert result == {"SR": 0.5, "edit_token_acc": 0.5}


def test_summarize_rejects_unknown_group() -> None:
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['edits'\].*'rephrase'"):
        summarize(["edits"], ["a"], ["a"])


def test_summarize_needs_base_predictions_for_retention_and_locality() -> None:
    with pytest.raises(ValueError, match="base_predictions are required"):
        summarize(["edit", "test"], ["a", "b"], ["a", "b"])


def test_summarize_needs_both_token_columns() -> None:
    with pytest.raises(ValueError, match="together"):
        summarize(["edit"], ["a"], ["a"], correct_tokens=[1])


def test_summarize_zero_before_accuracy_names_the_metric() -> None:
    with pytest.raises(ValueError, match=r"TrainR.*locality"):
        summarize(["train"], ["1"], ["1"], base_predictions=["0"])


def test_metric_class_matches_summarize() -> None:
    result = SMEMetric().compute(**COLUMNS)
    assert result.keys() == EXPECTED.keys()
    assert result == pytest.approx(EXPECTED)


def test_metric_optional_columns_can_be_left_out() -> None:
    result = SMEMetric().compute(groups=["edit", "rephrase"], predictions=["1", "0"], references=["1", "1"])
    assert result == {"SR": 1.0, "GR": 0.0}


def test_metric_needs_base_predictions_for_retention() -> None:
    with pytest.raises(ValueError, match="base_predictions are required"):
        SMEMetric().compute(groups=["test"], predictions=["1"], references=["1"])


def test_metric_rejects_a_column_given_for_some_rows_only() -> None:
    metric = SMEMetric()
    metric.add_batch(groups=["edit"], predictions=["a"], references=["a"], correct_tokens=[1], total_tokens=[1])
    metric.add_batch(groups=["edit"], predictions=["a"], references=["a"])
    with pytest.raises(ValueError, match="correct_tokens was given for some rows only"):
        metric.compute()


def test_evaluate_load_matches_the_class() -> None:
    loaded = evaluate.load(str(SME_METRIC_PATH))
    assert isinstance(loaded, evaluate.Metric)
    assert "Transformer-Patcher" in loaded.citation
    assert loaded.compute(**COLUMNS) == SMEMetric().compute(**COLUMNS)
    assert load_sme_metric().compute(**COLUMNS) == SMEMetric().compute(**COLUMNS)


def test_batches_and_single_rows_match_one_shot_compute() -> None:
    metric = load_sme_metric()
    half = len(TABLE) // 2
    metric.add_batch(**{name: column[:half] for name, column in COLUMNS.items()})
    for group, prediction, reference, base, correct, total in TABLE[half:]:
        metric.add(
            groups=group,
            prediction=prediction,
            reference=reference,
            base_predictions=base,
            correct_tokens=correct,
            total_tokens=total,
        )
    assert metric.compute() == SMEMetric().compute(**COLUMNS)


# ------------------------------------------------------------------------ token agreement and perplexity
def test_token_agreement_exact_and_token_by_hand() -> None:
    predictions = [[1, 2, 3], [4, 5], [6]]
    references = [[1, 2, 3], [4, 9], [7]]
    assert row_agreement(predictions, references) == [1.0, 0.5, 0.0]
    assert token_agreement(predictions, references) == {"exact": 1 / 3, "token": (1 + 0.5 + 0) / 3}


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [([], [], "empty"), ([[1]], [[1], [2]], "length mismatch"), ([[1, 2]], [[1]], "row 0"), ([[]], [[]], "row 0")],
)
def test_token_agreement_refuses_ragged_input(predictions, references, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        token_agreement(predictions, references)


def test_perplexity_and_relative_change_by_hand() -> None:
    assert perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
    assert relative_change(3.0, 2.0) == pytest.approx(0.5)
    assert relative_change(2.0, 2.0) == 0.0
    for bad in ([0.5], [float("nan")], []):
        with pytest.raises(ValueError):
            perplexity(bad)
    with pytest.raises(ValueError, match="before > 0"):
        relative_change(1.0, 0.0)


def test_agreement_metric_as_an_evaluate_module_matches_the_functions() -> None:
    rows = {
        "parts": ["loc", "loc", "rewrite"],
        "predictions": [[1, 2], [3, 4], [5]],
        "references": [[1, 2], [3, 0], [5]],
    }
    expected = {"loc.exact": 0.5, "loc.token": 0.75, "rewrite.exact": 1.0, "rewrite.token": 1.0}
    assert AgreementMetric().compute(**rows) == expected
    loaded = load_agreement_metric()
    for part, prediction, reference in zip(*rows.values(), strict=True):
        loaded.add(parts=part, predictions=prediction, references=reference)
    assert loaded.compute() == expected


def test_perplexity_metric_as_an_evaluate_module() -> None:
    before, after = [[-1.0, -1.0], [-1.0]], [[-1.0, -1.5], [-1.0]]
    result = load_perplexity_metric().compute(log_probs_before=before, log_probs_after=after)
    assert result["before"] == pytest.approx(math.e)
    assert result["after"] == pytest.approx(math.exp(3.5 / 3))
    assert result["change"] == pytest.approx(math.exp(3.5 / 3) / math.e - 1)
    with pytest.raises(ValueError, match="row 0"):
        PerplexityChangeMetric().compute(log_probs_before=[[-1.0]], log_probs_after=[[-1.0, -1.0]])
