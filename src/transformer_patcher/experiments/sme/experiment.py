"""One SME experiment end to end: a model and a benchmark by name → folds edited → results, patch sets and plots.

Folds are independent streams, so they are spread over processes: under ``accelerate launch --num_processes N`` each
process runs folds ``rank, rank + N, …`` (the paper ran 20 folds on 8 GPUs). Every finished fold is written to its own
JSON file at once; the main process assembles ``results.json`` and ``results.md`` once all have finished, and
``resume`` skips finished folds and continues an interrupted one from its last checkpoint.

Output folder::

    results.json  results.md  metrics.png  locality.png  latency.png
    folds/fold-K.json        per-fold records and evaluations
    patches/fold-K/          the fold's patch set or weight delta (PEFT adapter folder; T-Patcher, PMET, MEMIT)
    heatmaps/fold-K.png      patch × edit activations (T-Patcher only)
    checkpoints/             resumable state of unfinished folds, and the suite's reference (pre-edit outputs)
    .lock                    held by the run while it works (a second run on the folder is refused)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file

from transformer_patcher.core.atomic import save_safetensors_atomic, write_text_atomic
from transformer_patcher.core.editor import Editor
from transformer_patcher.core.folder_lock import folder_lock
from transformer_patcher.core.pretrained import cache_dir, load_model, model_config
from transformer_patcher.core.prompts import PromptFormat
from transformer_patcher.core.tasks import position_limit, task_for_model
from transformer_patcher.core.validation import check_int, check_options
from transformer_patcher.data.benchmarks import BENCHMARKS, Benchmark
from transformer_patcher.data.loaders import ZSRE_TARGETS, load_neighbours, load_questions
from transformer_patcher.data.rewordings import RelationRewordings
from transformer_patcher.experiments.evaluation import EvaluationSuite, SuiteConfig, benchmark_parts
from transformer_patcher.experiments.plots import (
    activation_heatmap,
    latency_histogram,
    metrics_curve,
    patch_activations,
)
from transformer_patcher.experiments.registry import (
    DISPLAY_NAMES,
    EDITOR_NAMES,
    MASS_EDITORS,
    build_editor,
    user_rewordings,
)
from transformer_patcher.experiments.sme.report import markdown_table, suite_table, summarize_folds
from transformer_patcher.experiments.sme.runner import SMEConfig, SMERunner
from transformer_patcher.methods.baselines import FineTuneConfig
from transformer_patcher.methods.patcher.config import EditConfig
from transformer_patcher.methods.patcher.replay import ForwardReplay
from transformer_patcher.methods.patcher.trainer import PatchTrainer
from transformer_patcher.methods.pmet import pmet_hparams
from transformer_patcher.tuners.patcher.patch_set import edit_log_entry, save_adapter_folder

logger = logging.getLogger(__name__)
SCHEDULES = ("default", "faithful", "quick", "official")  # official: faithful's earlier name
SUITE_REFERENCE = "suite-reference.safetensors"
SUITE_CURVES = tuple(
    f"{part}-{fmt}.exact" for part in ("unrelated", "neighbours", "subject", "generation") for fmt in ("raw", "chat")
)
ADAPTER_EDITORS = ("patcher", *MASS_EDITORS)  # editors whose edits are a saved adapter (patches or weight deltas)


@dataclass
class ExperimentConfig:
    """What to run. ``data`` is a benchmark name (``zsre``, ``counterfact``, ``fever``) or a file of that
    ``data_kind``; ``schedule`` names the editing mode (:meth:`EditConfig.mode`: default, faithful, quick)."""

    model: str
    data: str = "zsre"
    data_kind: str | None = None
    editor: str = "patcher"
    folds: int = 1
    max_examples: int | None = None
    memory_rows: int = 10_000
    question_rows: int = 20_000  # generators: memory rows over the model's own answers to memory questions
    validation_rows: int = 1_000
    schedule: str = "default"
    eval_every: int | None = None
    seed: int = 42
    batch_size: int = 32
    data_dir: str | None = None
    edit_options: dict[str, Any] = field(default_factory=dict)  # EditConfig overrides (T-Patcher)
    finetune_options: dict[str, Any] = field(default_factory=dict)  # FineTuneConfig overrides (FT baselines)
    pmet_options: dict[str, Any] = field(default_factory=dict)  # PMET preset + PMETHyperParams overrides
    prompt_format: str = "raw"  # how edits, memory and evaluation sets are asked: raw, chat or a "{text}" template
    append_eos: bool = False  # raw/template answers end with EOS (chat answers always end their turn)
    zsre_target: str = "answers"  # "alt": EasyEdit's zsRE convention
    suite: str = "full"  # the evaluation suite at every evaluation: full, small or none
    suite_options: dict[str, Any] = field(default_factory=dict)  # SuiteConfig overrides (sizes, your own files)
    layer_index: int = -1  # T-Patcher: the block whose FFN is patched (-1: the last, the paper's)
    rewordings_file: str | None = None  # T-Patcher: how the user's prompts get reworded (load_rewordings), rule 20

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        kind = self.data if self.data in BENCHMARKS else self.data_kind
        if kind not in BENCHMARKS:
            raise ValueError(
                f"data {self.data!r} is not a benchmark name ({', '.join(BENCHMARKS)}); for a file, give data_kind"
            )
        fmt = self.format()
        if kind == "fever" and (fmt.kind == "chat" or fmt.append_eos):
            raise ValueError(f"FEVER is read by a classifier: prompt_format {fmt.name!r} does not apply to it")
        if self.zsre_target not in ZSRE_TARGETS:
            raise ValueError(f"zsre_target must be one of {ZSRE_TARGETS}, got {self.zsre_target!r}")
        check_options("suite", self.suite_options, {f.name for f in fields(SuiteConfig)})
        SuiteConfig.preset("full", **self.suite_options)  # bad sizes fail here, whatever the preset
        if self.suite_options.get("locality_file") is not None:
            load_questions(self.suite_options["locality_file"])  # a bad file fails before anything is loaded
        if self.suite_options.get("neighbour_file") is not None:
            load_neighbours(self.suite_options["neighbour_file"])
        if self.editor not in EDITOR_NAMES:
            raise ValueError(f"unknown editor {self.editor!r}; choose one of {', '.join(EDITOR_NAMES)}")
        for name in ("folds", "memory_rows", "validation_rows", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("question_rows", self.question_rows, minimum=0)
        check_int("layer_index", self.layer_index)
        for name in ("max_examples", "eval_every"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        for name in ("edit_options", "finetune_options", "pmet_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {getattr(self, name)!r}")
        check_options("edit", self.edit_options, {f.name for f in fields(EditConfig)})
        check_options("fine-tuning", self.finetune_options, {f.name for f in fields(FineTuneConfig)})
        self.own_rewordings()  # invalid overrides and a bad rewordings file fail here, before anything is loaded
        replace(FineTuneConfig(), **self.finetune_options)

        pmet_hparams(**self.pmet_options)

    def own_rewordings(self) -> RelationRewordings:
        """The user's rewordings (an empty bank without a file), checked against this run's editor and settings."""
        applies = self.editor == "patcher" and self.model_kind == "generation"
        return user_rewordings(self.rewordings_file, self.edit_config(), applies)

    @property
    def kind(self) -> str:
        return self.data if self.data in BENCHMARKS else str(self.data_kind)

    @property
    def model_kind(self) -> str:
        """What the benchmark needs the model to be: a classifier (FEVER) or a generator."""
        return "classification" if self.kind == "fever" else "generation"

    def format(self) -> PromptFormat:
        return PromptFormat(self.prompt_format, self.append_eos)

    def suite_config(self) -> SuiteConfig | None:
        return SuiteConfig.preset(self.suite, **{"batch_size": self.batch_size, **self.suite_options})

    def edit_config(self) -> EditConfig:
        options = {"seed": self.seed, **self.edit_options}
        return EditConfig.mode(self.schedule, **options)


def load_benchmark(config: ExperimentConfig) -> Benchmark:
    builder = BENCHMARKS[config.kind]
    path = None if config.data in BENCHMARKS else config.data
    if config.kind == "fever":
        if config.data != "fever":
            raise ValueError("FEVER runs read the two FEVER files from data_dir; pass data='fever'")
        benchmark = builder(config.data_dir, seed=config.seed)
    elif config.kind == "zsre":
        benchmark = builder(path, config.data_dir, target=config.zsre_target)
    else:
        benchmark = builder(path, config.data_dir)
    return benchmark.head(config.max_examples).formatted(config.format())


def config_editor(
    config: ExperimentConfig,
    benchmark: Benchmark,
    model: torch.nn.Module,
    task: Any,
    progress: bool = True,
    edit_config: EditConfig | None = None,
    contrasted: bool = True,
) -> Editor:
    """The editor an SME run of ``config`` builds over ``model``: its memory, questions and (unless not
    ``contrasted``) contrasts from ``benchmark``; ``edit_config`` replaces ``config.edit_config()``."""
    return build_editor(
        config.editor,
        model,
        task,
        benchmark.memory,
        benchmark.validation,
        edit_config or config.edit_config(),
        memory_rows=config.memory_rows,
        validation_rows=config.validation_rows,
        cache_dir=cache_dir() / "memory",
        progress=progress,
        finetune_options=config.finetune_options,
        pmet_options=config.pmet_options,
        questions=benchmark.questions,
        question_rows=config.question_rows,
        contrasts=benchmark.contrasts() if contrasted else None,
        layer_index=config.layer_index,
        rewordings=config.own_rewordings().merged(benchmark.rewordings),
    )


def run_experiment(
    config: ExperimentConfig, out_dir: str | os.PathLike[str], resume: bool = False, progress: bool = True
) -> dict[str, Any] | None:
    """Run every fold this process owns; on the main process return the assembled results (None elsewhere).
    The folder is locked while this runs: a second run on it raises FolderLockedError."""
    model_config(config.model)  # an unknown model is refused before the folder is locked or written
    state = PartialState()
    with folder_lock(out_dir, rank=state.process_index):
        return _run_experiment(config, Path(out_dir), resume, progress, state)


def _run_experiment(
    config: ExperimentConfig, out: Path, resume: bool, progress: bool, state: PartialState
) -> dict[str, Any] | None:
    _check_resume(config, out, resume)
    state.wait_for_everyone()  # every process has checked before the main one claims the folder
    benchmark = load_benchmark(config)
    model, tokenizer = load_model(config.model, config.model_kind)
    task = task_for_model(model, tokenizer, prompt_format=benchmark.prompt_format)
    editor = config_editor(config, benchmark, model, task, progress and state.is_local_main_process)
    sme = SMEConfig(eval_every=config.eval_every, batch_size=config.batch_size, seed=config.seed, progress=progress)
    suite = _suite(config, benchmark, editor, out, resume, progress and state.is_local_main_process, state)
    runner = SMERunner(editor, benchmark.eval_sets, sme, checkpoint_dir=out / "checkpoints", suite=suite)
    streams = runner.fold_indices(len(benchmark.examples), config.folds)
    _claim_folder(config, out, state)
    for fold in range(state.process_index, config.folds, state.num_processes):
        fold_file = out / "folds" / f"fold-{fold}.json"
        if resume and fold_file.is_file():
            continue
        editor.reset()
        stream = [benchmark.examples[i] for i in streams[fold]]
        result = runner.run_fold(stream, fold=fold, resume=resume, groups=streams[fold])
        if config.editor in ADAPTER_EDITORS:
            _save_patches(editor, task, stream, result.records, out, fold)
        write_text_atomic(fold_file, json.dumps(asdict(result), indent=1))
    editor.reset()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return assemble(out, config, benchmark)


def _suite(
    config: ExperimentConfig,
    benchmark: Benchmark,
    editor: Editor,
    out: Path,
    resume: bool,
    progress: bool,
    state: PartialState,
) -> EvaluationSuite | None:
    """The evaluation suite over the original model (before any fold edits it), or None when the run asks for none
    or the model is not a causal LM. Its reference is saved with the checkpoints, so a resumed run reuses it."""
    suite_config = config.suite_config()
    if suite_config is None or editor.task.kind != "causal_lm":
        return None
    limit = position_limit(editor.model.config)
    parts = benchmark_parts(editor.task, benchmark, suite_config, config.data_dir, limit)  # type: ignore[arg-type]
    saved = out / "checkpoints" / SUITE_REFERENCE
    reference = load_file(str(saved)) if resume and saved.is_file() else None
    replay = ForwardReplay(editor.model, editor.layer) if isinstance(editor, PatchTrainer) else None
    suite = EvaluationSuite(
        editor.model, parts, editor.task.pad_id, suite_config.batch_size, replay, progress, state=reference
    )
    if reference is None and state.is_main_process:
        save_safetensors_atomic(suite.state_tensors(), saved)
    return suite


def assemble(out: Path, config: ExperimentConfig, benchmark: Benchmark) -> dict[str, Any]:
    """Collect the fold files into ``results.json``, ``results.md`` and the metric plots."""

    folds = [json.loads((out / "folds" / f"fold-{k}.json").read_text()) for k in range(config.folds)]
    summary = summarize_folds(folds)
    results = {
        "config": asdict(config),
        "editor": DISPLAY_NAMES[config.editor],
        "benchmark": benchmark.name,
        "notes": benchmark.notes,
        "summary": summary,
        "folds": folds,
    }
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    table = markdown_table([{"editor": results["editor"], **summary}])
    notes = "".join(f"- {metric}: {text}\n" for metric, text in benchmark.notes.items())
    suite = suite_table(summary)
    suite = f"\n## Evaluation suite (final evaluation, mean over folds)\n\n{suite}" if suite else ""
    write_text_atomic(out / "results.md", f"# {benchmark.name}: {config.model}\n\n{table}\n{notes}{suite}")
    if any(fold["evaluations"] for fold in folds):
        _try_plot(metrics_curve, folds, out / "metrics.png")
        if suite:
            suite_curve = partial(
                metrics_curve, metrics=SUITE_CURVES, title="Evaluation suite: unchanged greedy outputs"
            )
            _try_plot(suite_curve, folds, out / "locality.png")
    if summary["edits"]:
        _try_plot(latency_histogram, folds, out / "latency.png")
    return results


def _try_plot(plot: Any, folds: list[dict[str, Any]], path: Path) -> None:
    try:
        plot(folds, path)
    except ValueError as error:  # e.g. a single evaluation point or no metric defined: the results still stand
        logger.warning("skipped %s: %s", path.name, error)


def _save_patches(editor: Any, task: Any, stream: list, records: list[dict[str, Any]], out: Path, fold: int) -> None:
    """The fold's patch set and its activation heatmap over the fold's edited inputs."""

    needed = [r for r in records if r["needed"]]
    edited = [stream[r["index"]] for r in needed]
    fmt = task.prompt_format.to_dict()
    log = [
        edit_log_entry(r["edit_id"], e.text, e.target, r["success"], fmt, e.subject, e.rephrases)
        for r, e in zip(needed, edited, strict=True)
    ]
    # one atomic step, so `info` can say what each patch fixes and later `edit`s keep it in memory
    save_adapter_folder(editor.model, out / "patches" / f"fold-{fold}", log)
    if not edited or not hasattr(editor.model.base_model, "patch_layer"):
        return
    if editor.model.base_model.patch_layer().num_patches() == 0:
        return
    activations, edit_ids = patch_activations(editor.model, task, edited)
    activation_heatmap(activations, out / "heatmaps" / f"fold-{fold}.png", edit_ids=edit_ids)


def _check_resume(config: ExperimentConfig, out: Path, resume: bool) -> None:
    """Refuse to mix runs: a folder holds one configuration; resuming needs the same one."""
    saved = out / "config.json"
    if saved.is_file():
        if not resume:
            raise FileExistsError(f"{out} already holds a run; pass resume=True (--resume) or use another folder")
        if json.loads(saved.read_text()) != json.loads(json.dumps(asdict(config))):
            raise ValueError(f"{out} holds a run with another configuration; resume needs the same settings")
    torch.manual_seed(config.seed)


def _claim_folder(config: ExperimentConfig, out: Path, state: PartialState) -> None:
    """Mark ``out`` as holding this run, once everything it needs has loaded (a failed start leaves no trace)."""
    if state.is_main_process:
        write_text_atomic(out / "config.json", json.dumps(asdict(config), indent=1, sort_keys=True))
    state.wait_for_everyone()


def run_comparison(
    config: ExperimentConfig,
    editors: Sequence[str],
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> list[dict[str, Any]] | None:
    """The same experiment once per editor (``out_dir/<editor>/``), then one table across editors in
    ``out_dir/results.md`` and ``out_dir/results.json``. Returns the per-editor results on the main process."""
    out = Path(out_dir)
    runs = []
    for editor in editors:
        results = run_experiment(replace(config, editor=editor), out / editor, resume=resume, progress=progress)
        if results is not None:
            runs.append(results)
    if not PartialState().is_main_process:
        return None
    rows = [{"editor": r["editor"], **r["summary"]} for r in runs]
    notes = "".join(f"- {metric}: {text}\n" for metric, text in runs[0]["notes"].items()) if runs else ""
    header = f"# {runs[0]['benchmark']}: {config.model}\n\n" if runs else ""
    footer = f"\nCommand: `{command}`\n" if command else ""
    write_text_atomic(out / "results.md", header + markdown_table(rows) + "\n" + notes + footer)
    write_text_atomic(out / "results.json", json.dumps({"command": command, "rows": rows}, indent=1))
    return runs
