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
import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

from transformer_patcher import __version__
from transformer_patcher.cli.options import SCHEDULE_HELP, SCHEDULES
from transformer_patcher.cli.output import one_line
from transformer_patcher.core.errors import PatcherError

__all__ = ["COMMANDS", "GROUPS", "SCHEDULES", "SCHEDULE_HELP", "main", "main_exit"]

# Each command: its words, its one-line help, and the "module:function" that adds its options and handler to its
# parser. The module is imported only when that command runs (or prints its --help), so `--help`, `--version` and
# the light commands (`info`) never load torch through the heavy ones. Listed in the order --help shows them.
COMMANDS: dict[str, tuple[str, str]] = {
    "sme run": (
        "edit a benchmark's stream in folds and measure SR/GR/ER/TrainR/TestR/locality",
        "transformer_patcher.cli.runs:setup_sme_run",
    ),
    "batch run": (
        "write facts in batches of N at once; ROME-style efficacy/paraphrase/neighbourhood",
        "transformer_patcher.cli.runs:setup_batch_run",
    ),
    "edit": ("fix one or more mistakes and save the patch set", "transformer_patcher.cli.editing:setup_edit"),
    "eval": (
        "a patch set's own fixes and what else it changes (no --data), or a benchmark with and without it",
        "transformer_patcher.cli.editing:setup_eval",
    ),
    "plot": ("(re)draw metrics-vs-edits and latency plots of an SME run folder", "transformer_patcher.cli.plot:setup"),
    "info": ("what a patch set holds: base model, edits, their ids and sizes", "transformer_patcher.cli.info:setup"),
    "undo": ("remove every neuron of one edit from a saved patch set", "transformer_patcher.cli.undo:setup"),
}
# The first word of a two-word command: its help line.
GROUPS: dict[str, str] = {"sme": "sequential model editing experiments", "batch": "batch (mass) editing experiments"}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except (_UsageError, ModuleNotFoundError) as error:
        return _error(error)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _library_bars(not getattr(args, "no_progress", False)):
            return int(args.handler(args) or 0)
    except (PatcherError, ValueError, KeyError, OSError, ModuleNotFoundError) as error:
        return _error(error.args[0] if isinstance(error, KeyError) and error.args else error)


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


def _error(message: object) -> int:
    """Print ``message`` as the CLI's one error line, made safe to show (see ``output.one_line``); exit status 2."""
    print(f"transformer-patcher: error: {one_line(message)}", file=sys.stderr)
    return 2


class _UsageError(Exception):
    """A command line argparse refuses; ``main`` reports it like any other error."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors reported by ``main`` as one ``error:`` line (exit status 2), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


class _CommandParser(_Parser):
    """A command's parser, given its options by the function ``setup`` names ("module:function") the first time it
    parses or prints its help: only the command that runs is ever built."""

    def __init__(self, *args: Any, setup: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup = setup

    def _set_up(self) -> None:
        if self._setup is not None:
            module, _, function = self._setup.partition(":")
            setup: Callable[[argparse.ArgumentParser], None] = getattr(importlib.import_module(module), function)
            self._setup = None
            setup(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._set_up()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._set_up()
        return super().format_help()

    def format_usage(self) -> str:
        self._set_up()
        return super().format_usage()


def _parser() -> argparse.ArgumentParser:
    """The top-level parser: every command's name and help line; each command's options come when it is chosen."""
    parser = _Parser(prog="transformer-patcher", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"transformer-patcher {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    groups: dict[str, Any] = {}
    for words, (help_line, setup) in COMMANDS.items():
        group, _, name = words.rpartition(" ")
        where = commands
        if group:
            if group not in groups:
                groups[group] = commands.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest=f"{group}_command", required=True, parser_class=_CommandParser
                )
            where = groups[group]
        where.add_parser(name, help=help_line, setup=setup)
    return parser


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
