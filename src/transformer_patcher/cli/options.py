"""Options shared by several commands, and the argument types that refuse a bad value before any work is done.

Light on purpose (no torch): the top-level parser and ``info`` import this module too.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

BENCHMARK_NAMES = ("zsre", "counterfact", "fever")
SCHEDULES = ("default", "faithful", "quick", "official")  # EditConfig.mode's names (kept light: no torch import here)
SCHEDULE_HELP = (
    "editing mode: default (solved patches, stop once the edit and the memory constraints hold), faithful (the "
    "official code's algorithm and schedule; 'official' is its earlier name), quick (faithful, checked every 5 steps)"
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


positive = _integer(1, "a positive integer")
non_negative = _integer(0, "a non-negative integer")
edit_id = _integer(1, "an edit id, a positive integer")


def data_folder(text: str) -> Path:
    """A ``--data-dir`` must exist: a mistyped one would otherwise fall back to other data without a word."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return Path(text)


def input_file(text: str) -> Path:
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


def folder_to_write(text: str) -> Path:
    return _writable(Path(text), folder=True)


def file_to_write(text: str) -> Path:
    return _writable(Path(text), folder=False)


# ------------------------------------------------------------------------------------------ option groups
def model_and_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="short name (smollm2-135m, minilm-l6), Hub id or local folder")
    parser.add_argument("--data", default="zsre", help=f"{', '.join(BENCHMARK_NAMES)} or a data file")
    parser.add_argument("--data-kind", choices=BENCHMARK_NAMES, default=None, help="format of a --data file")
    parser.add_argument("--data-dir", type=data_folder, default=None, help="folder holding the shared data sets")
    parser.add_argument("--max-examples", type=positive, default=None, help="use only the first N examples")
    parser.add_argument(
        "--zsre-target",
        choices=("answers", "alt"),
        default="answers",
        help="zsRE target: the true answer (answers[0]) or EasyEdit's convention (alt; records without one skipped)",
    )


def format_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt-format",
        default="raw",
        metavar="FORMAT",
        help="how inputs are asked: raw, chat (the tokenizer's chat template; answers end their turn) or a template "
        "string with one {text} slot, e.g. 'Question: {text}\\nAnswer:'",
    )
    parser.add_argument("--append-eos", action="store_true", help="raw/template answers end with EOS (teach stopping)")


def suite_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--suite",
        choices=("full", "small", "none"),
        default=default,
        help="evaluation suite: unrelated and neighbouring questions (raw and chat), free generation, perplexity "
        "(full: ~1,000 questions, 100 generations, 50k tokens; small: a quick look)",
    )
    parser.add_argument(
        "--neighbours", type=non_negative, default=None, help="near neighbours per edit (default: the suite's)"
    )
    parser.add_argument(
        "--subject-questions",
        type=non_negative,
        default=None,
        help="other questions about each edit's subject, per format (default: the suite's)",
    )
    parser.add_argument("--locality-file", help="your unrelated questions for the suite: {'text': ...} per line")
    parser.add_argument(
        "--neighbour-file", help="your near neighbours for the suite: {'text': edit, 'neighbours': [...]} per line"
    )


def suite_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The suite options given on the command line, as ``SuiteConfig`` fields."""
    overrides = {"locality_file": args.locality_file, "neighbour_file": args.neighbour_file}
    counts = {"neighbours": args.neighbours, "subjects": args.subject_questions}
    return overrides | {name: count for name, count in counts.items() if count is not None}


def overrides(items: Sequence[str], config_class: type, exclude: Sequence[str] = ("extra",)) -> dict[str, Any]:
    """``KEY=VALUE`` strings as field overrides of a config dataclass; values are JSON when they parse as JSON."""
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
