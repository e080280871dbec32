"""``transformer-patcher``: run SME experiments, edit a model, evaluate, plot, inspect and undo patch sets.

    transformer-patcher sme run --model smollm2-135m --data zsre --folds 2 --out runs/zsre
    transformer-patcher edit --model smollm2-135m --patches patches/my-fixes --text "Q?" --target "A"
    transformer-patcher eval --model smollm2-135m --patches patches/my-fixes --data zsre
    transformer-patcher plot runs/zsre
    transformer-patcher info patches/my-fixes
    transformer-patcher undo patches/my-fixes 3

Results are written as JSON plus a markdown table; progress bars go to stderr. Errors are one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

from transformer_patcher import __version__
from transformer_patcher.core.atomic import open_regular_file, recover_folder
from transformer_patcher.core.errors import PatcherError
from transformer_patcher.core.wording import count
from transformer_patcher.tuners.patcher.patch_set import read_edit_log

BENCHMARK_NAMES = ("zsre", "counterfact", "fever")
SCHEDULES = ("default", "faithful", "quick", "official")  # EditConfig.mode's names (kept light: no torch import here)
SCHEDULE_HELP = (
    "editing mode: default (solved patches, stop once the edit and the memory constraints hold), faithful (the "
    "official code's algorithm and schedule; 'official' is its earlier name), quick (faithful, checked every 5 steps)"
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as error:
        return _error(error)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _library_bars(not getattr(args, "no_progress", False)):
            return int(args.handler(args) or 0)
    except (PatcherError, ValueError, KeyError, OSError, ModuleNotFoundError) as error:
        return _error(error.args[0] if isinstance(error, KeyError) and error.args else error)


def _error(message: object) -> int:
    """Print ``message`` as the CLI's one error line, made safe to show (see :func:`_one_line`); exit status 2."""
    print(f"transformer-patcher: error: {_one_line(message)}", file=sys.stderr)
    return 2


class _UsageError(Exception):
    """A command line argparse refuses; ``main`` reports it like any other error."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors reported by ``main`` as one ``error:`` line (exit status 2), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


@contextmanager
def _library_bars(enabled: bool) -> Iterator[None]:
    """``--no-progress`` also silences the bars transformers and the Hub draw (loading and writing weights), which
    our own ``progress`` flags do not reach; their previous setting is restored afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _version() -> str:
    """The installed distribution's version; the package's own in a source tree that was never installed."""
    try:
        return version("transformer-patcher")
    except PackageNotFoundError:
        return __version__


# ------------------------------------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transformer-patcher", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"transformer-patcher {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    sme = commands.add_parser("sme", help="sequential model editing experiments").add_subparsers(
        dest="sme_command", required=True
    )
    run = sme.add_parser("run", help="edit a benchmark's stream in folds and measure SR/GR/ER/TrainR/TestR/locality")
    _model_and_data(run)
    from transformer_patcher.experiments.registry import EDITOR_NAMES

    run.add_argument(
        "--editor", nargs="+", choices=EDITOR_NAMES, default=["patcher"], help="several: one run each, one table"
    )
    run.add_argument("--folds", type=_positive, default=1, help="independent streams, each from the original model")
    run.add_argument(
        "--memory-rows", type=_positive, default=10_000, help="memory queries the patches must stay silent on"
    )
    run.add_argument(
        "--question-rows",
        type=_non_negative,
        default=20_000,
        help="generators: memory rows over the model's own answers to memory questions, raw and chat (0: none)",
    )
    run.add_argument("--validation-rows", type=_positive, default=1_000, help="validation memory rows (stopping rule)")
    run.add_argument("--schedule", choices=SCHEDULES, default="default", help=SCHEDULE_HELP)
    run.add_argument("--eval-every", type=_positive, default=None, help="also evaluate ER/locality every N edits")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--batch-size", type=_positive, default=32)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EditConfig field override")
    run.add_argument("--ft-set", action="append", default=[], metavar="KEY=VALUE", help="FineTuneConfig field override")
    _pmet_options(run)
    _format_options(run)
    _suite_option(run, default="full")
    run.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, plots, patches)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(handler=_sme_run)

    batch = commands.add_parser("batch", help="batch (mass) editing experiments").add_subparsers(
        dest="batch_command", required=True
    )
    mass = batch.add_parser(
        "run", help="write facts in batches of N at once; ROME-style efficacy/paraphrase/neighbourhood"
    )
    mass.add_argument("--model", required=True, help="short name (smollm2-135m), Hub id or local folder")
    mass.add_argument("--data", default="counterfact", help="counterfact, zsre, or a data file of --data-kind")
    mass.add_argument("--data-kind", choices=("counterfact", "zsre"), default=None)
    mass.add_argument("--data-dir", type=_data_folder, default=None, help="folder holding the shared data sets")
    mass.add_argument("--cases", type=_positive, default=100, help="edit the first N records")
    mass.add_argument("--batch-sizes", type=_positive, nargs="+", default=[1, 10, 100])
    mass.add_argument("--editor", nargs="+", choices=("pmet", "memit", "patcher"), default=["pmet", "memit"])
    mass.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EditConfig override (T-Patcher)")
    mass.add_argument("--memory-rows", type=_positive, default=10_000, help="T-Patcher memory rows")
    mass.add_argument("--zsre-target", choices=("answers", "alt"), default="answers", help="zsRE target convention")
    _format_options(mass)
    _pmet_options(mass)
    mass.add_argument("--out", type=Path, required=True, help="output folder (resumes what it already holds)")
    mass.add_argument("--no-progress", action="store_true")
    mass.set_defaults(handler=_batch_run)

    edit = commands.add_parser("edit", help="fix one or more mistakes and save the patch set")
    edit.add_argument("--model", required=True, help="short name (smollm2-135m, minilm-l6), Hub id or local folder")
    edit.add_argument("--patches", type=_folder_to_write, required=True, help="patch-set folder: extended if it exists")
    edit.add_argument("--text", help="the input the model gets wrong")
    edit.add_argument("--target", help="the right output (a label index for classifiers)")
    edit.add_argument(
        "--file",
        type=_input_file,
        help="JSON lines of {'text': ..., 'target': ..., 'subject': optional} to edit in order",
    )
    edit.add_argument("--subject", help="what --text is about (eval asks the same question of other subjects)")
    _format_options(edit)
    edit.add_argument(
        "--memory", choices=(*BENCHMARK_NAMES, "none"), default=None, help="memory set (default: by task)"
    )
    edit.add_argument("--memory-rows", type=_positive, default=10_000)
    edit.add_argument(
        "--question-rows",
        type=_non_negative,
        default=20_000,
        help="generators: memory rows over the model's own answers",
    )
    edit.add_argument("--schedule", choices=SCHEDULES, default="default", help=SCHEDULE_HELP)
    edit.add_argument("--data-dir", type=_data_folder, default=None)
    edit.add_argument("--no-progress", action="store_true")
    edit.set_defaults(handler=_edit)

    evaluate = commands.add_parser(
        "eval",
        help="a patch set's own fixes and what else it changes (no --data), or a benchmark with and without it",
    )
    _model_and_data(evaluate)
    evaluate.add_argument("--patches", type=Path, default=None, help="patch set; without --data its edit log is scored")
    evaluate.add_argument("--batch-size", type=_positive, default=32)
    _format_options(evaluate)
    _suite_option(evaluate, default="full")
    evaluate.add_argument("--out", type=_file_to_write, default=None, help="also write the results as JSON here")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=_eval, data=None)

    plot = commands.add_parser("plot", help="(re)draw metrics-vs-edits and latency plots of an SME run folder")
    plot.add_argument("run_dir", type=Path)
    plot.set_defaults(handler=_plot)

    info = commands.add_parser("info", help="what a patch set holds: base model, edits, their ids and sizes")
    info.add_argument("patches", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_info)

    undo = commands.add_parser("undo", help="remove every neuron of one edit from a saved patch set")
    undo.add_argument("patches", type=Path)
    undo.add_argument("edit_id", type=_edit_id)
    undo.set_defaults(handler=_undo)
    return parser


def _format_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt-format",
        default="raw",
        metavar="FORMAT",
        help="how inputs are asked: raw, chat (the tokenizer's chat template; answers end their turn) or a template "
        "string with one {text} slot, e.g. 'Question: {text}\\nAnswer:'",
    )
    parser.add_argument("--append-eos", action="store_true", help="raw/template answers end with EOS (teach stopping)")


def _suite_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--suite",
        choices=("full", "small", "none"),
        default=default,
        help="evaluation suite: unrelated and neighbouring questions (raw and chat), free generation, perplexity "
        "(full: ~1,000 questions, 100 generations, 50k tokens; small: a quick look)",
    )
    parser.add_argument(
        "--neighbours", type=_non_negative, default=None, help="near neighbours per edit (default: the suite's)"
    )
    parser.add_argument("--locality-file", help="your unrelated questions for the suite: {'text': ...} per line")
    parser.add_argument(
        "--neighbour-file", help="your near neighbours for the suite: {'text': edit, 'neighbours': [...]} per line"
    )


def _suite_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The suite options given on the command line, as ``SuiteConfig`` fields."""
    overrides = {"locality_file": args.locality_file, "neighbour_file": args.neighbour_file}
    return overrides | ({} if args.neighbours is None else {"neighbours": args.neighbours})


def _model_and_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="short name (smollm2-135m, minilm-l6), Hub id or local folder")
    parser.add_argument("--data", default="zsre", help=f"{', '.join(BENCHMARK_NAMES)} or a data file")
    parser.add_argument("--data-kind", choices=BENCHMARK_NAMES, default=None, help="format of a --data file")
    parser.add_argument("--data-dir", type=_data_folder, default=None, help="folder holding the shared data sets")
    parser.add_argument("--max-examples", type=_positive, default=None, help="use only the first N examples")
    parser.add_argument(
        "--zsre-target",
        choices=("answers", "alt"),
        default="answers",
        help="zsRE target: the true answer (answers[0]) or EasyEdit's convention (alt; records without one skipped)",
    )


# ------------------------------------------------------------------------------------------ argument types
INT64_MAX = 2**63 - 1  # counts and edit ids end up in int64 tensors


def _integer(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type for integers from ``minimum`` to ``INT64_MAX``: a zero or negative count is a mistake to
    refuse, not a run that silently does nothing, and a larger id could never be stored."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if not minimum <= value <= INT64_MAX:
            raise argparse.ArgumentTypeError(f"expected {what} (at most 2**63 - 1), got {text!r}")
        return value

    return parse


_positive = _integer(1, "a positive integer")
_non_negative = _integer(0, "a non-negative integer")
_edit_id = _integer(1, "an edit id, a positive integer")


def _data_folder(text: str) -> Path:
    """A ``--data-dir`` must exist: a mistyped one would otherwise fall back to other data without a word."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return Path(text)


def _input_file(text: str) -> Path:
    """A file to read: a folder or a missing path is refused at once, not met as a traceback when it is read."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is {'a folder' if Path(text).is_dir() else 'not a file'}")
    return Path(text)


def _writable(path: Path, folder: bool) -> Path:
    """``path`` if a ``folder`` (or file) can be made there: the path itself and every folder above it that exists
    must be of the right kind, checked before any work so that a failure leaves nothing behind."""
    if path.exists() and path.is_dir() != folder:
        kind = "a file, not a folder" if folder else "a folder, not a file"
        raise argparse.ArgumentTypeError(f"{str(path)!r} is {kind}")
    above = next((parent for parent in path.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path)!r}: {str(above)!r} is a file, not a folder")
    return path


def _folder_to_write(text: str) -> Path:
    return _writable(Path(text), folder=True)


def _file_to_write(text: str) -> Path:
    return _writable(Path(text), folder=False)


# ------------------------------------------------------------------------------------------------ checks
def _check_model_and_data(args: argparse.Namespace) -> None:
    """The data file and the model, checked before a run takes its output folder's lock or writes anything."""
    from transformer_patcher.core.pretrained import model_config

    named = args.data in BENCHMARK_NAMES or args.data.startswith(("http://", "https://"))
    if not named and not Path(args.data).is_file():
        raise FileNotFoundError(f"dataset file not found: {args.data}")
    model_config(args.model)


def _check_edit_log(folder: Path) -> None:
    """A patch folder a crash left aside is put back, and its edit log (each line's id, text and target, which
    ``eval`` and ``edit`` read) is checked before anything is loaded or locked."""
    recover_folder(folder)
    read_edit_log(folder)


# ------------------------------------------------------------------------------------------------ commands
def _sme_run(args: argparse.Namespace) -> int:
    from transformer_patcher.experiments.sme.experiment import ExperimentConfig, run_comparison, run_experiment
    from transformer_patcher.experiments.sme.report import markdown_table, suite_table
    from transformer_patcher.methods.baselines import FineTuneConfig
    from transformer_patcher.methods.patcher.config import EditConfig

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
        edit_options=_overrides(args.set, EditConfig),
        finetune_options=_overrides(args.ft_set, FineTuneConfig, exclude=("scope", "kl")),
        pmet_options=_pmet_overrides(args),
        prompt_format=args.prompt_format,
        append_eos=args.append_eos,
        zsre_target=args.zsre_target,
        suite=args.suite,
        suite_options=_suite_overrides(args),
    )
    _check_model_and_data(args)
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
        out = _one_line(args.out)
        print(f"\nresults: {out}/results.json, {out}/results.md; plots and patch sets in {out}/")
    return 0


def _pmet_options(parser: argparse.ArgumentParser) -> None:
    from transformer_patcher.methods.pmet import DEFAULT_PRESET, PRESETS

    parser.add_argument("--pmet-preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help="PMET/MEMIT settings")
    parser.add_argument(
        "--pmet-set", action="append", default=[], metavar="KEY=VALUE", help="PMETHyperParams field override"
    )


def _pmet_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from transformer_patcher.methods.pmet import DEFAULT_PRESET, PMETHyperParams

    options = _overrides(args.pmet_set, PMETHyperParams, exclude=("extra", "variant"))
    return options if args.pmet_preset == DEFAULT_PRESET else {"preset": args.pmet_preset, **options}


def _batch_run(args: argparse.Namespace) -> int:
    from transformer_patcher.experiments.sme.batch_experiment import BatchExperimentConfig, run_batch_experiment
    from transformer_patcher.experiments.sme.report import FACT_COLUMNS, FACT_EXTRAS, markdown_table
    from transformer_patcher.methods.patcher.config import EditConfig

    config = BatchExperimentConfig(
        model=args.model,
        data=args.data,
        data_kind=args.data_kind,
        data_dir=str(args.data_dir) if args.data_dir else None,
        cases=args.cases,
        batch_sizes=tuple(args.batch_sizes),
        editors=tuple(args.editor),
        pmet_options=_pmet_overrides(args),
        edit_options=_overrides(args.set, EditConfig),
        memory_rows=args.memory_rows,
        prompt_format=args.prompt_format,
        append_eos=args.append_eos,
        zsre_target=args.zsre_target,
    )
    _check_model_and_data(args)
    command = shlex.join(["transformer-patcher", *sys.argv[1:]])
    results = run_batch_experiment(config, args.out, progress=not args.no_progress, command=command)
    print(markdown_table(results["rows"], metric_columns=FACT_COLUMNS, extra_columns=FACT_EXTRAS))
    print(f"results: {_one_line(args.out)}/results.json, {_one_line(args.out)}/results.md")
    return 0


def _overrides(items: Sequence[str], config_class: type, exclude: Sequence[str] = ("extra",)) -> dict[str, Any]:
    """``KEY=VALUE`` strings as field overrides of a config dataclass; values are JSON when they parse as JSON."""
    from dataclasses import fields

    known = {f.name for f in fields(config_class)} - set(exclude)
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _edit(args: argparse.Namespace) -> int:
    from transformer_patcher.core.prompts import PromptFormat
    from transformer_patcher.experiments.session import EditSession

    requests = _edit_requests(args)
    _check_edit_log(args.patches)
    with EditSession.open(
        args.model,
        args.patches,
        memory=args.memory,
        memory_rows=args.memory_rows,
        question_rows=args.question_rows,
        schedule=args.schedule,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        prompt_format=PromptFormat(args.prompt_format, args.append_eos),
    ) as session:
        before = session.num_patches
        print(_one_line(session.memory.describe()) + "\n")
        print(_md_head(["edit id", "fixed", "needed", "neurons", "steps", "seconds", "text"], "rllrrrl"))
        answered = []
        for text, target, subject in requests:
            record = session.edit(text, target, subject)
            if not record.needed:  # its id stays unused: the next fix takes it
                answered.append((text, target))
            edit_id = record.edit_id if record.needed else "-"
            cells = [edit_id, record.success, record.needed, record.neurons, record.steps, f"{record.seconds:.1f}"]
            print(_md_row([*cells, text[:60]]))
        for text, target in answered:
            print(f"- the model already answers {text[:60]!r} with {target!r}: nothing added")
        if len(answered) == len(requests):  # nothing changed: the folder is left as it was
            print("\nnothing to save: no edit was needed")
            return 0
        session.save()
    new = session.num_patches - before
    print(f"\nsaved {count(session.num_patches, 'patch', 'patches')} ({new} new) to {_one_line(args.patches)}/")
    return 0


def _edit_requests(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    if args.file is not None:
        if args.text is not None or args.target is not None or args.subject is not None:
            raise ValueError("give either --file or --text/--target/--subject, not both")
        from transformer_patcher.core.jsonl import json_lines

        requests = []
        for number, row in json_lines(args.file.read_text(encoding="utf-8"), str(args.file)):
            subject = row.get("subject")
            if (
                not isinstance(row.get("text"), str)
                or "target" not in row
                or not isinstance(subject, (str, type(None)))
            ):
                raise ValueError(f"{args.file}: line {number}: expected {{'text': ..., 'target': ..., 'subject': ...}}")
            requests.append((row["text"], row["target"], subject))
        if not requests:
            raise ValueError(f"{args.file} holds no edits")
        return requests
    if args.text is None or args.target is None:
        raise ValueError("give --text and --target (or --file)")
    return [(args.text, args.target, args.subject)]


def _eval(args: argparse.Namespace) -> int:
    if args.data is None:
        return _eval_patch_set(args)
    from transformer_patcher.experiments.sme.accuracy import evaluate_benchmark

    table = evaluate_benchmark(
        args.model,
        args.data,
        args.data_kind,
        args.data_dir,
        args.max_examples,
        args.patches,
        args.batch_size,
        prompt_format=args.prompt_format,
        append_eos=args.append_eos,
        zsre_target=args.zsre_target,
        progress=not args.no_progress,
    )
    columns = list(table[0])
    print(_md_head(columns, "l" * len(columns)))
    for row in table:
        print(_md_row(row.values()))
    _write_json(args.out, table)
    return 0


def _eval_patch_set(args: argparse.Namespace) -> int:
    from transformer_patcher.experiments.evaluation import SuiteConfig
    from transformer_patcher.experiments.sme.patch_set_eval import evaluate_patch_set

    if args.patches is None:
        raise ValueError("give --data (a benchmark or a data file), or --patches DIR to score its own fixes")
    if args.prompt_format != "raw" or args.append_eos:
        raise ValueError(
            "--prompt-format/--append-eos apply with --data; a patch set's fixes are scored in the format each was "
            "made in (its edit log), and the suite asks raw and chat"
        )
    suite = SuiteConfig.preset(args.suite, batch_size=args.batch_size, **_suite_overrides(args))
    _check_edit_log(args.patches)
    report = evaluate_patch_set(args.model, args.patches, suite, args.data_dir, progress=not args.no_progress)
    print(_md_head(["edit id", "format", "text", "target", "base answer", "patched answer", "fixed"], "rllllll"))
    for e in report.edits:
        print(
            _md_row(
                [e["edit_id"], e["format"], e["text"][:60], e["target"], e["base"][:40], e["patched"][:40], e["fixed"]]
            )
        )
    print("\n" + _md_head(["part", "base exact", "base token", "patched exact", "patched token", "n"], "lrrrrr"))
    ppl = ""
    for part, after in report.patched.items():
        before = report.base[part]
        if "perplexity" in after:
            ppl = f"perplexity   base {before['perplexity']:.3f} → patched {after['perplexity']:.3f}"
            continue
        measures = [before.get("exact"), before.get("token"), after.get("exact"), after.get("token")]
        print(_md_row([part, *("" if m is None else m for m in measures), after["n"]]))
    if ppl:
        print(f"\n{ppl} ({100 * report.patched['perplexity']['change']:+.2f} %), WikiText-2 test")
    if report.leaks:
        print(
            "\nNeighbours whose answer changed:\n"
            + _md_head(["part", "question", "base answer", "patched answer"], "llll")
        )
        for leak in report.leaks[:20]:
            print(_md_row([leak["part"], leak["question"][:60], leak["base"][:40], leak["patched"][:40]]))
        if len(report.leaks) > 20:
            print(f"... {len(report.leaks) - 20} more in --out")
    for note in report.notes:
        print(f"- {_one_line(note)}")
    print("- exact: the fix is written then ends (edits, rephrases), or the greedy output equals the base model's")
    _write_json(args.out, report.to_dict())
    return 0


def _md_row(cells: Iterable[Any]) -> str:
    """One markdown table row: floats to 3 decimals, text made safe by :func:`_md_cell`."""
    shown = [f"{c:.3f}" if isinstance(c, float) else _md_cell(str(c)) for c in cells]
    return "| " + " | ".join(shown) + " |"


def _md_cell(text: str) -> str:
    """:func:`_one_line` with ``|`` escaped: either would otherwise end the cell or forge a row."""
    return _one_line(text).replace("|", "\\|")


# Text from files (edit logs, adapter configs, data) reaches the terminal: control characters there would run as
# escape sequences (clear the screen, move the cursor, retitle the window), line breaks would forge lines, and bidi
# controls would reorder what is shown. Line breaks become ⏎; the others their Python escape.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_VISIBLE = str.maketrans(
    {chr(c): f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
    | {c: f"\\u{ord(c):04x}" for c in _BIDI_CONTROLS + "\u2028\u2029"}
    | {"\n": "⏎", "\r": "⏎"}
)


def _one_line(text: object) -> str:
    """``text`` as one line that shows what it holds and cannot act on the terminal (see ``_VISIBLE``)."""
    return str(text).replace("\r\n", "\n").translate(_VISIBLE)


def _md_head(columns: Sequence[str], align: str) -> str:
    """A table's header row and separator; ``align`` has one letter per column, ``r`` for right-aligned numbers."""
    rule = ["---:" if a == "r" else "---" for _, a in zip(columns, align, strict=True)]
    return _md_row(columns) + "\n|" + "|".join(rule) + "|"


def _write_json(path: Path | None, data: Any) -> None:
    if path is not None:
        from transformer_patcher.core.atomic import write_text_atomic

        write_text_atomic(path, json.dumps(data, indent=1))


def _plot(args: argparse.Namespace) -> int:
    from transformer_patcher.experiments.plots import latency_histogram, metrics_curve

    results_file = args.run_dir / "results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file} not found: give the --out folder of a finished `sme run`")
    folds = json.loads(results_file.read_text())["folds"]
    written = [metrics_curve(folds, args.run_dir / "metrics.png")]
    if any(r["needed"] for fold in folds for r in fold["records"]):
        written.append(latency_histogram(folds, args.run_dir / "latency.png"))
    written += sorted((args.run_dir / "heatmaps").glob("*.png"))
    print("\n".join(_one_line(path) for path in written))
    return 0


def _info(args: argparse.Namespace) -> int:
    from transformer_patcher.tuners.patcher.patch_set import describe_patch_set

    if _peft_type(args.patches) == "DELTA":
        return _info_delta(args)
    info = describe_patch_set(args.patches).to_dict()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"patch set   {_one_line(info['path'])}")
    print(f"base model  {_one_line(info['base_model'])}")
    on = f"{_one_line(info['target_module'])} ({_one_line(info['activation'])})"
    print(f"patches     {count(info['num_patches'], 'neuron')} on {on}")
    print(f"file        {info['file_bytes']:,} bytes of safetensors\n")
    print(_md_head(["edit id", "neurons", "text", "target"], "rrll"))
    for edit in info["edits"]:
        print(_md_row([edit["edit_id"], edit["neurons"], edit.get("text", ""), edit.get("target", "")]))
    return 0


def _peft_type(folder: Path) -> str | None:
    """The ``peft_type`` an adapter folder declares (None when unreadable: the full loader then says why)."""
    try:
        recover_folder(folder)
        with open_regular_file(folder / "adapter_config.json") as handle:  # a FIFO would block a plain read
            return json.load(handle).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def _info_delta(args: argparse.Namespace) -> int:
    from transformer_patcher.tuners.delta.delta_set import describe_delta

    info = describe_delta(args.patches)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"weight delta {_one_line(info['path'])}")
    print(f"base model   {_one_line(info['base_model'])}")
    modules = count(len(info["modules"]), "module")
    print(f"method       {_one_line(info['method'])}, total rank {_one_line(info['rank'])} over {modules}")
    print(f"file         {info['file_bytes']:,} bytes of safetensors\n")
    print(_md_head(["module", "rank", "in", "out"], "lrrr"))
    for name, shape in info["modules"].items():
        print(_md_row([name, shape["rank"], shape["in"], shape["out"]]))
    if info["edits"]:
        print("\n" + _md_head(["edit id", "text", "target"], "rll"))
        for edit in info["edits"]:
            print(_md_row([edit["edit_id"], edit.get("text", ""), edit.get("target", "")]))
    return 0


def _undo(args: argparse.Namespace) -> int:
    from transformer_patcher.tuners.patcher.patch_set import remove_edit_from_files

    if _peft_type(args.patches) == "DELTA":
        raise ValueError(
            f"{args.patches} is a PMET/MEMIT weight delta: each batch's update was solved against the model with the "
            "earlier ones applied, so one edit cannot be taken out on its own; re-run the edits without it"
        )
    removed = remove_edit_from_files(args.patches, args.edit_id)
    print(f"removed edit {args.edit_id} ({count(removed, 'neuron')}) from {_one_line(args.patches)}/")
    return 0


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
