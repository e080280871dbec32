"""``sme run`` and ``batch run``: the experiments, each writing results.json, results.md and plots to ``--out``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from transformer_patcher.cli.options import (
    BENCHMARK_NAMES,
    SCHEDULE_HELP,
    SCHEDULES,
    data_folder,
    format_options,
    input_file,
    model_and_data,
    non_negative,
    overrides,
    positive,
    suite_option,
    suite_overrides,
)
from transformer_patcher.cli.output import one_line
from transformer_patcher.core.pretrained import DEVICE_HELP, check_device, model_config
from transformer_patcher.experiments.evaluation import SuiteConfig
from transformer_patcher.experiments.registry import EDITOR_NAMES
from transformer_patcher.experiments.sme.batch_experiment import (
    MODES,
    SEQUENTIAL_TARGETS,
    SUITE_OPTIONS,
    BatchExperimentConfig,
    run_batch_experiment,
)
from transformer_patcher.experiments.sme.experiment import ExperimentConfig, run_comparison, run_experiment
from transformer_patcher.experiments.sme.report import FACT_COLUMNS, FACT_EXTRAS, markdown_table, suite_table
from transformer_patcher.methods.baselines import FineTuneConfig
from transformer_patcher.methods.patcher.config import EditConfig
from transformer_patcher.methods.pmet import DEFAULT_PRESET, PRESETS, PMETHyperParams


# ------------------------------------------------------------------------------------------------ sme run
def setup_sme_run(run: argparse.ArgumentParser) -> None:
    model_and_data(run)
    run.add_argument(
        "--editor", nargs="+", choices=EDITOR_NAMES, default=["patcher"], help="several: one run each, one table"
    )
    run.add_argument("--folds", type=positive, default=1, help="independent streams, each from the original model")
    run.add_argument(
        "--memory-rows", type=positive, default=10_000, help="memory queries the patches must stay silent on"
    )
    run.add_argument(
        "--question-rows",
        type=non_negative,
        default=20_000,
        help="generators: memory rows over the model's own answers to memory questions, raw and chat (0: none)",
    )
    run.add_argument("--validation-rows", type=positive, default=1_000, help="validation memory rows (stopping rule)")
    run.add_argument("--schedule", choices=SCHEDULES, default="default", help=SCHEDULE_HELP)
    run.add_argument(
        "--layer", type=int, default=-1, help="T-Patcher: the block whose FFN is patched (-1: the last, the paper's)"
    )
    run.add_argument("--eval-every", type=positive, default=None, help="also evaluate ER/locality every N edits")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--batch-size", type=positive, default=32)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EditConfig field override")
    run.add_argument("--ft-set", action="append", default=[], metavar="KEY=VALUE", help="FineTuneConfig field override")
    run.add_argument(
        "--rewordings",
        type=input_file,
        default=None,
        help="T-Patcher: JSON lines of {text, rephrase, subject}: how prompts get reworded (docs/editing.md, rule 20)",
    )
    pmet_options(run)
    format_options(run)
    suite_option(run, default="full")
    run.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, plots, patches)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(handler=sme_run)


def sme_run(args: argparse.Namespace) -> int:
    config = ExperimentConfig(
        model=args.model,
        data=args.data,
        data_kind=args.data_kind,
        editor=args.editor[0],
        folds=args.folds,
        max_examples=args.max_examples,
        memory_rows=args.memory_rows,
        question_rows=args.question_rows,
        validation_rows=args.validation_rows,
        schedule=args.schedule,
        eval_every=args.eval_every,
        seed=args.seed,
        batch_size=args.batch_size,
        data_dir=str(args.data_dir) if args.data_dir else None,
        edit_options=overrides(args.set, EditConfig),
        finetune_options=overrides(args.ft_set, FineTuneConfig, exclude=("scope", "kl")),
        pmet_options=pmet_overrides(args),
        prompt_format=args.prompt_format,
        append_eos=args.append_eos,
        zsre_target=args.zsre_target,
        suite=args.suite,
        suite_options=suite_overrides(args),
        layer_index=args.layer,
        rewordings_file=None if args.rewordings is None else str(args.rewordings),
    )
    check_model_and_data(args)
    progress = not args.no_progress
    if len(args.editor) > 1:
        command = shlex.join(["transformer-patcher", *sys.argv[1:]])
        runs = run_comparison(config, args.editor, args.out, resume=args.resume, progress=progress, command=command)
    else:
        result = run_experiment(config, args.out, resume=args.resume, progress=progress)
        runs = None if result is None else [result]
    if runs is not None:  # the main process reports
        print(markdown_table([{"editor": r["editor"], **r["summary"]} for r in runs]))
        for metric, note in runs[0]["notes"].items():
            print(f"- {metric}: {note}")
        for r in runs:
            suite = suite_table(r["summary"])
            if suite:
                print(
                    f"\nEvaluation suite, {r['editor']} (final evaluation; exact = greedy output unchanged):\n{suite}"
                )
        out = one_line(args.out)
        print(f"\nresults: {out}/results.json, {out}/results.md; plots and patch sets in {out}/")
    return 0


# ---------------------------------------------------------------------------------------------- batch run
def setup_batch_run(mass: argparse.ArgumentParser) -> None:
    mass.add_argument("--model", required=True, help="short name (smollm2-135m), Hub id or local folder")
    mass.add_argument("--data", default="counterfact", help="counterfact, zsre, or a data file of --data-kind")
    mass.add_argument("--data-kind", choices=("counterfact", "zsre"), default=None)
    mass.add_argument("--data-dir", type=data_folder, default=None, help="folder holding the shared data sets")
    mass.add_argument("--cases", type=positive, default=100, help="edit the first N records")
    mass.add_argument("--batch-sizes", type=positive, nargs="+", default=[1, 10, 100])
    mass.add_argument("--editor", nargs="+", choices=("pmet", "memit", "patcher"), default=["pmet", "memit"])
    mass.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EditConfig override (T-Patcher)")
    mass.add_argument("--memory-rows", type=positive, default=10_000, help="T-Patcher memory rows")
    mass.add_argument("--zsre-target", choices=("answers", "alt"), default="answers", help="zsRE target convention")
    mass.add_argument(
        "--mode",
        choices=MODES,
        default="independent",
        help="independent: every batch edited from the original model; sequential: the batches written one after "
        "another into the same model (never reset), with a record after each batch: every earlier batch's "
        "efficacy, the neighbourhood and general ability (add --pmet-set null_space=true for AlphaEdit's projection)",
    )
    mass.add_argument(
        "--sequential-targets",
        choices=SEQUENTIAL_TARGETS,
        default="current",
        help="sequential mode's PMET/MEMIT targets: current (optimised on the model each batch finds, the default) or "
        "original (optimised once on the unedited model, saved and reused by every batch)",
    )
    mass.add_argument(
        "--suite",
        choices=("full", "small", "none"),
        default="small",
        help="sequential mode's general ability after each batch: free generation and WikiText-2 perplexity against "
        "the unedited model (small: 32 generations, 8k tokens; full: 100 generations, 50k tokens)",
    )
    mass.add_argument(
        "--suite-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"suite size override, KEY one of {', '.join(SUITE_OPTIONS)}",
    )
    format_options(mass)
    pmet_options(mass)
    mass.add_argument(
        "--device", type=device_option, default="auto", help=f"{DEVICE_HELP}; a run may resume on another device"
    )
    mass.add_argument("--out", type=Path, required=True, help="output folder (resumes what it already holds)")
    mass.add_argument("--no-progress", action="store_true")
    mass.set_defaults(handler=batch_run)


def batch_run(args: argparse.Namespace) -> int:
    config = BatchExperimentConfig(
        model=args.model,
        data=args.data,
        data_kind=args.data_kind,
        data_dir=str(args.data_dir) if args.data_dir else None,
        cases=args.cases,
        batch_sizes=tuple(args.batch_sizes),
        editors=tuple(args.editor),
        pmet_options=pmet_overrides(args),
        edit_options=overrides(args.set, EditConfig),
        memory_rows=args.memory_rows,
        prompt_format=args.prompt_format,
        append_eos=args.append_eos,
        zsre_target=args.zsre_target,
        mode=args.mode,
        suite=args.suite,
        suite_options=overrides(args.suite_set, SuiteConfig),
        sequential_targets=args.sequential_targets,
        device=args.device,
    )
    check_model_and_data(args)
    command = shlex.join(["transformer-patcher", *sys.argv[1:]])
    results = run_batch_experiment(config, args.out, progress=not args.no_progress, command=command)
    print(markdown_table(results["rows"], metric_columns=FACT_COLUMNS, extra_columns=FACT_EXTRAS))
    print(f"results: {one_line(args.out)}/results.json, {one_line(args.out)}/results.md")
    return 0


# ------------------------------------------------------------------------------------------------- shared
def device_option(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether the machine has it is checked at run)."""
    try:
        return check_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def pmet_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pmet-preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help="PMET/MEMIT settings")
    parser.add_argument(
        "--pmet-set", action="append", default=[], metavar="KEY=VALUE", help="PMETHyperParams field override"
    )


def pmet_overrides(args: argparse.Namespace) -> dict[str, Any]:
    options = overrides(args.pmet_set, PMETHyperParams, exclude=("extra", "variant"))
    return {"preset": args.pmet_preset, **options}  # named even when the default, which has moved before


def check_model_and_data(args: argparse.Namespace) -> None:
    """The data file and the model, checked before a run takes its output folder's lock or writes anything."""
    named = args.data in BENCHMARK_NAMES or args.data.startswith(("http://", "https://"))
    if not named and not Path(args.data).is_file():
        raise FileNotFoundError(f"dataset file not found: {args.data}")
    model_config(args.model)
