"""Model-editing metrics as pure functions over python values, so they can score predictions from any model or loop.

- The SME metrics of Transformer-Patcher (Huang et al., ICLR 2023, eqs. 20–24): a prediction counts as correct when
  it equals the reference after :func:`normalize_answer`, which is how the official T-Patcher code compares generated
  answers (``pred.lower().strip() == target``).
- Token agreement (:func:`token_agreement`): the *exact* and *token-level* measures of the locality suite (pre- vs
  post-edit tokens) and EasyEdit's teacher-forced accuracies (predicted vs target tokens).
- Perplexity and its relative change (:func:`perplexity`, :func:`relative_change`): general ability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Sized

Reference = str | Sequence[str]
"""One reference: a single answer, or every acceptable answer for the item."""

GROUPS = ("edit", "rephrase", "retain", "train", "test", "locality")
"""Row tags understood by :func:`summarize`."""

_NEEDS_BASE = ("train", "test", "locality")


def _check_columns(**columns: Sized) -> int:
    """Return the shared length of ``columns``; raise if the first is empty or any length differs from it."""
    (first_name, first), *rest = columns.items()
    if len(first) == 0:
        raise ValueError(f"{first_name} is empty")
    for name, column in rest:
        if len(column) != len(first):
            raise ValueError(f"length mismatch: {first_name} has {len(first)} items but {name} has {len(column)}")
    return len(first)


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values)


def normalize_answer(text: str) -> str:
    """Lower-case, strip and collapse whitespace, so formatting noise in generated text does not count as a mistake."""
    return " ".join(text.lower().split())


def _matches(prediction: str, reference: Reference, normalize: bool) -> bool:
    candidates = [reference] if isinstance(reference, str) else reference
    if normalize:
        return normalize_answer(prediction) in {normalize_answer(c) for c in candidates}
    return prediction in candidates


def exact_match(predictions: Sequence[str], references: Sequence[Reference], normalize: bool = True) -> float:
    """Fraction of predictions equal to their reference (or to any of a list of acceptable references).

    Editing benchmarks score each example as simply right or wrong, so this is the building block of SR, GR and ER.
    """
    _check_columns(predictions=predictions, references=references)
    return _mean([_matches(p, r, normalize) for p, r in zip(predictions, references, strict=True)])


def success_rate(correct: Sequence[bool | int]) -> float:
    """Mean of 0/1 outcomes: SR (edits fixed), GR (rephrasings fixed) and ER (earlier edits still fixed)."""
    _check_columns(correct=correct)
    if any(c not in (0, 1) for c in correct):
        raise ValueError("correct must hold only booleans or 0/1")
    return _mean([bool(c) for c in correct])


def retention_ratio(after_correct: Sequence[bool | int], before_correct: Sequence[bool | int]) -> float:
    """TrainR/TestR: accuracy after the edits divided by accuracy before them, on the same examples.

    A ratio rather than a raw accuracy, so a value of 1 means editing cost nothing whatever the base model's accuracy.
    """
    _check_columns(after_correct=after_correct, before_correct=before_correct)
    before = success_rate(before_correct)
    if before == 0:
        raise ValueError(
            "retention_ratio is undefined: the model got none of these examples right before editing; "
            "measure locality (agreement with the pre-edit predictions) instead"
        )
    return success_rate(after_correct) / before


def locality(predictions: Sequence[str], base_predictions: Sequence[str], normalize: bool = True) -> float:
    """Fraction of predictions unchanged from the pre-edit model's, whether or not those were right.

    Measures side effects of editing on unrelated inputs even where no gold answer exists or the base model was wrong.
    """
    return exact_match(predictions, base_predictions, normalize=normalize)


def token_accuracy(correct_tokens: Sequence[int], total_tokens: Sequence[int]) -> float:
    """Micro-averaged teacher-forced token accuracy: ``sum(correct) / sum(total)``.

    Micro-averaging weights every target token equally, so long targets are not drowned out by short ones.
    """
    _check_columns(correct_tokens=correct_tokens, total_tokens=total_tokens)
    if any(not 0 <= c <= t for c, t in zip(correct_tokens, total_tokens, strict=True)):
        raise ValueError("each correct_tokens count must lie between 0 and its total_tokens count")
    total = sum(total_tokens)
    if total == 0:
        raise ValueError("total_tokens sums to 0: no tokens to score")
    return sum(correct_tokens) / total


def summarize(
    groups: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Reference],
    base_predictions: Sequence[str] | None = None,
    correct_tokens: Sequence[int] | None = None,
    total_tokens: Sequence[int] | None = None,
) -> dict[str, float]:
    """All SME metrics of one evaluation table whose rows are tagged with a group from :data:`GROUPS`.

    Returns only the keys whose group has rows: ``SR`` (edit), ``GR`` (rephrase), ``ER`` (retain), ``TrainR`` (train),
    ``TestR`` (test), ``locality`` and ``locality_acc`` (locality), plus ``<group>_token_acc`` per group when token
    counts are given (rows with 0 tokens are skipped). ``base_predictions``, the pre-edit model's outputs, are needed
    for the train, test and locality groups.
    """
    columns: dict[str, Sized] = {"groups": groups, "predictions": predictions, "references": references}
    optional = {"base_predictions": base_predictions, "correct_tokens": correct_tokens, "total_tokens": total_tokens}
    _check_columns(**columns, **{name: column for name, column in optional.items() if column is not None})
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; allowed groups are {list(GROUPS)}")
    if (correct_tokens is None) != (total_tokens is None):
        raise ValueError("correct_tokens and total_tokens must be given together")
    if base_predictions is None and any(g in _NEEDS_BASE for g in groups):
        raise ValueError(f"base_predictions are required when the table has rows of group {list(_NEEDS_BASE)}")

    rows = {g: [i for i, row_group in enumerate(groups) if row_group == g] for g in GROUPS}

    def pick(column: Sequence, group: str) -> list:
        return [column[i] for i in rows[group]]

    result: dict[str, float] = {}
    for key, group in (("SR", "edit"), ("GR", "rephrase"), ("ER", "retain")):
        if rows[group]:
            result[key] = exact_match(pick(predictions, group), pick(references, group))
    if base_predictions is not None:
        for key, group in (("TrainR", "train"), ("TestR", "test")):
            if rows[group]:
                refs = pick(references, group)
                after = [_matches(p, r, True) for p, r in zip(pick(predictions, group), refs, strict=True)]
                before = [_matches(b, r, True) for b, r in zip(pick(base_predictions, group), refs, strict=True)]
                try:
                    result[key] = retention_ratio(after, before)
                except ValueError as err:
                    raise ValueError(f"{key} (group {group!r}): {err}") from err
        if rows["locality"]:
            result["locality"] = locality(pick(predictions, "locality"), pick(base_predictions, "locality"))
            result["locality_acc"] = exact_match(pick(predictions, "locality"), pick(references, "locality"))
    if correct_tokens is not None and total_tokens is not None:
        for group in GROUPS:
            scored = [i for i in rows[group] if total_tokens[i] > 0]
            if scored:
                result[f"{group}_token_acc"] = token_accuracy(
                    [correct_tokens[i] for i in scored], [total_tokens[i] for i in scored]
                )
    return result


def row_agreement(predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> list[float]:
    """Per row, the fraction of predicted tokens equal to the reference's (1.0: the row agrees exactly)."""
    _check_columns(predictions=predictions, references=references)
    fractions = []
    for row, (predicted, reference) in enumerate(zip(predictions, references, strict=True)):
        if len(predicted) != len(reference) or not reference:
            raise ValueError(
                f"row {row}: {len(predicted)} predicted tokens for {len(reference)} reference tokens; each row needs "
                "one prediction per (at least one) reference token"
            )
        fractions.append(sum(int(p) == int(r) for p, r in zip(predicted, reference, strict=True)) / len(reference))
    return fractions


def token_agreement(predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> dict[str, float]:
    """``exact``: the fraction of rows whose tokens all equal their reference's; ``token``: the mean over rows of the
    fraction of equal tokens (each row weighs the same, as EasyEdit averages its per-example accuracies).

    With the post-edit argmax tokens as predictions and the pre-edit ones as references this is the locality suite's
    pair of measures (exact = the greedy output is unchanged); with target tokens as references it is EasyEdit's
    rewrite/rephrase accuracy (token) and our SR/GR (exact).
    """
    fractions = row_agreement(predictions, references)
    return {"exact": _mean([f == 1.0 for f in fractions]), "token": sum(fractions) / len(fractions)}


def perplexity(log_probs: Sequence[float]) -> float:
    """``exp(-mean log p)`` over every scored token: the model's perplexity on a text."""
    _check_columns(log_probs=log_probs)
    if not all(math.isfinite(value) and value <= 0 for value in log_probs):
        raise ValueError("log_probs must be finite log-probabilities (<= 0)")
    return math.exp(-sum(log_probs) / len(log_probs))


def relative_change(after: float, before: float) -> float:
    """``after / before - 1``: e.g. +0.02 is a 2 % higher perplexity after editing."""
    if not (math.isfinite(after) and math.isfinite(before)) or before <= 0:
        raise ValueError(f"relative_change needs finite values and before > 0, got after={after}, before={before}")
    return after / before - 1
