"""Batch-editing experiments: N facts written at once, judged with ROME-style scores (CounterFact, zsRE).

For each editor and batch size ``b`` the first ``cases`` records are cut into batches of ``b``. In the default
``independent`` mode every batch is edited from the original model and scored right after (so batch size 1 is
``cases`` independent single edits). PMET and its MEMIT ablation edit a batch in one closed-form update; T-Patcher
edits the batch's facts one after another (its sequential protocol), which is the comparison on the same cases the
paper's tables make. In ``sequential`` mode the batches are written one after another into the same model and a
record follows each batch (:mod:`.sequential_batches`).

Independent mode: target vectors depend only on the original model and the request, so they are computed once per
variant for all cases, saved (``targets-<editor>.safetensors``) and reused by every batch size — as the official code
caches them. Each (editor, batch size) result is written as soon as it is done (``parts/``), so an interrupted run
resumes; sequential mode resumes from the checkpoint after its last batch.

Output folder: ``results.json``, ``results.md``, ``before.json`` (pre-edit outcomes), ``parts/``, ``targets-*``
(independent), ``checkpoints/`` and ``suite-reference.safetensors`` (sequential).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean, median
from typing import Any

from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from transformer_patcher.core.atomic import save_safetensors_atomic, write_text_atomic
from transformer_patcher.core.editor import Editor
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.folder_lock import folder_lock
from transformer_patcher.core.pretrained import cache_dir, check_device, load_model, model_config, resolve_device
from transformer_patcher.core.prompts import PromptFormat
from transformer_patcher.core.scoring import Outcome
from transformer_patcher.core.tasks import CausalLMTask, position_limit
from transformer_patcher.core.validation import check_options
from transformer_patcher.data.benchmarks import BENCHMARKS, wikitext_texts
from transformer_patcher.data.loaders import ZSRE_SAMPLE, ZSRE_TARGETS, find_data_file, load_counterfact, load_zsre
from transformer_patcher.data.suite_data import suite_sources
from transformer_patcher.experiments.evaluation import EvaluationSuite, SuiteConfig, locality_parts
from transformer_patcher.experiments.registry import DISPLAY_NAMES, MASS_EDITORS, build_editor
from transformer_patcher.experiments.sme.fact_scores import FactCase, fact_metrics, score_cases
from transformer_patcher.experiments.sme.report import FACT_COLUMNS, FACT_EXTRAS, markdown_table
from transformer_patcher.experiments.sme.saved_targets import read_saved_targets, saved_targets
from transformer_patcher.experiments.sme.sequential_batches import (
    SequentialJob,
    batch_slices,
    decay_table,
    part_file,
    run_sequential,
)
from transformer_patcher.methods.patcher.config import EditConfig
from transformer_patcher.methods.pmet import EditRequest, PMETEditor, Targets, pmet_hparams

BATCH_EDITORS = ("pmet", "memit", "patcher")
STATS_TEXTS = 2000
MODES = ("independent", "sequential")
# Where a sequential run's mass-editor targets come from: each batch's model as it finds it, or the original model.
SEQUENTIAL_TARGETS = ("current", "original")
# The suite's sizes a batch run may set: only free generation and perplexity are asked (general ability), as the
# fact scores already measure the edits' neighbourhood.
SUITE_OPTIONS = ("generation", "generation_tokens", "perplexity_tokens", "window", "formats", "batch_size")
SUITE_REFERENCE = "suite-reference.safetensors"
# Settings added after run folders were written: a folder without them ran with these values, and still resumes.
ADDED_SETTINGS: dict[str, Any] = {
    "mode": "independent",
    "suite": "small",
    "suite_options": {},
    "sequential_targets": "current",
}
# Fields that say how a run is carried out, not what it computes: left out of the saved settings, so a run folder
# resumes whatever their values (a run started on the CPU may continue on a GPU).
RUN_ONLY = ("device",)


@dataclass
class BatchExperimentConfig:
    """What to run: ``data`` is ``counterfact``, ``zsre`` or a file of that ``data_kind``."""

    model: str
    data: str = "counterfact"
    data_kind: str | None = None
    data_dir: str | None = None
    cases: int = 100
    batch_sizes: tuple[int, ...] = (1, 10, 100)
    editors: tuple[str, ...] = ("pmet", "memit")
    pmet_options: dict[str, Any] = field(default_factory=dict)  # preset + PMETHyperParams overrides
    edit_options: dict[str, Any] = field(default_factory=dict)  # EditConfig overrides (T-Patcher)
    memory_rows: int = 10_000
    seed: int = 42
    prompt_format: str = "raw"  # how the cases are asked when scored (and edited, by T-Patcher)
    append_eos: bool = False
    zsre_target: str = "answers"  # "alt": EasyEdit's zsRE convention
    mode: str = "independent"  # "sequential": batches one after another into the same model (sequential_batches)
    suite: str = "small"  # sequential mode's general ability after each batch: full, small or none
    suite_options: dict[str, Any] = field(default_factory=dict)  # SuiteConfig sizes (SUITE_OPTIONS)
    # "original": every sequential batch writes targets optimised on the unedited model (one cache for all batches)
    sequential_targets: str = "current"
    device: str = "auto"  # where the model runs: auto (CUDA when available), cpu, cuda or cuda:N (RUN_ONLY)

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        self.editors = tuple(self.editors)
        check_device(self.device)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.sequential_targets not in SEQUENTIAL_TARGETS:
            raise ValueError(f"sequential_targets must be one of {SEQUENTIAL_TARGETS}, got {self.sequential_targets!r}")
        if self.sequential_targets != "current" and self.mode != "sequential":
            raise ValueError(
                "sequential_targets applies to mode 'sequential' only (independent batches always "
                "write targets optimised on the unedited model)"
            )
        check_options("suite", self.suite_options, SUITE_OPTIONS)
        self.suite_config()  # bad sizes fail before anything loads
        if self.data not in BENCHMARKS and self.data_kind is None:
            raise ValueError(f"data {self.data!r} is a file: say what it holds with --data-kind counterfact or zsre")
        if self.kind not in ("counterfact", "zsre"):
            raise ValueError(f"batch experiments use counterfact or zsre data, got {self.data!r}")
        if self.zsre_target not in ZSRE_TARGETS:
            raise ValueError(f"zsre_target must be one of {ZSRE_TARGETS}, got {self.zsre_target!r}")
        mass = sorted(set(self.editors) & set(MASS_EDITORS))
        if self.format().kind != "raw" and mass:
            raise ValueError(
                f"{', '.join(mass)} write facts from raw prompts (their context templates are raw-text prefixes); "
                f"prompt_format {self.format().name!r} is supported for the patcher editor only"
            )
        unknown = sorted(set(self.editors) - set(BATCH_EDITORS))
        if unknown or not self.editors:
            raise ValueError(f"editors must be among {BATCH_EDITORS}, got {list(self.editors)}")
        if self.cases < 1 or not self.batch_sizes or any(b < 1 or b > self.cases for b in self.batch_sizes):
            raise ValueError(f"need cases >= 1 and batch sizes in [1, cases]; got {self.cases}, {self.batch_sizes}")
        EditConfig.quick(**self.edit_options)  # bad T-Patcher options fail before anything loads

        pmet_hparams(**self.pmet_options)  # and bad PMET options

    @classmethod
    def from_folder(cls, folder: Path) -> BatchExperimentConfig:
        """The settings a run folder was written with (its ``config.json``; the run-only fields at their defaults)."""
        return cls(**{**ADDED_SETTINGS, **json.loads((folder / "config.json").read_text())})

    @property
    def kind(self) -> str:
        return self.data if self.data in BENCHMARKS else str(self.data_kind)

    def format(self) -> PromptFormat:
        return PromptFormat(self.prompt_format, self.append_eos)

    def suite_config(self) -> SuiteConfig | None:
        """The general-ability suite: free generation and perplexity only (no unrelated or neighbour questions)."""
        return SuiteConfig.preset(self.suite, **self.suite_options, unrelated=0, neighbours=0)


def load_cases(config: BatchExperimentConfig) -> list[FactCase]:
    named = config.data in BENCHMARKS
    if config.kind == "counterfact":
        rows = load_counterfact(
            find_data_file("counterfact/counterfact-edit-1k.json", config.data_dir) if named else config.data
        )
    else:
        rows = load_zsre(ZSRE_SAMPLE if config.data == "zsre" else config.data, target=config.zsre_target)
    if len(rows) < config.cases:
        more = ""
        if named and config.kind == "counterfact":
            more = " (counterfact/counterfact-edit.json holds 10,000: pass its path as --data, --data-kind counterfact)"
        raise ValueError(f"{config.data} has {len(rows)} records, fewer than cases={config.cases}{more}")
    return [FactCase.from_row(rows[i]) for i in range(config.cases)]


def run_batch_experiment(
    config: BatchExperimentConfig, out_dir: str | os.PathLike[str], progress: bool = True, command: str | None = None
) -> dict[str, Any]:
    """Run every (editor, batch size) not finished in ``out_dir/parts`` (sequential mode: continue after the last
    checkpointed batch) and write the combined results. The folder is locked while this runs: a second run on it
    raises FolderLockedError."""
    model_config(config.model)  # an unknown model is refused before the folder is locked or written
    resolve_device(config.device)  # and so is a device this machine lacks
    with folder_lock(out_dir):
        return _run_batch_experiment(config, Path(out_dir), progress, command)


def _run_batch_experiment(
    config: BatchExperimentConfig, out: Path, progress: bool, command: str | None
) -> dict[str, Any]:
    saved = out / "config.json"
    settings = {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in RUN_ONLY}
    if saved.is_file() and {**ADDED_SETTINGS, **json.loads(saved.read_text())} != settings:
        raise ValueError(f"{out} holds a batch experiment with other settings; use another folder")
    cases = load_cases(config)
    write_text_atomic(saved, json.dumps(settings, indent=1, sort_keys=True))
    before: list[dict[str, Outcome]] | None = _read_before(out / "before.json")
    for editor_name in config.editors:
        missing = [b for b in config.batch_sizes if not _done(out, config, editor_name, b)]
        if not missing:
            continue
        model, tokenizer = load_model(config.model, "generation", device=config.device)
        task = CausalLMTask(tokenizer, prompt_format=config.format())
        if before is None:
            before = score_cases(model, task, cases, progress="scoring the unedited model" if progress else None)
            write_text_atomic(out / "before.json", json.dumps([{k: asdict(o) for k, o in c.items()} for c in before]))
        job = _Job(config, editor_name, model, task, cases, out, progress)
        editor, edit = (_mass_editor if editor_name in MASS_EDITORS else _patcher_editor)(job)
        if config.mode == "independent":
            _run_sizes(editor, edit, job, before, missing)
            continue
        setting = _null_space_setting(config, editor_name)
        sequential = SequentialJob(
            editor_name, editor, edit, task, cases, before, out, _suite(job, editor), setting, progress
        )
        for size in missing:
            run_sequential(sequential, size)
    return assemble_batch(out, config, cases, command)


def _done(out: Path, config: BatchExperimentConfig, name: str, size: int) -> bool:
    """Whether (editor, batch size) is finished: its part, or in sequential mode the part after its last batch."""
    if config.mode == "sequential":
        return part_file(out, name, size, len(batch_slices(config.cases, size))).is_file()
    return (out / "parts" / f"{name}-b{size}.json").is_file()


@dataclass
class _Job:
    """One editor's share of a batch experiment."""

    config: BatchExperimentConfig
    name: str
    model: nn.Module
    task: CausalLMTask
    cases: Sequence[FactCase]
    out: Path
    progress: bool


def stats_texts(config: BatchExperimentConfig) -> list[str]:
    """The texts the mass editors' key statistics are read from (and cached under): WikiText-2 validation passages,
    or the benchmark's memory text where WikiText-2 is not installed."""
    try:
        return wikitext_texts("valid", config.data_dir)[:STATS_TEXTS]
    except FileNotFoundError:
        return [f"{a} {b}" for a, b in BENCHMARKS[config.kind](None, config.data_dir).memory]


def _mass_editor(job: _Job) -> tuple[Editor, Callable[[list[int]], float]]:
    config, name = job.config, job.name
    hparams = pmet_hparams(variant=name, **config.pmet_options)
    texts = stats_texts(config)
    tokenizer = job.task.tokenizer
    stats = cache_dir() / "pmet"
    editor = PMETEditor(job.model, tokenizer, hparams, texts, task=job.task, cache_dir=stats, progress=job.progress)
    requests = [EditRequest(c.prompt, c.subject, c.target) for c in job.cases]
    if config.mode == "sequential" and config.sequential_targets == "current":  # on the model each batch finds
        # The first batch finds the model unedited, so targets saved by an independent run of these cases are its own.
        saved, first_only = read_saved_targets(job.out, name, len(requests)), True
    else:
        saved, first_only = _original_targets(editor, requests, job.out, name), False

    def edit(index: list[int]) -> float:
        if saved is None or (first_only and index[0] != 0):
            return editor.edit_batch([requests[i] for i in index]).seconds
        targets, target_seconds = saved
        result = editor.edit_batch([requests[i] for i in index], targets=targets.select(index))
        return result.seconds + target_seconds * len(index)

    return editor, edit


def _original_targets(
    editor: PMETEditor, requests: Sequence[EditRequest], out: Path, name: str
) -> tuple[Targets, float]:
    """Every request's targets against the original model, and their seconds per request: computed once, saved."""

    def compute(index: Sequence[int]) -> Targets:
        return editor.compute_targets([requests[i] for i in index])

    return saved_targets(out, name, len(requests), compute, progress=editor.progress)


def _null_space_setting(config: BatchExperimentConfig, name: str) -> dict[str, Any]:
    """AlphaEdit's projection (or, without it, whether the solve keeps earlier batches' keys) as each sequential record
    states it (None: T-Patcher, which has no such option)."""
    if name not in MASS_EDITORS:
        return {"null_space": None}
    hparams = pmet_hparams(variant=name, **config.pmet_options)
    if not hparams.null_space:
        kept = ("keep_written", "replay_written", "rewrite_written")
        return {"null_space": False, **{name: getattr(hparams, name) for name in kept}}
    return {
        "null_space": True,
        "null_space_threshold": hparams.null_space_threshold,
        "null_space_l2": hparams.null_space_l2,
    }


def _suite(job: _Job, editor: Editor) -> EvaluationSuite | None:
    """The general-ability suite (None: ``suite="none"``). Its reference is read from the unedited model once and
    saved, so later editors and resumed runs reuse it."""
    suite_config = job.config.suite_config()
    if suite_config is None:
        return None
    sources = suite_sources(job.config.data_dir)
    parts = locality_parts(job.task, sources, suite_config, max_positions=position_limit(job.model.config))
    saved = job.out / SUITE_REFERENCE
    reference = load_file(str(saved)) if saved.is_file() else None
    suite = EvaluationSuite(
        editor.model, parts, job.task.pad_id, suite_config.batch_size, progress=job.progress, state=reference
    )
    if reference is None:
        save_safetensors_atomic(suite.state_tensors(), saved)
    return suite


def _patcher_editor(job: _Job) -> tuple[Editor, Callable[[list[int]], float]]:
    config, cases = job.config, job.cases
    benchmark = BENCHMARKS[config.kind](None, config.data_dir)
    editor = build_editor(
        "patcher",
        job.model,
        job.task,
        benchmark.memory,
        benchmark.validation,
        EditConfig.quick(seed=config.seed, **config.edit_options),
        memory_rows=config.memory_rows,
        cache_dir=cache_dir() / "memory",
        progress=job.progress,
    )

    def edit(index: list[int]) -> float:
        began = time.perf_counter()
        for i in index:  # one after another: T-Patcher's sequential protocol
            editor.edit(EditExample(cases[i].prompt, cases[i].target, subject=cases[i].subject), edit_id=i)
        return time.perf_counter() - began

    return editor, edit


def _run_sizes(
    editor: Editor,
    edit: Callable[[list[int]], float],
    job: _Job,
    before: Sequence[dict[str, Outcome]],
    sizes: Sequence[int],
) -> None:
    """For each size: cut the cases into batches, ``edit`` each from the original model, score it, write the part."""
    name, task, cases, out, progress = job.name, job.task, job.cases, job.out, job.progress
    for size in sizes:
        after, seconds = [], []
        for batch in tqdm(batch_slices(len(cases), size), desc=f"{name} b={size}", unit="batch", disable=not progress):
            index = list(batch)
            editor.reset()
            seconds.append(edit(index))
            after += score_cases(
                editor.model, task, [cases[i] for i in index], progress="scoring the batch" if progress else None
            )
        editor.reset()
        _write_part(out, name, size, after, before, seconds)


def _write_part(
    out: Path,
    name: str,
    size: int,
    after: Sequence[dict[str, Outcome]],
    before: Sequence[dict[str, Outcome]],
    seconds: Sequence[float],
) -> None:
    row = {
        "editor": DISPLAY_NAMES[name],
        "batch_size": size,
        "mode": "independent",
        "batches": len(seconds),
        "cases": len(after),
        **fact_metrics(after, before[: len(after)]),
        "seconds_per_batch": median(seconds),
        "seconds_per_edit": fmean(seconds) * len(seconds) / len(after),
    }
    write_text_atomic(out / "parts" / f"{name}-b{size}.json", json.dumps(row, indent=1))


def _read_before(path: Path) -> list[dict[str, Outcome]] | None:
    if not path.is_file():
        return None
    return [{k: Outcome(**o) for k, o in case.items()} for case in json.loads(path.read_text())]


def assemble_batch(
    out: Path, config: BatchExperimentConfig, cases: Sequence[FactCase], command: str | None = None
) -> dict[str, Any]:
    """``results.json`` / ``results.md`` from the parts, editors in config order, rows by batch size (and batch
    index in sequential mode)."""
    rows = [json.loads(path.read_text()) for path in _part_files(out, config)]
    before = _read_before(out / "before.json") or []
    baseline = {"editor": "unedited", "batch_size": 0, "cases": len(before), **fact_metrics(before, before)}
    results = {"config": asdict(config), "command": command, "rows": [baseline, *rows]}
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    footer = f"\nCommand: `{command}`\n" if command else ""
    write_text_atomic(
        out / "results.md",
        f"# Batch editing: {config.model} on {config.data} ({len(cases)} cases, {config.mode} batches)\n\n"
        + markdown_table(results["rows"], metric_columns=FACT_COLUMNS, extra_columns=FACT_EXTRAS)
        + _decay_tables(rows)
        + footer,
    )
    return results


def _part_files(out: Path, config: BatchExperimentConfig) -> list[Path]:
    if config.mode == "sequential":
        files = [
            part_file(out, e, b, k)
            for e in config.editors
            for b in config.batch_sizes
            for k in range(1, len(batch_slices(config.cases, b)) + 1)
        ]
    else:
        files = [out / "parts" / f"{e}-b{b}.json" for e in config.editors for b in config.batch_sizes]
    return [path for path in files if path.is_file()]


def _decay_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Sequential rows: per (editor, batch size), each earlier batch's efficacy acc after every batch."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("mode") == "sequential":  # parts written before modes existed are independent
            groups.setdefault((row["editor"], row["batch_size"]), []).append(row)
    return "".join(
        f"\n## {editor}, batches of {size}: efficacy acc of each batch after later ones\n\n{decay_table(group)}"
        for (editor, size), group in groups.items()
    )
