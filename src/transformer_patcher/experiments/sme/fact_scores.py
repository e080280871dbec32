"""ROME-style scores of a batch of fact edits (CounterFact, zsRE): what a mass editor is judged by.

Per case, with p(·) the mean per-token probability of an answer after the prompt (teacher forcing):

- efficacy / paraphrase **score**: p(new target) > p(true answer) on the edit prompt / its paraphrase;
- neighbourhood **score**: p(true answer) > p(new target) on a prompt about a neighbouring subject;
- efficacy / paraphrase **accuracy**: the new target is the greedy continuation (every token the argmax);
- neighbourhood **accuracy**: the greedy answer on the neighbouring prompt is unchanged from the unedited model;
- **token** accuracies (``*_token_acc``), per case then averaged: the share of the new target's tokens that are the
  argmax given the target's prefix, and the share of the neighbouring answer's argmax tokens that are unchanged. This
  is how ROME, MEMIT and PMET report zsRE (and EasyEdit every data set), where answers run to several tokens and one
  changed token fails the whole-answer accuracy.

Probability scores need the true answer (CounterFact's ``ground_truth``); zsRE has none, so only accuracies exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from torch import nn

from transformer_patcher.core.scoring import Outcome, score_pairs
from transformer_patcher.core.tasks import Task
from transformer_patcher.metrics.core import row_agreement


@dataclass(frozen=True)
class FactCase:
    """One fact edit and the prompts it is judged on."""

    prompt: str
    subject: str
    target: str
    paraphrase: str
    neighbourhood: str
    neighbourhood_answer: str
    true_answer: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FactCase:
        """From a ``load_counterfact`` / ``load_zsre`` row."""
        return cls(
            row["text"],
            row["subject"],
            row["target"],
            row["rephrase"],
            row["loc"],
            row["loc_ans"],
            row.get("ground_truth"),
        )


def _pairs(case: FactCase) -> list[tuple[str, str]]:
    pairs = [
        (case.prompt, case.target),
        (case.paraphrase, case.target),
        (case.neighbourhood, case.neighbourhood_answer),
    ]
    if case.true_answer is not None:
        pairs += [
            (case.prompt, case.true_answer),
            (case.paraphrase, case.true_answer),
            (case.neighbourhood, case.target),
        ]
    return pairs


def score_cases(
    model: nn.Module, task: Task, cases: Sequence[FactCase], batch_size: int = 32, progress: str | None = None
) -> list[dict[str, Outcome]]:
    """Outcomes per case: ``edit``, ``paraphrase``, ``neighbourhood`` (+ ``*_true`` / ``neighbourhood_new``);
    ``progress`` names a progress bar."""
    names = ("edit", "paraphrase", "neighbourhood", "edit_true", "paraphrase_true", "neighbourhood_new")
    flat = [pair for case in cases for pair in _pairs(case)]
    outcomes = score_pairs(model, task, flat, batch_size, progress)
    result, position = [], 0
    for case in cases:
        n = len(_pairs(case))
        result.append(dict(zip(names, outcomes[position : position + n], strict=False)))
        position += n
    return result


def fact_metrics(after: Sequence[dict[str, Outcome]], before: Sequence[dict[str, Outcome]]) -> dict[str, float]:
    """Aggregate scores and accuracies (means over cases) from outcomes after and before the edits."""
    metrics = {
        "efficacy_acc": fmean(c["edit"].correct for c in after),
        "paraphrase_acc": fmean(c["paraphrase"].correct for c in after),
        "neighborhood_acc": fmean(
            a["neighbourhood"].prediction == b["neighbourhood"].prediction for a, b in zip(after, before, strict=True)
        ),
    }
    metrics |= {
        "efficacy_token_acc": fmean(c["edit"].token_acc for c in after),
        "paraphrase_token_acc": fmean(c["paraphrase"].token_acc for c in after),
    }
    ids_after = [c["neighbourhood"].predicted_ids for c in after]
    ids_before = [c["neighbourhood"].predicted_ids for c in before]
    if all(ids_after) and all(ids_before):  # outcomes saved before the argmax ids were kept lack them
        metrics["neighborhood_token_acc"] = fmean(row_agreement(ids_after, ids_before))
    if all("edit_true" in c for c in after):
        metrics |= {
            "efficacy_score": fmean(c["edit"].log_prob > c["edit_true"].log_prob for c in after),
            "paraphrase_score": fmean(c["paraphrase"].log_prob > c["paraphrase_true"].log_prob for c in after),
            "neighborhood_score": fmean(c["neighbourhood"].log_prob > c["neighbourhood_new"].log_prob for c in after),
        }
    return metrics
