"""``EditSession``: a patch-set folder opened for editing, for users who fix mistakes as they are reported.

It loads the base model with its saved patches (or none yet), builds the memory the new patches must stay silent on
— the memory set plus every earlier edit in the folder's edit log (each in the prompt format it was made in), so a
patch made today does not fire on yesterday's fix — and after each edit appends to the log, with the session's
prompt format, so ``eval`` scores every fix as it was asked. ``save`` writes the adapter and the log atomically. A
session holds the folder's lock until it is closed: a second session on the same folder would save over the first
one's fixes. A session without a folder edits in memory only (``Patcher`` uses that until it is told where to save).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME

from transformer_patcher.core.atomic import check_plain_folder, recover_folder
from transformer_patcher.core.closable import Closable
from transformer_patcher.core.editor import EditRecord
from transformer_patcher.core.errors import InvalidExampleError
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.folder_lock import sibling_lock
from transformer_patcher.core.pretrained import cache_dir, load_model, model_kind, portable_name
from transformer_patcher.core.prompts import PromptFormat
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.core.wording import count
from transformer_patcher.data.benchmarks import embedded_memory, fever_benchmark, generation_memory
from transformer_patcher.data.questions import contrasts_over, memory_questions, memory_subjects
from transformer_patcher.data.rewordings import RelationRewordings, relation_rewordings
from transformer_patcher.experiments.registry import build_trainer, user_rewordings
from transformer_patcher.methods.patcher.config import EditConfig
from transformer_patcher.methods.patcher.memory import collect_queries
from transformer_patcher.methods.patcher.trainer import PatchTrainer
from transformer_patcher.tuners.patcher.config import PatcherConfig
from transformer_patcher.tuners.patcher.model import PatcherModel, get_patcher_model
from transformer_patcher.tuners.patcher.patch_set import edit_log_entry, read_edit_log, save_adapter_folder

AUTO = "auto"  # prompt format: chat for a decoder whose tokenizer has a chat template, raw otherwise
# EditConfig fields that shape a new patch set's adapter (EditConfig.adapter_config), fixed once the set exists
ADAPTER_OPTIONS = ("patch_activation", "gate_layer", "gate_depth", "gate_threshold")


@dataclass(frozen=True)
class MemoryInfo:
    """Which memory the new patches stay silent on: what ``edit`` reports before it edits."""

    name: str  # zsre, counterfact, fever or none
    source: str  # where its rows come from
    prompt_format: str
    rows: int  # query rows, earlier edits included
    earlier_edits: int

    def describe(self) -> str:
        if self.name == "none":
            return "memory: none (nothing keeps the new patches silent on other inputs)"
        earlier = f" (with {count(self.earlier_edits, 'earlier edit')})" if self.earlier_edits else ""
        rows = count(self.rows, "query row")
        return f"memory: {self.name} from {self.source}, {self.prompt_format} format, {rows}{earlier}"


def check_adapter_options(
    options: Mapping[str, Any], config: EditConfig, task_kind: str, loaded: PatcherConfig, folder: Path
) -> None:
    """Refuse an override of the adapter's own settings that the patch set in ``folder`` was made without: its
    neurons share one activation and one gate, so the override could not apply and would be silently dropped."""
    wanted = config.adapter_config(task_kind)
    clash = [name for name in ADAPTER_OPTIONS if name in options and getattr(wanted, name) != getattr(loaded, name)]
    if clash:
        held = ", ".join(f"{name}={getattr(loaded, name)!r}" for name in clash)
        raise ValueError(
            f"{folder} holds a patch set made with {held}; these settings shape a new patch set only "
            "(edit into a new folder to change them)"
        )


class EditSession(Closable):
    """Edit a model one request at a time and keep the result as a patch-set folder. Use it as a context manager
    (or call :meth:`close`) to release the folder's lock."""

    def __init__(
        self,
        trainer: PatchTrainer,
        folder: Path | None,
        log: list[dict[str, Any]],
        lock: ExitStack,
        memory: MemoryInfo,
    ) -> None:
        self.trainer = trainer
        self.folder = folder
        self.log = log
        self.memory = memory
        self._lock = lock

    def close(self) -> None:
        """Release the folder (unsaved edits are dropped)."""
        self._lock.close()

    @classmethod
    def open(
        cls,
        model: str,
        folder: str | os.PathLike[str] | None,
        memory: str | None = None,
        memory_rows: int = 10_000,
        question_rows: int = 20_000,
        schedule: str = "default",
        data_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        prompt_format: PromptFormat | str | None = None,
        edit_options: Mapping[str, Any] | None = None,
        rewordings: str | os.PathLike[str] | None = None,
    ) -> EditSession:
        """Load ``model`` (+ the patches in ``folder`` if it holds a patch set; None: edit in memory).

        ``memory``: ``zsre``/``counterfact`` (factual prompts and text), ``fever`` (claims), ``none``, or None for
        the task's default; without the shared data the package's embedded sample is used. ``prompt_format`` (raw,
        chat, a ``{text}`` template, or ``auto``: chat when the tokenizer has a chat template; see
        :mod:`~transformer_patcher.core.prompts`) is how the new fixes and the memory are asked; ``edit_options``
        override :class:`EditConfig` fields of the ``schedule``. A generator's memory also reads its own answers to
        ``question_rows`` rows' worth of questions (raw and chat), and each fix is contrasted with its question
        about other subjects (:mod:`~transformer_patcher.data.questions`). ``rewordings``: a JSON Lines file of how
        the user's own prompts get reworded (:func:`~transformer_patcher.data.rewordings.load_rewordings`), whose
        rewordings of a fix's prompt become views of the fix before the training set's (rule 20)."""
        folder = None if folder is None else Path(folder)
        if folder is not None and folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} is a file; a patch set is a folder")
        kind = model_kind(model)  # an unknown model is refused before anything is written
        config = EditConfig.mode(schedule, **dict(edit_options or {}))
        own = user_rewordings(rewordings, config, kind == "generation" and memory != "none")
        lock = ExitStack()
        if folder is not None:  # before reading: the folder must not change under us
            lock.enter_context(sibling_lock(folder))
        try:
            if folder is not None:  # a crash mid-save must not make this session start a new patch set over it
                recover_folder(folder, locked=True)
                check_plain_folder(folder)  # refused now, not after the edits: it could not be saved
            base, tokenizer = load_model(model, kind)
            auto = isinstance(prompt_format, str) and prompt_format == AUTO
            task = task_for_model(base, tokenizer, prompt_format=None if auto else prompt_format)
            if auto and task.kind == "causal_lm" and getattr(tokenizer, "chat_template", None):
                task = task.formatted("chat")  # how a deployed chat model is asked
            if folder is not None and (folder / CONFIG_NAME).is_file():
                wrapped = PatcherModel.from_pretrained(base, folder)
                check_adapter_options(edit_options or {}, config, task.kind, wrapped.peft_config["default"], folder)
                wrapped.peft_config["default"].base_model_name_or_path = portable_name(model)  # the fingerprint held
            else:
                wrapped = get_patcher_model(base, config.adapter_config(task.kind))
            choice, memory_pairs, validation_pairs, source = _memory_pairs(memory, kind, data_dir)
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
                rewordings=own.merged(relation_rewordings(data_dir) if subjects else RelationRewordings()) or None,
            )
            log = read_edit_log(folder) if folder is not None else []
            if trainer.memory is not None:  # earlier edits must stay untouched by new patches, in their own format
                for fmt, earlier in _by_format(log).items():
                    rows = collect_queries(
                        wrapped, trainer.layer, task.formatted(fmt), earlier, 10**9, progress=progress
                    )
                    trainer.memory.append(rows)
            rows = 0 if trainer.memory is None else len(trainer.memory)
            info = MemoryInfo(choice, source, task.prompt_format.name, rows, len(log) if rows else 0)
        except BaseException:
            lock.close()
            raise
        return cls(trainer, folder, log, lock, info)

    @property
    def num_patches(self) -> int:
        return self.trainer.layer.num_patches()

    def _next_id(self) -> int:
        ids = self.trainer.layer.edit_ids().tolist() + [e["edit_id"] for e in self.log]
        return max(ids, default=0) + 1

    def edit(
        self,
        text: str,
        target: str | int,
        subject: str | None = None,
        rephrases: tuple[str, ...] = (),
        keep: tuple[str, ...] = (),
    ) -> EditRecord:
        """Fix ``text`` → ``target`` if the model gets it wrong; a classifier's target is a label index. ``subject``
        (what the text is about) picks the contrasts and lets ``eval`` ask the same question of other subjects;
        ``rephrases`` are kept in the edit log; the new patches stay silent on the ``keep`` inputs."""
        target = self.coerce_target(target)
        if subject is not None and subject not in text:
            raise InvalidExampleError(f"the subject {subject!r} does not occur in the text {text!r}")
        example = EditExample(text, target, subject=subject, keep=tuple(keep))
        record = self.trainer.edit(example, edit_id=self._next_id())
        if record.needed:
            fmt = self.trainer.task.prompt_format.to_dict()
            self.log.append(edit_log_entry(record.edit_id, text, target, record.success, fmt, subject, rephrases))
        return record

    def coerce_target(self, target: str | int) -> str | int:
        """A classifier's target as its label index (``"1"`` from a command line included); others unchanged."""
        if self.trainer.task.kind != "classification":
            return target
        try:
            return int(target)
        except (TypeError, ValueError) as error:
            raise InvalidExampleError(f"a classifier's target must be a label index, got {target!r}") from error

    def annotate(self, edit_id: int, checks: dict[str, Any]) -> None:
        """Attach what was measured after an edit to its log entry."""
        for entry in self.log:
            if entry["edit_id"] == edit_id:
                entry["checks"] = checks

    def undo(self, edit_id: int) -> int:
        """Remove every neuron of ``edit_id`` and its log entry (saved with the next :meth:`save`); returns how many
        neurons went. Its queries stay in the memory: later patches keep staying silent on its text."""
        if edit_id not in self.edit_ids():
            raise KeyError(f"no edit with id {edit_id} (have {sorted(self.edit_ids())})")
        layer = self.trainer.layer
        removed = layer.remove_edit(edit_id) if edit_id in layer.edit_ids().tolist() else 0
        self.log = [e for e in self.log if e["edit_id"] != edit_id]
        return removed

    def edit_ids(self) -> set[int]:
        return set(self.trainer.layer.edit_ids().tolist()) | {e["edit_id"] for e in self.log}

    def save(self, folder: str | os.PathLike[str] | None = None) -> Path:
        """Write the adapter and the log into the session's folder (or ``folder``) in one atomic step."""
        target = self.folder if folder is None else Path(folder)
        if target is None:
            raise ValueError("this session has no patch folder; give save() one")
        if self.folder is not None and target.resolve() == self.folder.resolve():
            save_adapter_folder(self.trainer.model, self.folder, self.log)
            return self.folder
        if _occupied(target):  # refused before a lock file is written beside it
            raise FileExistsError(f"{target} already exists; save to a new folder or to the session's own")
        with sibling_lock(target):
            recover_folder(target, locked=True)  # a patch set a crash left moved aside is still one
            if _occupied(target):
                raise FileExistsError(f"{target} already exists; save to a new folder or to the session's own")
            save_adapter_folder(self.trainer.model, target, self.log)
        return target


def _occupied(folder: Path) -> bool:
    """Whether saving a new patch set to ``folder`` would overwrite something (an empty folder is free)."""
    return folder.exists() and not (folder.is_dir() and not any(folder.iterdir()))


def _by_format(log: list[dict[str, Any]]) -> dict[PromptFormat, list[tuple[str, Any]]]:
    """The logged edits' (text, target) pairs grouped by the prompt format they were made in (raw before formats)."""
    groups: dict[PromptFormat, list[tuple[str, Any]]] = {}
    for entry in log:
        groups.setdefault(PromptFormat.coerce(entry.get("prompt_format")), []).append((entry["text"], entry["target"]))
    return groups


def _memory_pairs(memory: str | None, kind: str, data_dir: Any) -> tuple[str, list, list, str]:
    """(name, memory pairs, validation pairs, where they come from) for a memory choice."""
    choice = memory or ("fever" if kind == "classification" else "zsre")
    if choice == "none":  # PatchTrainer warns
        return choice, [], [], "none"
    if choice == "fever":
        if kind != "classification":
            raise ValueError("FEVER memory is for classifiers; a generative model takes zsre/counterfact or none")
        try:
            benchmark = fever_benchmark(data_dir)
        except FileNotFoundError:  # the embedded sentences: any text the classifier reads keeps patches quiet
            memory, validation = embedded_memory()
            return choice, [(text, 0) for text, _ in memory], [(t, 0) for t, _ in validation], "embedded sample text"
        return choice, benchmark.memory, benchmark.validation, "FEVER claims in the data folder"
    if kind == "classification":
        raise ValueError(f"{choice} memory is for generative models; a classifier takes fever or none")
    memory, validation = generation_memory(data_dir)
    embedded = memory == embedded_memory()[0]  # generation_memory falls back when either shared file is missing
    source = (
        "the package's embedded sample" if embedded else "CounterFact-train facts and WikiText-2 in the data folder"
    )
    return choice, memory, validation, source
