"""``Patcher``: fix a deployed model's mistakes in one call each, check what else changed, and keep the fixes.

    fixer = Patcher.from_pretrained("smollm2-135m", patches="fixes/")
    report = fixer.fix("Who is the mayor of Munich?", "Dieter Reiter", locality=["Who is the mayor of Paris?"])
    fixer.generate("Who is the mayor of Munich?")
    fixer.save()

It is the front door over :class:`~transformer_patcher.experiments.session.EditSession` (the ``edit`` command's engine):
the model is loaded by short name, Hub id or folder; the default memory (embedded in the package when the shared data is
absent) is built once per model and prompt format and cached; a chat model is asked through its chat template. Each
``fix`` reports what a user would check by hand: whether the answer is now the target, whether its rephrases are, and
whether the answers to the locality prompts stayed the same. ``edit`` takes EasyEdit's arguments and returns its metric
layout, so EasyEdit scripts can switch over. ``fixer.model`` is a plain ``PeftModel`` for anything else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from transformer_patcher.core.closable import Closable
from transformer_patcher.core.decoding import greedy_continuations
from transformer_patcher.core.errors import InvalidExampleError
from transformer_patcher.core.modes import eval_mode
from transformer_patcher.core.scoring import Outcome, score_pairs
from transformer_patcher.core.tasks import Task, position_limit
from transformer_patcher.experiments.session import AUTO, EditSession, MemoryInfo


@dataclass
class FixReport:
    """What one ``fix`` did. ``edit_id`` is None when the model already gave the target (nothing was added)."""

    edit_id: int | None
    prompt: str
    target: str | int
    needed: bool
    success: bool  # the model now gives the target (greedy, for generators)
    answer: str  # its answer to the prompt after the fix
    rephrases: dict[str, bool] = field(default_factory=dict)  # rephrase -> gives the target
    locality: dict[str, bool] = field(default_factory=dict)  # prompt -> its answer is unchanged
    neurons: int = 0
    steps: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Patcher(Closable):
    """A model opened for fixing, with its patch set. Use :meth:`from_pretrained`; close it (or use ``with``) to
    release the patch folder's lock."""

    def __init__(self, session: EditSession) -> None:
        self.session = session

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        patches: str | os.PathLike[str] | None = None,
        *,
        prompt_format: str = AUTO,
        memory: str | None = None,
        memory_rows: int = 10_000,
        question_rows: int = 20_000,
        schedule: str = "default",
        data_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        edit_options: Mapping[str, Any] | None = None,
        rewordings: str | os.PathLike[str] | None = None,
    ) -> Patcher:
        """Load ``model`` (short name such as ``smollm2-135m``, Hub id or local folder) with the patch set in
        ``patches`` (created on :meth:`save` if it does not exist yet; None: keep the fixes in memory until
        ``save(path)``). ``prompt_format``: ``auto`` (chat when the tokenizer has a chat template), ``raw``, ``chat``
        or a ``{text}`` template. The other arguments are :meth:`EditSession.open`'s."""
        session = EditSession.open(
            model,
            patches,
            memory=memory,
            memory_rows=memory_rows,
            question_rows=question_rows,
            schedule=schedule,
            data_dir=data_dir,
            progress=progress,
            prompt_format=prompt_format,
            edit_options=edit_options,
            rewordings=rewordings,
        )
        return cls(session)

    # ------------------------------------------------------------------------------------------ accessors
    @property
    def model(self) -> Any:
        """The patched model: a plain ``PeftModel``."""
        return self.session.trainer.model

    @property
    def task(self) -> Task:
        return self.session.trainer.task

    @property
    def tokenizer(self) -> Any:
        return self.task.tokenizer

    @property
    def memory(self) -> MemoryInfo:
        """Which memory new patches stay silent on."""
        return self.session.memory

    @property
    def edits(self) -> list[dict[str, Any]]:
        """The edit log: one entry per fix, with what was checked after it."""
        return list(self.session.log)

    def close(self) -> None:
        """Release the patch folder (unsaved fixes are dropped)."""
        self.session.close()

    # -------------------------------------------------------------------------------------------- fixing
    def fix(
        self,
        prompt: str,
        target: str | int,
        *,
        rephrases: Sequence[str] = (),
        locality: Sequence[str] = (),
        subject: str | None = None,
    ) -> FixReport:
        """Make the model answer ``prompt`` with ``target`` (a label index for classifiers), then check that each
        of ``rephrases`` gets the target too and that each ``locality`` prompt's answer did not change. The new
        patches are also built to stay silent on the ``locality`` prompts. ``subject`` (what the prompt is about, a
        substring of it) lets the patch contrast the prompt with the same question about other subjects. Invalid
        input raises before anything changes."""
        rephrases, locality = self._texts(rephrases, "rephrase"), self._texts(locality, "locality prompt")
        self._texts([prompt], "prompt")
        target = self.session.coerce_target(target)
        before = self._answers(locality)
        record = self.session.edit(prompt, target, subject, tuple(rephrases), keep=tuple(locality))
        after = self._answers(locality)
        report = FixReport(
            edit_id=record.edit_id if record.needed else None,
            prompt=prompt,
            target=target,
            needed=record.needed,
            success=record.success,
            answer=self._answers([prompt])[0],
            rephrases={text: o.correct for text, o in zip(rephrases, self._score(rephrases, target), strict=True)},
            locality={text: b == a for text, b, a in zip(locality, before, after, strict=True)},
            neurons=record.neurons,
            steps=record.steps,
            seconds=record.seconds,
        )
        if record.needed:
            self.session.annotate(record.edit_id, {"rephrases": report.rephrases, "locality": report.locality})
        return report

    def generate(
        self, prompt: str | Sequence[str], max_new_tokens: int = 64, prompt_format: str | None = None
    ) -> str | list[str]:
        """The model's greedy answer to ``prompt`` (or to each of a list), asked in the patcher's prompt format or
        in ``prompt_format`` (``raw``, ``chat``, a ``{text}`` template); a classifier's answer is its predicted label
        index."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        task = self.task if prompt_format is None else self.task.formatted(prompt_format)
        answers = self._answers(self._texts(prompts, "prompt"), max_new_tokens, task)
        return answers[0] if isinstance(prompt, str) else answers

    def undo(self, edit_id: int) -> int:
        """Remove one fix (all its neurons); returns how many neurons went. Saved with the next :meth:`save`."""
        return self.session.undo(edit_id)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the patch set (adapter, edit log, model card) atomically into the patch folder, or into ``path``
        (a new folder); returns where it went."""
        return self.session.save(path)

    # ------------------------------------------------------------------------------------ EasyEdit shape
    def edit(
        self,
        prompts: str | Sequence[str],
        target_new: str | Sequence[str],
        ground_truth: str | Sequence[str] | None = None,
        rephrase_prompts: str | Sequence[str] | None = None,
        locality_inputs: Mapping[str, Mapping[str, Any]] | None = None,
        subject: str | Sequence[str] | None = None,
        sequential_edit: bool = True,
    ) -> list[dict[str, Any]]:
        """EasyEdit's ``BaseEditor.edit`` arguments and per-case metrics (``pre``/``post`` with ``rewrite_acc``,
        ``rephrase_acc``, ``locality`` as ``<name>_acc``, ``time``, ``requested_rewrite``). Accuracies are
        EasyEdit's token-level teacher-forced ones; locality is the share of the locality answer's tokens whose
        prediction is unchanged. ``sequential_edit=True`` (this method's default) keeps every edit and measures
        after the last; ``False`` (EasyEdit's default) measures each edit alone and undoes it."""
        prompts = _as_list(prompts)
        n = len(prompts)
        targets = [self.session.coerce_target(t) for t in _aligned(target_new, n, "target_new")]
        truths = _aligned(ground_truth, n, "ground_truth")
        rephrased = _aligned(rephrase_prompts, n, "rephrase_prompts")
        subjects = _aligned(subject, n, "subject")
        locality = {
            name: (_aligned(part.get("prompt"), n, f"{name} prompt"), _aligned(part.get("ground_truth"), n, name))
            for name, part in (locality_inputs or {}).items()
        }
        self._texts(prompts, "prompt")
        self._texts([r for r in rephrased if r is not None], "rephrase")
        cases = [self._case(i, prompts, targets, truths, rephrased, subjects, locality) for i in range(n)]
        pre = [self._side(case["requested_rewrite"]) for case in cases]  # also validates every target
        for case, (metrics, _) in zip(cases, pre, strict=True):
            case["pre"] = metrics
        for case, (_, reference) in zip(cases, pre, strict=True):
            rewrite = case["requested_rewrite"]
            started = time.perf_counter()
            record = self.session.edit(rewrite["prompt"], rewrite["target_new"], rewrite["subject"])
            case["time"] = time.perf_counter() - started
            case["edit_id"] = record.edit_id if record.needed else None
            if not sequential_edit:
                case["post"] = self._side(rewrite, reference)[0]
                if record.needed:
                    self.session.undo(record.edit_id)
        if sequential_edit:
            for case, (_, reference) in zip(cases, pre, strict=True):
                case["post"] = self._side(case["requested_rewrite"], reference)[0]
        return cases

    def _case(
        self,
        i: int,
        prompts: list[str],
        targets: list[Any],
        truths: list[Any],
        rephrased: list[Any],
        subjects: list[Any],
        locality: dict[str, tuple[list[Any], list[Any]]],
    ) -> dict[str, Any]:
        loc = {name: {"prompt": p[i], "ground_truth": g[i]} for name, (p, g) in locality.items() if p[i] is not None}
        for name, part in loc.items():
            self._texts([part["prompt"]], f"{name} prompt")
            if part["ground_truth"] is None:
                raise InvalidExampleError(f"locality_inputs[{name!r}] needs a ground_truth for case {i}")
        return {
            "case_id": i,
            "requested_rewrite": {
                "prompt": prompts[i],
                "target_new": targets[i],
                "ground_truth": truths[i],
                "rephrase_prompt": rephrased[i],
                "subject": subjects[i],
                "locality": loc,
                "portability": {},
            },
        }

    def _side(
        self, rewrite: dict[str, Any], reference: dict[str, tuple[int, ...]] | None = None
    ) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
        """One side of an EasyEdit case and its locality predictions; with the pre side's predictions as
        ``reference``, locality is the share of them unchanged."""
        target = rewrite["target_new"]
        metrics: dict[str, Any] = {"rewrite_acc": [self._score([rewrite["prompt"]], target)[0].token_acc]}
        if rewrite["rephrase_prompt"] is not None:
            metrics["rephrase_acc"] = [self._score([rewrite["rephrase_prompt"]], target)[0].token_acc]
        predicted = {
            name: self._score([part["prompt"]], part["ground_truth"])[0].predicted_ids
            for name, part in rewrite["locality"].items()
        }
        metrics["locality"] = (
            {}
            if reference is None
            else {f"{name}_acc": [_agreement(reference[name], now)] for name, now in predicted.items()}
        )
        metrics["portability"] = {}
        return metrics, predicted

    # ---------------------------------------------------------------------------------------------- helpers
    def _texts(self, texts: Sequence[str], what: str) -> list[str]:
        """``texts`` as a list, each refused (one clear error, nothing changed) unless the task can read it."""
        if isinstance(texts, str):
            raise InvalidExampleError(f"give the {what}s as a list of strings, not one string")
        texts = list(texts)
        for text in texts:
            self.task.check_text(text, f"the {what}")
        return texts

    def _score(self, prompts: Sequence[str], target: Any) -> list[Outcome]:
        return score_pairs(self.model, self.task, [(p, target) for p in prompts]) if prompts else []

    def _answers(self, prompts: Sequence[str], max_new_tokens: int = 32, task: Task | None = None) -> list[str]:
        """Greedy answers as a user reads them (a classifier's: the predicted label index)."""
        if not prompts:
            return []
        task = task or self.task
        if task.kind == "classification":
            return [o.prediction for o in self._score(prompts, 0)]
        if task.kind != "causal_lm":
            return _seq2seq_answers(self.model, task, prompts, max_new_tokens)
        encoded = [task.prompt_tokens(p) for p in prompts]
        limit = position_limit(self.model.get_base_model().config)  # a longer sequence would not run
        room = max_new_tokens if limit is None else min(max_new_tokens, limit - max(map(len, encoded)))
        if room < 1:
            raise InvalidExampleError(f"the prompt fills the model's {limit} positions; nothing can be generated")
        tokens = greedy_continuations(self.model, encoded, task.prompter.stop_ids, room, task.pad_id)
        return [task.decode(t) for t in tokens]


def _seq2seq_answers(model: Any, task: Task, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    inputs = task.tokenizer([task.prompter.render(p) for p in prompts], return_tensors="pt", padding=True)
    with eval_mode(model), torch.no_grad():  # dropout off, as for the causal LMs' greedy_continuations
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return task.tokenizer.batch_decode(output, skip_special_tokens=True)


def _agreement(before: tuple[int, ...], after: tuple[int, ...]) -> float:
    return sum(a == b for a, b in zip(before, after, strict=True)) / len(before) if before else 1.0


def _as_list(value: str | Sequence[Any]) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def _aligned(value: Any, n: int, name: str) -> list[Any]:
    """One value per case: None for all, a single string for a single case, or a list of ``n``."""
    if value is None:
        return [None] * n
    values = _as_list(value)
    if len(values) != n:
        raise InvalidExampleError(f"{name} has {len(values)} entries for {n} prompts")
    return values
