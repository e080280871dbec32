"""ROME-style batch scores: probability comparisons and accuracies, checked against hand computations."""

from __future__ import annotations

import pytest
import torch

from tiny_tokenizer import sharp_gpt2, tiny_tokenizer
from transformer_patcher.core.scoring import Outcome, score_pairs
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.experiments.sme.fact_scores import FactCase, fact_metrics, score_cases


def _outcome(correct: bool, prediction: str, log_prob: float) -> Outcome:
    return Outcome(correct, prediction, "ref", int(correct), 1, log_prob)


def test_metrics_count_probability_wins_and_unchanged_neighbours() -> None:
    before = [
        {
            "edit": _outcome(False, "a", -5),
            "paraphrase": _outcome(False, "a", -5),
            "neighbourhood": _outcome(True, "x", -1),
        },
        {
            "edit": _outcome(False, "b", -5),
            "paraphrase": _outcome(False, "b", -5),
            "neighbourhood": _outcome(True, "y", -1),
        },
    ]
    after = [
        {
            "edit": _outcome(True, "new", -0.1),
            "paraphrase": _outcome(False, "old", -3.0),
            "neighbourhood": _outcome(True, "x", -1.0),
            "edit_true": _outcome(False, "new", -4.0),  # p(new) > p(true): efficacy win
            "paraphrase_true": _outcome(False, "old", -2.0),  # p(true) > p(new): paraphrase loss
            "neighbourhood_new": _outcome(False, "x", -6.0),  # p(true) > p(new): neighbourhood win
        },
        {
            "edit": _outcome(False, "old", -2.0),
            "paraphrase": _outcome(True, "new", -0.5),
            "neighbourhood": _outcome(False, "z", -3.0),  # the neighbour's answer changed
            "edit_true": _outcome(False, "old", -1.0),
            "paraphrase_true": _outcome(False, "new", -2.5),
            "neighbourhood_new": _outcome(False, "z", -0.5),
        },
    ]
    metrics = fact_metrics(after, before)
    assert metrics == {
        "efficacy_acc": 0.5,
        "paraphrase_acc": 0.5,
        "neighborhood_acc": 0.5,
        "efficacy_token_acc": 0.5,  # one-token answers: the token share is the whole-answer accuracy
        "paraphrase_token_acc": 0.5,
        "efficacy_score": 0.5,
        "paraphrase_score": 0.5,
        "neighborhood_score": 0.5,
    }
    without_truth = [{k: v for k, v in case.items() if k in ("edit", "paraphrase", "neighbourhood")} for case in after]
    assert set(fact_metrics(without_truth, before)) == {
        "efficacy_acc",
        "paraphrase_acc",
        "neighborhood_acc",
        "efficacy_token_acc",
        "paraphrase_token_acc",
    }


def _answer(correct_tokens: int, total_tokens: int, ids: tuple[int, ...] = ()) -> Outcome:
    return Outcome(correct_tokens == total_tokens, "", "ref", correct_tokens, total_tokens, 0.0, ids)


def test_token_accuracies_credit_part_of_a_multi_token_answer_per_case() -> None:
    """zsRE-style answers: whole-answer accuracy fails a case on one wrong token, the token accuracies count the share
    of right (target) or unchanged (neighbour) tokens per case, then average the cases (as ROME and EasyEdit do)."""
    before = [
        {"edit": _answer(0, 4), "paraphrase": _answer(0, 4), "neighbourhood": _answer(1, 2, (7, 8))},
        {"edit": _answer(0, 1), "paraphrase": _answer(0, 1), "neighbourhood": _answer(0, 4, (1, 2, 3, 4))},
    ]
    after = [
        {"edit": _answer(3, 4), "paraphrase": _answer(1, 4), "neighbourhood": _answer(1, 2, (7, 8))},
        {"edit": _answer(1, 1), "paraphrase": _answer(0, 1), "neighbourhood": _answer(0, 4, (1, 2, 9, 9))},
    ]
    metrics = fact_metrics(after, before)
    assert metrics["efficacy_acc"] == 0.5 and metrics["efficacy_token_acc"] == pytest.approx((3 / 4 + 1) / 2)
    assert metrics["paraphrase_acc"] == 0.0 and metrics["paraphrase_token_acc"] == pytest.approx(1 / 8)
    assert metrics["neighborhood_acc"] == 1.0  # both predictions are "" here: the strings cannot tell
    assert metrics["neighborhood_token_acc"] == pytest.approx((1 + 2 / 4) / 2)


def test_score_cases_reads_mean_token_log_probabilities() -> None:
    model, tokenizer = sharp_gpt2(), tiny_tokenizer()
    task = CausalLMTask(tokenizer)
    case = FactCase("w70 w71 w72", "w70", "w100 w101", "w73 w71", "w10 w11", "w12", true_answer="w102")
    scored = score_cases(model, task, [case])[0]
    assert set(scored) == {"edit", "paraphrase", "neighbourhood", "edit_true", "paraphrase_true", "neighbourhood_new"}
    ids = tokenizer("w70 w71 w72 w100 w101", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        log_probs = model(ids).logits.log_softmax(-1)[0]
    expected = (log_probs[3, 100] + log_probs[4, 101]) / 2  # [BOS] w70 w71 w72 → w100, then w100 → w101
    assert scored["edit"].log_prob == pytest.approx(float(expected), abs=1e-5)
    assert scored["neighbourhood_new"].reference == "w100 w101"
    alone = score_pairs(model, task, [("w10 w11", "w12")])[0]  # unpadded: equal up to float rounding
    assert alone.prediction == scored["neighbourhood"].prediction
    assert alone.log_prob == pytest.approx(scored["neighbourhood"].log_prob, abs=1e-4)
