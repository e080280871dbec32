"""``EditSession``: a patch-set folder opened for editing, for users who fix mistakes as they are reported.

It loads the base model with its saved patches (or none yet), builds the memory the new patches must stay silent on
— the memory set plus every earlier edit in the folder's edit log (each in the prompt format it was made in), so a
patch made today does not fire on yesterday's fix — and after each edit appends to the log, with the session's
prompt format, so ``eval`` scores every fix as it was asked. ``save`` writes the adapter and the log atomically. A
session holds the folder's lock until it is closed: a second session on the same folder would save over the first
one's fixes.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME

from .adapter.config import PatcherConfig
from .adapter.model import PatcherModel, get_patcher_model
from .adapter.patch_set import edit_log_entry, read_edit_log, save_adapter_folder
from .data.benchmarks import fever_benchmark, generation_memory
from .data.questions import contrasts_over, memory_questions, memory_subjects
from .editing.config import EditConfig
from .editing.memory import collect_queries
from .editing.prompts import PromptFormat
from .editing.registry import build_trainer
from .editing.tasks import EditExample, task_for_model
from .editing.trainer import EditRecord, PatchTrainer
from .errors import InvalidExampleError
from .folder_lock import sibling_lock
from .pretrained import cache_dir, load_model, model_kind


class EditSession:
    """Edit a model one request at a time and keep the result as a patch-set folder. Use it as a context manager
    (or call :meth:`close`) to release the folder's lock."""

    def __init__(self, trainer: PatchTrainer, folder: Path, log: list[dict[str, Any]], lock: ExitStack) -> None:
        self.trainer = trainer
        self.folder = folder
        self.log = log
        self._lock = lock

    def __enter__(self) -> EditSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder (unsaved edits are dropped)."""
        self._lock.close()

    @classmethod
    def open(
        cls,
        model: str,
        folder: str | os.PathLike[str],
        memory: str | None = None,
        memory_rows: int = 10_000,
        question_rows: int = 20_000,
        schedule: str = "default",
        data_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        prompt_format: PromptFormat | str | None = None,
    ) -> EditSession:
        """Load ``model`` (+ the patches in ``folder`` if it holds a patch set). ``memory``: ``zsre``/``counterfact``
        (factual prompts and text), ``fever`` (claims), ``none``, or None for the task's default. ``prompt_format``
        (raw, chat, a ``{text}`` template; see :mod:`~transformer_patcher.editing.prompts`) is how the new fixes and
        the memory are asked. A generator's memory also reads its own answers to ``question_rows`` rows' worth of
        questions (raw and chat), and each fix is contrasted with its question about other subjects
        (:mod:`~transformer_patcher.data.questions`)."""
        folder = Path(folder)
        lock = ExitStack()
        lock.enter_context(sibling_lock(folder))  # before reading: the folder must not change under us
        try:
            kind = model_kind(model)
            base, tokenizer = load_model(model, kind)
            config = EditConfig.mode(schedule)
            task = task_for_model(base, tokenizer, prompt_format=prompt_format)
            if (folder / CONFIG_NAME).is_file():
                wrapped = PatcherModel.from_pretrained(base, folder)
            else:
                wrapped = get_patcher_model(
                    base, PatcherConfig(patch_activation=config.patch_activation_for(task.kind))
                )
            memory_pairs, validation_pairs = _memory_pairs(memory, kind, data_dir)
            subjects = memory_subjects(data_dir) if memory_pairs and kind == "generation" else []
            trainer = build_trainer(
                wrapped,
                task,
                memory_pairs,
                validation_pairs,
                config,
                memory_rows,
                cache_dir=cache_dir() / "memory",
                progress=progress,
                questions=memory_questions(subjects),
                question_rows=question_rows,
                contrasts=contrasts_over(subjects),
            )
            log = read_edit_log(folder)
            if trainer.memory is not None:  # earlier edits must stay untouched by new patches, in their own format
                for fmt, earlier in _by_format(log).items():
                    rows = collect_queries(
                        wrapped, trainer.layer, task.formatted(fmt), earlier, 10**9, progress=progress
                    )
                    trainer.memory.append(rows)
        except BaseException:
            lock.close()
            raise
        return cls(trainer, folder, log, lock)

    @property
    def num_patches(self) -> int:
        return self.trainer.layer.num_patches()

    def _next_id(self) -> int:
        ids = self.trainer.layer.edit_ids().tolist() + [e["edit_id"] for e in self.log]
        return max(ids, default=0) + 1

    def edit(self, text: str, target: str | int, subject: str | None = None) -> EditRecord:
        """Fix ``text`` → ``target`` if the model gets it wrong; a classifier's target is a label index. ``subject``
        (what the text is about) lets ``eval`` ask the same question of other subjects."""
        if self.trainer.task.kind == "classification":
            try:
                target = int(target)
            except ValueError as error:
                raise InvalidExampleError(f"a classifier's target must be a label index, got {target!r}") from error
        if subject is not None and subject not in text:
            raise InvalidExampleError(f"the subject {subject!r} does not occur in the text {text!r}")
        record = self.trainer.edit(EditExample(text, target, subject=subject), edit_id=self._next_id())
        if record.needed:
            fmt = self.trainer.task.prompt_format.to_dict()
            self.log.append(edit_log_entry(record.edit_id, text, target, record.success, fmt, subject))
        return record

    def save(self) -> None:
        """Write the adapter and the log into the folder in one atomic step."""
        save_adapter_folder(self.trainer.model, self.folder, self.log)


def _by_format(log: list[dict[str, Any]]) -> dict[PromptFormat, list[tuple[str, Any]]]:
    """The logged edits' (text, target) pairs grouped by the prompt format they were made in (raw before formats)."""
    groups: dict[PromptFormat, list[tuple[str, Any]]] = {}
    for entry in log:
        groups.setdefault(PromptFormat.coerce(entry.get("prompt_format")), []).append((entry["text"], entry["target"]))
    return groups


def _memory_pairs(memory: str | None, kind: str, data_dir: Any) -> tuple[list, list]:
    choice = memory or ("fever" if kind == "classification" else "zsre")
    if choice == "none":
        return [], []
    if choice == "fever":
        if kind != "classification":
            raise ValueError("FEVER memory is for classifiers; a generative model takes zsre/counterfact or none")
        benchmark = fever_benchmark(data_dir)
        return benchmark.memory, benchmark.validation
    if kind == "classification":
        raise ValueError(f"{choice} memory is for generative models; a classifier takes fever or none")
    return generation_memory(data_dir)
