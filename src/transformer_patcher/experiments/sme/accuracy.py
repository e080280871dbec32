"""Accuracy of a model on a benchmark's sets, with and without a patch set: the ``eval`` command's table."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.core.validation import check_int
from transformer_patcher.experiments.sme.experiment import ExperimentConfig, load_benchmark
from transformer_patcher.tuners.patcher.model import PatcherModel


def evaluate_benchmark(
    model: str,
    data: str,
    data_kind: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    max_examples: int | None = None,
    patches: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    prompt_format: str = "raw",
    append_eos: bool = False,
    zsre_target: str = "answers",
) -> list[dict[str, Any]]:
    """Rows ``base`` (and ``patched`` when ``patches`` is given): exact-match accuracy on the edit inputs, their
    rephrases and every evaluation set, plus agreement with the base model on the locality set, every input asked in
    ``prompt_format``."""
    config = ExperimentConfig(
        model=model,
        data=data,
        data_kind=data_kind,
        max_examples=max_examples,
        data_dir=data_dir and str(data_dir),
        prompt_format=prompt_format,
        append_eos=append_eos,
        zsre_target=zsre_target,
        suite="none",
    )
    check_int("batch_size", batch_size, minimum=1)
    benchmark = load_benchmark(config)
    if not benchmark.examples:  # FEVER's edits are half of paper_test's claims that paper_dev lacks: maybe none
        raise ValueError(f"{data}: the benchmark has no edit examples to score")
    base, tokenizer = load_model(model, config.model_kind)
    sets = {"edit": [(e.text, e.target) for e in benchmark.examples]}
    rephrases = [(text, e.target) for e in benchmark.examples for text in e.rephrases]
    if rephrases:
        sets["rephrase"] = rephrases
    sets |= benchmark.eval_sets
    task = task_for_model(base, tokenizer, prompt_format=benchmark.prompt_format)
    rows = []
    base_locality = None
    variants = [("base", base)]
    if patches is not None:
        variants.append(("patched", None))
    bar = tqdm(total=len(variants) * sum(map(len, sets.values())), desc="scoring", unit="pair", disable=not progress)
    for name, variant in variants:
        if variant is None:
            variant = PatcherModel.from_pretrained(base, patches)
        row: dict[str, Any] = {"model": name}
        for group, pairs in sets.items():
            bar.set_postfix(model=name, set=group)
            outcomes = score_pairs(variant, task, pairs, batch_size)
            bar.update(len(pairs))
            row[group] = sum(o.correct for o in outcomes) / len(outcomes)
            if group == "locality":
                predictions = [o.prediction for o in outcomes]
                base_locality = base_locality or predictions
                row["locality_agreement"] = sum(a == b for a, b in zip(predictions, base_locality, strict=True)) / len(
                    outcomes
                )
        rows.append(row)
    bar.close()
    return rows
