"""Editors by name: ``patcher`` (Transformer-Patcher), the four fine-tuning baselines of the paper, and ``pmet`` with
its MEMIT-style ablation ``memit`` (decoder-only LMs, one example per SME step).

One place that turns a name from a command line or a results table into a ready editor over a base model, with its
memory banks built (and cached) from the benchmark's memory pairs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from transformer_patcher.core.editor import Editor
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.tasks import Task
from transformer_patcher.data.rewordings import RelationRewordings, load_rewordings
from transformer_patcher.methods.baselines import FineTuneConfig, FineTuneEditor
from transformer_patcher.methods.patcher.config import EditConfig
from transformer_patcher.methods.patcher.contexts import TokenContexts
from transformer_patcher.methods.patcher.gate_frame import frame_prompts, read_gate_frame
from transformer_patcher.methods.patcher.memory import build_memory
from transformer_patcher.methods.patcher.subjects import ContrastPool, SubjectIndex
from transformer_patcher.methods.patcher.trainer import PatchTrainer
from transformer_patcher.methods.patcher.views import EditViews, Rewordings
from transformer_patcher.methods.pmet import PMETEditor, pmet_hparams
from transformer_patcher.tuners.patcher.config import PatcherConfig
from transformer_patcher.tuners.patcher.model import get_patcher_model

FINE_TUNE_EDITORS = {
    "ft-last": FineTuneConfig(scope="last"),
    "ft-all": FineTuneConfig(scope="all"),
    "ft-last-kl": FineTuneConfig(scope="last", kl=True),
    "ft-all-kl": FineTuneConfig(scope="all", kl=True),
}
MASS_EDITORS = {"pmet": "PMET", "memit": "MEMIT (ablation)"}
EDITOR_NAMES = ("patcher", *FINE_TUNE_EDITORS, *MASS_EDITORS)
DISPLAY_NAMES = (
    {"patcher": "T-Patcher"} | {name: config.name for name, config in FINE_TUNE_EDITORS.items()} | MASS_EDITORS
)


def user_rewordings(path: str | os.PathLike[str] | None, config: EditConfig, applies: bool) -> RelationRewordings:
    """A user's rewordings file (:func:`~transformer_patcher.data.rewordings.load_rewordings`), read and checked
    before a model loads; an empty bank without one. It is refused where it could change nothing: its rewordings are
    views of T-Patcher's solved keys on a generator with a memory (``applies``), which another schedule or
    ``key_views``/``relation_views`` off do without."""
    if path is None:
        return RelationRewordings()
    if not applies or config.init != "solve" or not config.key_views or not config.relation_views:
        raise ValueError(
            "a rewordings file adds views to T-Patcher's solved keys on a generator (the default schedule, with "
            "key_views, relation_views and a memory); these settings have none, so it would change nothing"
        )
    return load_rewordings(path)


def build_editor(
    name: str,
    model: nn.Module,
    task: Task,
    memory_pairs: Sequence[tuple[str, Any]] = (),
    validation_pairs: Sequence[tuple[str, Any]] = (),
    edit_config: EditConfig | None = None,
    memory_rows: int = 10_000,
    validation_rows: int = 1_000,
    cache_dir: str | os.PathLike[str] | None = None,
    patcher_config: PatcherConfig | None = None,
    progress: bool = True,
    finetune_options: dict[str, Any] | None = None,
    pmet_options: dict[str, Any] | None = None,
    questions: Sequence[str] = (),
    question_rows: int = 0,
    contrasts: Callable[[EditExample], Sequence[str]] | None = None,
    layer_index: int = -1,
    rewordings: Rewordings | None = None,
) -> Editor:
    """Build editor ``name`` over the base ``model``. ``patcher`` wraps it with the patch adapter (its ``.model`` is
    the wrapped model); the fine-tuning editors edit the base model's weights in place, with ``finetune_options``
    overriding :class:`FineTuneConfig` fields (e.g. a smaller ``kl_batch`` on a CPU); ``pmet``/``memit`` wrap it with
    a weight-delta adapter, their key statistics computed (and cached) from the memory texts, with ``pmet_options``
    naming a ``preset`` and overriding :class:`~transformer_patcher.methods.pmet.PMETHyperParams` fields.
    ``layer_index`` picks the block whose FFN T-Patcher patches (-1: the last, the paper's) when ``patcher_config``
    is not given; ``rewordings`` words an edit's relation as a training set does (``EditConfig.relation_views``)."""
    if name not in EDITOR_NAMES:
        raise ValueError(f"unknown editor {name!r}; choose one of {', '.join(EDITOR_NAMES)}")
    if name in MASS_EDITORS:
        hparams = pmet_hparams(variant=name, **(pmet_options or {}))
        texts = [f"{text} {target}" for text, target in memory_pairs]
        stats_dir = None if cache_dir is None else os.path.join(os.fspath(cache_dir), "pmet")
        return PMETEditor(model, task.tokenizer, hparams, texts, task=task, cache_dir=stats_dir, progress=progress)
    if name in FINE_TUNE_EDITORS:
        config = replace(FINE_TUNE_EDITORS[name], **(finetune_options or {}))
        return FineTuneEditor(model, task, config, memory_pairs=memory_pairs)
    patcher_config = patcher_config or (edit_config or EditConfig()).adapter_config(task.kind, layer_index)
    wrapped = get_patcher_model(model, patcher_config)
    return build_trainer(
        wrapped,
        task,
        memory_pairs,
        validation_pairs,
        edit_config,
        memory_rows,
        validation_rows,
        cache_dir,
        progress,
        questions,
        question_rows,
        contrasts,
        rewordings,
    )


def build_trainer(
    wrapped: nn.Module,
    task: Task,
    memory_pairs: Sequence[tuple[str, Any]] = (),
    validation_pairs: Sequence[tuple[str, Any]] = (),
    edit_config: EditConfig | None = None,
    memory_rows: int = 10_000,
    validation_rows: int = 1_000,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    questions: Sequence[str] = (),
    question_rows: int = 0,
    contrasts: Callable[[EditExample], Sequence[str]] | None = None,
    rewordings: Rewordings | None = None,
) -> PatchTrainer:
    """A :class:`PatchTrainer` over an already patch-wrapped model, its memory banks built (and cached) from pairs;
    a generator's memory also reads its own answers to ``questions`` (at most ``question_rows`` rows), and with
    ``EditConfig.relation_views`` an edit's views include its relation worded by ``rewordings``."""
    layer = wrapped.base_model.patch_layer()
    asked = questions if task.kind == "causal_lm" else ()
    banks = {}
    for tag, pairs, rows, extra in (
        ("memory", memory_pairs, memory_rows, question_rows),
        ("validation", validation_pairs, validation_rows, 0),
    ):
        banks[tag] = (
            build_memory(
                wrapped,
                layer,
                task,
                pairs,
                rows,
                cache_dir,
                tag,
                progress=progress,
                questions=asked,
                question_rows=extra,
            )
            if pairs
            else None
        )
    config = edit_config or EditConfig()
    gate = layer.gate_reads()
    if gate is not None and config.gate_frame and layer.gate_frame() is None and not layer.has_gated_patches():
        texts = [f"{text} {target}" for text, target in memory_pairs]
        prompts = frame_prompts(task, texts, asked)
        if prompts:
            layer.set_gate_frame(read_gate_frame(wrapped, gate, task, prompts, progress=progress))
    contexts = subjects = None
    if task.kind == "causal_lm" and config.init == "solve" and config.token_contexts and memory_pairs:
        texts = [f"{text} {target}" for text, target in memory_pairs]
        contexts = TokenContexts.from_texts(task.tokenizer, texts, per_token=config.token_contexts)
    if config.init == "solve" and config.nearest_contrasts and isinstance(contrasts, ContrastPool):
        subjects = SubjectIndex.from_model(wrapped, task.tokenizer, contrasts.subjects)
    views = None
    if task.kind == "causal_lm" and config.init == "solve" and config.key_views and banks["memory"] is not None:
        related = rewordings if config.relation_views else None
        views = EditViews.from_model(wrapped, task.tokenizer, config.key_views, config.subject_first_views, related)
    return PatchTrainer(
        wrapped,
        task,
        config,
        memory=banks["memory"],
        val_memory=banks["validation"],
        contrasts=contrasts,
        contexts=contexts,
        subjects=subjects,
        views=views,
    )
