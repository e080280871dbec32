"""The sequential-model-editing (SME) runner: streams of mistakes fixed one after another, measured as in the paper.

Each fold is an independent stream that starts from the original model. An example is edited only when the current model
gets it wrong (paper eq. 1). After every edit the runner records SR/GR for that edit and checkpoints atomically; at
chosen edit counts (or after every edit) it measures ER on all earlier edits and TrainR/TestR/locality on the evaluation
sets, so one run yields the whole metrics-versus-edits curve. With an
:class:`~transformer_patcher.experiments.evaluation.EvaluationSuite` (made on the original model) every evaluation also
reports the suite's parts — unrelated and neighbouring questions, raw and chat, free generation, perplexity, EasyEdit's
measures — for the examples streamed so far.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from transformer_patcher.core.editor import Editor
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.scoring import Outcome, score_pairs
from transformer_patcher.experiments.evaluation import EvaluationSuite, flatten
from transformer_patcher.experiments.sme.run_state import load_checkpoint, save_checkpoint
from transformer_patcher.metrics.core import summarize

EVAL_SET_GROUPS = ("train", "test", "locality")
FOLD_ID_STRIDE = 1_000_000  # fold f numbers its edits from f * FOLD_ID_STRIDE + 1: ids stay unique across folds


def fold_edit_id(fold: int, index: int) -> int:
    """The edit id of a fold's ``index``-th example (0-based): 1-based within the fold, as ``edit`` numbers a patch
    set's edits, so ids read the same in a run's patch sets and in one made by hand."""
    return fold * FOLD_ID_STRIDE + index + 1


@dataclass
class SMEConfig:
    """How a run is measured. ``eval_at``: edit counts T at which to evaluate (the last edit is always evaluated);
    ``eval_every``: also evaluate after every N edits (1 = after each edit)."""

    eval_at: tuple[int, ...] = ()
    eval_every: int | None = None
    max_rephrases: int | None = 5  # official zsRE samples up to 5 rephrases per edit; None = all
    batch_size: int = 32
    seed: int = 42
    progress: bool = True


@dataclass
class FoldResult:
    fold: int
    records: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # {"edits": T, "metrics": {...}}

    @property
    def final(self) -> dict[str, float]:
        return self.evaluations[-1]["metrics"] if self.evaluations else {}


class SMERunner:
    """Drives an :class:`Editor` over streams of examples, with checkpoints and metrics."""

    def __init__(
        self,
        editor: Editor,
        eval_sets: dict[str, Sequence[tuple[str, Any]]] | None = None,
        config: SMEConfig | None = None,
        checkpoint_dir: str | Path | None = None,
        suite: EvaluationSuite | None = None,
    ) -> None:
        self.editor = editor
        self.config = config or SMEConfig()
        self.eval_sets = dict(eval_sets or {})
        unknown = sorted(set(self.eval_sets) - set(EVAL_SET_GROUPS))
        if unknown:
            raise ValueError(f"eval_sets keys must be among {EVAL_SET_GROUPS}, got {unknown}")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.suite = suite
        self._base: dict[str, list[Outcome]] | None = None

    # ------------------------------------------------------------------------------------------ streams
    def fold_indices(self, n_examples: int, n_folds: int) -> list[list[int]]:
        """Shuffle (seeded) the example indices and cut them into ``n_folds`` streams, as the paper splits the edit
        set."""
        if not 1 <= n_folds <= n_examples:
            raise ValueError(f"n_folds must be between 1 and the number of examples ({n_examples}), got {n_folds}")
        order = list(range(n_examples))
        random.Random(self.config.seed).shuffle(order)
        return [order[f::n_folds] for f in range(n_folds)]

    def folds(self, examples: Sequence[EditExample], n_folds: int) -> list[list[EditExample]]:
        """The examples of each fold's stream (see :meth:`fold_indices`)."""
        return [[examples[i] for i in fold] for fold in self.fold_indices(len(examples), n_folds)]

    def run(self, examples: Sequence[EditExample], n_folds: int = 1, resume: bool = False) -> list[FoldResult]:
        """Run every fold from the original model and return their results."""
        results = []
        for fold, indices in enumerate(self.fold_indices(len(examples), n_folds)):
            self.editor.reset()
            results.append(self.run_fold([examples[i] for i in indices], fold=fold, resume=resume, groups=indices))
        self.editor.reset()
        return results

    # --------------------------------------------------------------------------------------------- fold
    def run_fold(
        self,
        stream: Sequence[EditExample],
        fold: int = 0,
        resume: bool = False,
        groups: Sequence[int] | None = None,
    ) -> FoldResult:
        """Edit ``stream`` in order from the editor's current state; ``resume`` continues from a checkpoint.
        ``groups[i]`` is the suite group (the benchmark index) of ``stream[i]``; by default its position."""
        groups = list(range(len(stream))) if groups is None else list(groups)
        if len(groups) != len(stream):
            raise ValueError(f"{len(groups)} groups for a stream of {len(stream)} examples")
        result = FoldResult(fold)
        edited: list[int] = []
        position = 0
        name = f"fold-{fold}"
        if resume and self.checkpoint_dir is not None:
            saved = load_checkpoint(self.checkpoint_dir, name)
            if saved is not None:
                tensors, state = saved
                self.editor.load_state_tensors(tensors)
                position, edited = state["position"], state["edited"]
                result.records, result.evaluations = state["records"], state["evaluations"]
                self._base = _outcomes_from_json(state["base"])
        base = self._base_outcomes()
        due = set(self.config.eval_at)
        bar = tqdm(
            total=len(stream), initial=position, desc=f"fold {fold}", unit="ex", disable=not self.config.progress
        )
        try:
            for index in range(position, len(stream)):
                example = stream[index]
                record = self.editor.edit(example, edit_id=fold_edit_id(fold, index))
                row = record.to_dict() | {"index": index}
                if record.needed:
                    edited.append(index)
                    row |= self._post_edit(example)
                result.records.append(row)
                n_edits = len(edited)
                last = index == len(stream) - 1
                every = self.config.eval_every
                if (record.needed and (n_edits in due or (every and n_edits % every == 0))) or last:
                    started = time.perf_counter()
                    metrics = self._evaluate([stream[i] for i in edited], result.records, base, groups[: index + 1])
                    seconds = time.perf_counter() - started
                    evaluation = {"edits": n_edits, "examples": index + 1, "metrics": metrics, "seconds": seconds}
                    result.evaluations.append(evaluation)
                self._save(name, index + 1, edited, result, base)
                bar.update(1)
                bar.set_postfix(edits=n_edits, neurons=sum(r["neurons"] for r in result.records))
        finally:
            bar.close()
        return result

    def _post_edit(self, example: EditExample) -> dict[str, Any]:
        """SR and GR of one edit, measured right after it (paper eqs. 20–21)."""
        task, model = self.editor.task, self.editor.model
        rephrases = list(example.rephrases)
        if self.config.max_rephrases is not None and len(rephrases) > self.config.max_rephrases:
            rephrases = random.Random(self.config.seed).sample(rephrases, self.config.max_rephrases)
        pairs = [(example.text, example.target), *((text, example.target) for text in rephrases)]
        outcomes = score_pairs(model, task, pairs, self.config.batch_size)
        return {"edit_correct": outcomes[0].correct, "rephrase_correct": [o.correct for o in outcomes[1:]]}

    def _base_outcomes(self) -> dict[str, list[Outcome]]:
        """Pre-edit outcomes of the evaluation sets (the same original model for every fold)."""
        if self._base is None:
            self._base = {
                group: score_pairs(self.editor.model, self.editor.task, pairs, self.config.batch_size)
                for group, pairs in self.eval_sets.items()
            }
        return self._base

    def _evaluate(
        self,
        edited: list[EditExample],
        records: list[dict[str, Any]],
        base: dict[str, list[Outcome]],
        seen: Sequence[int],
    ) -> dict[str, float]:
        groups: list[str] = []
        predictions: list[str] = []
        references: list[str] = []
        base_predictions: list[str] = []
        correct_tokens: list[int] = []
        total_tokens: list[int] = []

        def add(group: str, outcomes: Iterable[Outcome], before: Iterable[Outcome] | None = None) -> None:
            for i, outcome in enumerate(outcomes):
                groups.append(group)
                predictions.append(outcome.prediction)
                references.append(outcome.reference)
                base_predictions.append(before[i].prediction if before is not None else outcome.prediction)
                correct_tokens.append(outcome.correct_tokens)
                total_tokens.append(outcome.total_tokens)

        def add_flags(group: str, flags: list[bool]) -> None:
            add(group, [Outcome(flag, str(int(flag)), "1", int(flag), 1) for flag in flags])

        task, model, size = self.editor.task, self.editor.model, self.config.batch_size
        needed = [r for r in records if r["needed"]]
        add_flags("edit", [r["edit_correct"] for r in needed])
        add_flags("rephrase", [flag for r in needed for flag in r["rephrase_correct"]])
        if edited:
            add("retain", score_pairs(model, task, [(e.text, e.target) for e in edited], size))
        for group, pairs in self.eval_sets.items():
            add(group, score_pairs(model, task, pairs, size), base[group])
        metrics = (
            summarize(groups, predictions, references, base_predictions, correct_tokens, total_tokens) if groups else {}
        )
        metrics = {k: v for k, v in metrics.items() if not k.startswith(("edit_", "rephrase_"))}
        if self.suite is not None:
            metrics |= flatten(self.suite.evaluate(groups=seen))
        metrics["edits"] = len(needed)
        metrics["neurons"] = sum(r["neurons"] for r in records)
        return metrics

    def _save(self, name: str, position: int, edited: list[int], result: FoldResult, base: dict) -> None:
        if self.checkpoint_dir is None:
            return
        state = {
            "position": position,
            "edited": edited,
            "records": result.records,
            "evaluations": result.evaluations,
            "base": {group: [o.__dict__ for o in outcomes] for group, outcomes in base.items()},
        }
        save_checkpoint(self.checkpoint_dir, name, self.editor.state_tensors(), state)


def _outcomes_from_json(data: dict[str, list[dict[str, Any]]]) -> dict[str, list[Outcome]]:
    return {group: [Outcome(**item) for item in items] for group, items in data.items()}
