"""``edit`` and ``eval``: fix mistakes into a patch-set folder, and score one (its own fixes, or a benchmark)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from transformer_patcher.cli.options import (
    BENCHMARK_NAMES,
    SCHEDULE_HELP,
    SCHEDULES,
    data_folder,
    file_to_write,
    folder_to_write,
    format_options,
    input_file,
    model_and_data,
    non_negative,
    overrides,
    positive,
    suite_option,
    suite_overrides,
)
from transformer_patcher.cli.output import md_head, md_row, one_line
from transformer_patcher.core.atomic import recover_folder, write_text_atomic
from transformer_patcher.core.jsonl import json_lines
from transformer_patcher.core.prompts import PromptFormat
from transformer_patcher.core.wording import count
from transformer_patcher.experiments.evaluation import SuiteConfig
from transformer_patcher.experiments.session import EditSession
from transformer_patcher.experiments.sme import accuracy, patch_set_eval
from transformer_patcher.methods.patcher.config import EditConfig
from transformer_patcher.tuners.edit_log import read_edit_log


# ---------------------------------------------------------------------------------------------------- edit
def setup_edit(edit: argparse.ArgumentParser) -> None:
    edit.add_argument("--model", required=True, help="short name (smollm2-135m, minilm-l6), Hub id or local folder")
    edit.add_argument("--patches", type=folder_to_write, required=True, help="patch-set folder: extended if it exists")
    edit.add_argument("--text", help="the input the model gets wrong")
    edit.add_argument("--target", help="the right output (a label index for classifiers)")
    edit.add_argument(
        "--file",
        type=input_file,
        help="JSON lines of {'text': ..., 'target': ..., 'subject': optional} to edit in order",
    )
    edit.add_argument("--subject", help="what --text is about (eval asks the same question of other subjects)")
    edit.add_argument(
        "--rewordings",
        type=input_file,
        help="JSON lines of {'text': ..., 'rephrase': ..., 'subject': ...}: how your prompts get reworded; a fix "
        "whose prompt has a text's wording also learns its rephrase's (docs/editing.md, rule 20)",
    )
    format_options(edit)
    edit.add_argument(
        "--memory", choices=(*BENCHMARK_NAMES, "none"), default=None, help="memory set (default: by task)"
    )
    edit.add_argument("--memory-rows", type=positive, default=10_000)
    edit.add_argument(
        "--question-rows",
        type=non_negative,
        default=20_000,
        help="generators: memory rows over the model's own answers",
    )
    edit.add_argument("--schedule", choices=SCHEDULES, default="default", help=SCHEDULE_HELP)
    edit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="EditConfig field override for these edits, e.g. subject_key=60 (docs/editing.md)",
    )
    edit.add_argument("--data-dir", type=data_folder, default=None)
    edit.add_argument("--no-progress", action="store_true")
    edit.set_defaults(handler=edit_patches)


def edit_patches(args: argparse.Namespace) -> int:
    requests = _edit_requests(args)
    options = overrides(args.set, EditConfig)
    EditConfig.mode(args.schedule, **options)  # a bad value is refused before anything is loaded or written
    check_edit_log(args.patches)
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
        edit_options=options,
        rewordings=args.rewordings,
    ) as session:
        before = session.num_patches
        print(one_line(session.memory.describe()) + "\n")
        print(md_head(["edit id", "fixed", "needed", "neurons", "steps", "seconds", "text"], "rllrrrl"))
        answered = []
        for text, target, subject in requests:
            record = session.edit(text, target, subject)
            if not record.needed:  # its id stays unused: the next fix takes it
                answered.append((text, target))
            edit_id = record.edit_id if record.needed else "-"
            cells = [edit_id, record.success, record.needed, record.neurons, record.steps, f"{record.seconds:.1f}"]
            print(md_row([*cells, text[:60]]))
        for text, target in answered:
            print(f"- the model already answers {text[:60]!r} with {target!r}: nothing added")
        if len(answered) == len(requests):  # nothing changed: the folder is left as it was
            print("\nnothing to save: no edit was needed")
            return 0
        session.save()
    new = session.num_patches - before
    print(f"\nsaved {count(session.num_patches, 'patch', 'patches')} ({new} new) to {one_line(args.patches)}/")
    return 0


def _edit_requests(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    if args.file is not None:
        if args.text is not None or args.target is not None or args.subject is not None:
            raise ValueError("give either --file or --text/--target/--subject, not both")
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


def check_edit_log(folder: Path) -> None:
    """A patch folder a crash left aside is put back, and its edit log (each line's id, text and target, which
    ``eval`` and ``edit`` read) is checked before anything is loaded or locked."""
    recover_folder(folder)
    read_edit_log(folder)


# ---------------------------------------------------------------------------------------------------- eval
def setup_eval(evaluate: argparse.ArgumentParser) -> None:
    model_and_data(evaluate)
    evaluate.add_argument("--patches", type=Path, default=None, help="patch set; without --data its edit log is scored")
    evaluate.add_argument("--batch-size", type=positive, default=32)
    format_options(evaluate)
    suite_option(evaluate, default="full")
    evaluate.add_argument("--out", type=file_to_write, default=None, help="also write the results as JSON here")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=evaluate_patches, data=None)


def evaluate_patches(args: argparse.Namespace) -> int:
    if args.data is None:
        return _eval_patch_set(args)
    table = accuracy.evaluate_benchmark(
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
    print(md_head(columns, "l" * len(columns)))
    for row in table:
        print(md_row(row.values()))
    _write_json(args.out, table)
    return 0


def _eval_patch_set(args: argparse.Namespace) -> int:
    if args.patches is None:
        raise ValueError("give --data (a benchmark or a data file), or --patches DIR to score its own fixes")
    if args.prompt_format != "raw" or args.append_eos:
        raise ValueError(
            "--prompt-format/--append-eos apply with --data; a patch set's fixes are scored in the format each was "
            "made in (its edit log), and the suite asks raw and chat"
        )
    suite = SuiteConfig.preset(args.suite, batch_size=args.batch_size, **suite_overrides(args))
    check_edit_log(args.patches)
    report = patch_set_eval.evaluate_patch_set(
        args.model, args.patches, suite, args.data_dir, progress=not args.no_progress
    )
    print(md_head(["edit id", "format", "text", "target", "base answer", "patched answer", "fixed"], "rllllll"))
    for e in report.edits:
        print(
            md_row(
                [e["edit_id"], e["format"], e["text"][:60], e["target"], e["base"][:40], e["patched"][:40], e["fixed"]]
            )
        )
    print("\n" + md_head(["part", "base exact", "base token", "patched exact", "patched token", "n"], "lrrrrr"))
    ppl = ""
    for part, after in report.patched.items():
        before = report.base[part]
        if "perplexity" in after:
            ppl = f"perplexity   base {before['perplexity']:.3f} → patched {after['perplexity']:.3f}"
            continue
        measures = [before.get("exact"), before.get("token"), after.get("exact"), after.get("token")]
        print(md_row([part, *("" if m is None else m for m in measures), after["n"]]))
    if ppl:
        print(f"\n{ppl} ({100 * report.patched['perplexity']['change']:+.2f} %), WikiText-2 test")
    if report.leaks:
        print(
            "\nNeighbours whose answer changed:\n"
            + md_head(["part", "question", "base answer", "patched answer"], "llll")
        )
        for leak in report.leaks[:20]:
            print(md_row([leak["part"], leak["question"][:60], leak["base"][:40], leak["patched"][:40]]))
        if len(report.leaks) > 20:
            print(f"... {len(report.leaks) - 20} more in --out")
    for note in report.notes:
        print(f"- {one_line(note)}")
    print("- exact: the fix is written then ends (edits, rephrases), or the greedy output equals the base model's")
    _write_json(args.out, report.to_dict())
    return 0


def _write_json(path: Path | None, data: Any) -> None:
    if path is not None:
        write_text_atomic(path, json.dumps(data, indent=1))
