"""FEVER fact-checking with MiniLM-L6: the paper's Table 1 FEVER experiment (T-Patcher and the four FT baselines).

Two stages, both resumable:

1. Fine-tune all-MiniLM-L6-v2 as a binary claim classifier (SUPPORTS = 1, REFUTES = 0) on the benchmark's
   classifier split (``fever_benchmark(...).extra["finetune"]``, the claims of ``paper_dev``) and save it to
   ``OUT/classifier/``. That classifier is the initial model f_0 of every editing run. Its accuracy on the TrainR set,
   the TestR set and the whole edit set goes to ``OUT/classifier/accuracy.json``. An existing classifier trained
   with the same settings is reused; one trained with other settings is refused (use another --out).
2. Run sequential model editing with every editor in ``--editors`` (``run_experiment``, one folder each:
   ``OUT/patcher``, ``OUT/ft-last``, ...), then write one table across editors to ``OUT/results.md`` and
   ``OUT/results.json``.

Full run (all five editors, 4 folds over the first 400 claims of the edit stream)::

    .venv/bin/python examples/fever/run.py

Two-minute smoke run::

    .venv/bin/python examples/fever/run.py --editors patcher ft-last --folds 1 --max-examples 40 --epochs 1 \
        --finetune-examples 1000 --out /tmp/fever-smoke

Continue an interrupted run (finished editors and folds are skipped, the classifier is reused)::

    .venv/bin/python examples/fever/run.py --resume

On a shared machine, ``--threads 1`` keeps torch to one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from transformer_patcher.cli import SCHEDULE_HELP, SCHEDULES
from transformer_patcher.core.pretrained import MINILM, load_model, resolve_model
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.data.benchmarks import Benchmark, fever_benchmark
from transformer_patcher.experiments.registry import DISPLAY_NAMES, EDITOR_NAMES
from transformer_patcher.experiments.sme.experiment import ExperimentConfig, run_experiment
from transformer_patcher.experiments.sme.report import markdown_table

logger = logging.getLogger("fever")

DEFAULT_EDITORS = ("patcher", "ft-last", "ft-all", "ft-last-kl", "ft-all-kl")
# The paper's BERT-base classifier (Table 1 setting), for comparison only: not measured here.
PAPER_ACCURACY = {"train": 0.941, "test": 0.769, "edit": 0.883}
ACCURACY_LABELS = {"train": "TrainR set (D_tr)", "test": "TestR set (D_test)", "edit": "edit set (D_edit)"}


# --------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/fever"), help="output folder")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding fever/paper_{dev,test}.jsonl (none: the package's search)",
    )
    parser.add_argument(
        "--editors",
        nargs="+",
        choices=EDITOR_NAMES,
        default=list(DEFAULT_EDITORS),
        metavar="EDITOR",
        help=f"any of {', '.join(EDITOR_NAMES)}",
    )
    parser.add_argument("--folds", type=int, default=4, help="independent SME streams")
    parser.add_argument("--max-examples", type=int, default=400, help="claims of the edit stream used (all folds)")
    parser.add_argument("--memory-rows", type=int, default=10_000, help="T-Patcher memory bank size (at most)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="default", help=SCHEDULE_HELP)
    parser.add_argument("--kl-batch", type=int, default=512, help="memory claims in the FT+KL baselines' KL term")
    parser.add_argument("--seed", type=int, default=42, help="data split, classifier training and editing")
    parser.add_argument("--resume", action="store_true", help="continue: skip finished editors and folds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (none: torch's choice)")
    classifier = parser.add_argument_group("classifier fine-tuning")
    classifier.add_argument("--epochs", type=int, default=2, help="passes over the claims")
    classifier.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    classifier.add_argument("--batch-size", type=int, default=32, help="claims per step")
    classifier.add_argument("--max-length", type=int, default=64, help="tokens per claim when fine-tuning")
    classifier.add_argument(
        "--finetune-examples", type=int, default=None, help="train on the first N claims only (none: all)"
    )
    args = parser.parse_args(argv)
    for name in ("folds", "max_examples", "memory_rows", "epochs", "batch_size", "max_length", "finetune_examples"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.folds > args.max_examples:
        parser.error(f"--folds ({args.folds}) cannot exceed --max-examples ({args.max_examples})")
    if len(set(args.editors)) != len(args.editors):
        parser.error("--editors lists an editor twice")
    return args


# -------------------------------------------------------------------------------------------- classifier
def training_settings(args: argparse.Namespace, n_claims: int) -> dict[str, Any]:
    """What determines the classifier: a saved classifier is reused only when these match."""
    return {
        "base_model": MINILM,
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "finetune_examples": n_claims,
    }


def has_model(folder: Path) -> bool:
    weights = any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()
    return (folder / "config.json").is_file() and weights


def fine_tune(pairs: list[tuple[str, int]], args: argparse.Namespace, destination: Path, progress: bool) -> dict:
    """Train MiniLM-L6 + a fresh 2-way head on ``pairs``; save model and tokenizer to ``destination`` atomically."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    set_seed(args.seed)
    path = resolve_model(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.config.id2label = {0: "REFUTES", 1: "SUPPORTS"}
    model.config.label2id = {"REFUTES": 0, "SUPPORTS": 1}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(pairs) / args.batch_size)
    rng = random.Random(args.seed)
    model.train()  # dropout on
    started = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(total=steps_per_epoch * args.epochs, desc="fine-tuning MiniLM-L6", unit="batch", disable=not progress)
    with bar:
        for epoch in range(args.epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for start in range(0, len(order), args.batch_size):
                batch = [pairs[i] for i in order[start : start + args.batch_size]]
                inputs = tokenizer(
                    [text for text, _ in batch],
                    truncation=True,
                    max_length=args.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                labels = torch.tensor([label for _, label in batch])
                loss = model(**inputs, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    seconds = time.perf_counter() - started
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".classifier-", dir=destination.parent))
    try:
        model.save_pretrained(staging)  # writes architectures=["BertForSequenceClassification"]
        tokenizer.save_pretrained(staging)
        if destination.exists():  # a folder without a finished model: left over from an interrupted run
            shutil.rmtree(destination)
        staging.rename(destination)  # a half-written folder is never mistaken for a finished classifier
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    last_epoch = losses[-steps_per_epoch:]
    return {"seconds": round(seconds, 1), "steps": len(losses), "final_epoch_loss": sum(last_epoch) / len(last_epoch)}


def classifier_accuracy(folder: Path, benchmark: Benchmark, max_examples: int) -> dict[str, Any]:
    """Accuracy of the saved classifier, loaded the way the editing runs load it, on the sets the paper reports."""
    model, tokenizer = load_model(str(folder), "classification")
    task = task_for_model(model, tokenizer)
    edit_pairs = [(e.text, e.target) for e in benchmark.examples]
    sets = {"train": benchmark.eval_sets["train"], "test": benchmark.eval_sets["test"], "edit": edit_pairs}
    accuracy: dict[str, Any] = {}
    for name, pairs in sets.items():
        outcomes = score_pairs(model, task, pairs, batch_size=64)
        accuracy[name] = sum(o.correct for o in outcomes) / len(outcomes)
        accuracy[f"{name}_n"] = len(outcomes)
        if name == "edit":  # the part of the edit set the runs stream: how many mistakes there are to edit
            streamed = outcomes[:max_examples]
            accuracy["streamed"] = sum(o.correct for o in streamed) / len(streamed)
            accuracy["streamed_n"] = len(streamed)
            accuracy["streamed_mistakes"] = sum(not o.correct for o in streamed)
    return accuracy


def prepare_classifier(args: argparse.Namespace, benchmark: Benchmark, progress: bool) -> dict[str, Any]:
    folder = args.out / "classifier"
    pairs = benchmark.extra["finetune"]
    if args.finetune_examples is not None:
        pairs = pairs[: args.finetune_examples]
    settings = training_settings(args, len(pairs))
    info_file, accuracy_file = folder / "training.json", folder / "accuracy.json"
    if has_model(folder):
        saved = json.loads(info_file.read_text())["settings"] if info_file.is_file() else None
        if saved != settings:
            raise SystemExit(
                f"{folder} holds a classifier trained with {saved}, not {settings}; "
                "use another --out, or delete that folder to retrain"
            )
        logger.warning("reusing the classifier in %s", folder)
    else:
        print(f"Fine-tuning MiniLM-L6 on {len(pairs)} FEVER claims ({args.epochs} epoch(s)) -> {folder}/", flush=True)
        training = fine_tune(pairs, args, folder, progress)
        info_file.write_text(json.dumps({"settings": settings, **training}, indent=1))
    if accuracy_file.is_file():
        accuracy = json.loads(accuracy_file.read_text())
        if accuracy.get("streamed_n") != min(args.max_examples, len(benchmark.examples)):
            accuracy = None
    else:
        accuracy = None
    if accuracy is None:
        accuracy = classifier_accuracy(folder, benchmark, args.max_examples)
        accuracy_file.write_text(json.dumps(accuracy, indent=1))
    return accuracy


def accuracy_table(accuracy: dict[str, Any]) -> str:
    lines = ["| set | claims | MiniLM-L6 (ours) | BERT-base (paper) |", "|---|---:|---:|---:|"]
    for name, label in ACCURACY_LABELS.items():
        lines.append(f"| {label} | {accuracy[f'{name}_n']} | {accuracy[name]:.3f} | {PAPER_ACCURACY[name]:.3f} |")
    lines.append(
        f"| edit stream (first {accuracy['streamed_n']} claims of D_edit) | {accuracy['streamed_n']} | "
        f"{accuracy['streamed']:.3f} | |"
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.no_progress
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", "run.py", *argv])
    started = time.perf_counter()
    finished = [name for name in args.editors if (args.out / name / "config.json").is_file()]
    if finished and not args.resume:  # run_experiment would refuse too, but only after the classifier stage
        raise SystemExit(
            f"{args.out} already holds runs of {', '.join(finished)}; pass --resume to continue or skip them, "
            "or use another --out"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "commands.log").open("a") as log:  # every invocation, so a resumed run keeps its history
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {command}\n")
    data_dir = str(args.data_dir) if args.data_dir is not None else None

    # The same split the editing runs read (ExperimentConfig.seed is passed to fever_benchmark there too).
    benchmark = fever_benchmark(data_dir, seed=args.seed)
    accuracy = prepare_classifier(args, benchmark, progress)
    print("\nClassifier accuracy (f_0):\n")
    print(accuracy_table(accuracy))

    results: dict[str, dict[str, Any]] = {}
    for name in args.editors:
        print(f"\n== {DISPLAY_NAMES[name]} ({name}) -> {args.out / name}/", flush=True)
        config = ExperimentConfig(
            model=str(args.out / "classifier"),
            data="fever",
            editor=name,
            folds=args.folds,
            max_examples=args.max_examples,
            memory_rows=args.memory_rows,
            schedule=args.schedule,
            seed=args.seed,
            data_dir=data_dir,
            finetune_options={"kl_batch": args.kl_batch},
        )
        t0 = time.perf_counter()
        result = run_experiment(config, args.out / name, resume=args.resume, progress=progress)
        if result is None:  # not the main process under accelerate launch
            return 0
        results[name] = result
        print(f"   done in {time.perf_counter() - t0:.0f} s: {result['summary']}", flush=True)

    rows = [{"editor": results[name]["editor"], "GR": None, **results[name]["summary"]} for name in args.editors]
    table = markdown_table(rows)
    notes = "".join(f"- {metric}: {text}\n" for metric, text in benchmark.notes.items())
    footnote = (
        f"GR is n/a for every editor (benchmark note: {benchmark.notes.get('GR', 'not available')}).\n"
        "TrainR/TestR are accuracies on the TrainR/TestR sets relative to f_0; ER is the share of a fold's earlier "
        "edits still right at its end; seconds_per_edit is the median wall time of one edit. Means over folds.\n"
    )
    wall = time.perf_counter() - started
    markdown = (
        f"# FEVER (Table 1 setting) with MiniLM-L6\n\n"
        f"Command: `{command}`\n"
        f"(every invocation on this folder, with its time, is listed in `{args.out / 'commands.log'}`)\n\n"
        f"## Classifier f_0\n\n{accuracy_table(accuracy)}\n"
        f"## Sequential model editing ({args.folds} fold(s), first {args.max_examples} claims of the edit set, "
        f"schedule {args.schedule}, memory {min(args.memory_rows, len(benchmark.memory))} rows)\n\n"
        f"{table}\n{footnote}\nBenchmark notes:\n{notes}\n"
        f"Wall time of this invocation: {wall:.0f} s (a resumed run counts only its own part).\n"
    )
    payload = {
        "command": command,
        "classifier": {"path": str(args.out / "classifier"), "accuracy": accuracy, "paper_accuracy": PAPER_ACCURACY},
        "settings": {
            "folds": args.folds,
            "max_examples": args.max_examples,
            "memory_rows": args.memory_rows,
            "memory_pairs": len(benchmark.memory),
            "validation_pairs": len(benchmark.validation),
            "schedule": args.schedule,
            "seed": args.seed,
        },
        "notes": benchmark.notes,
        "editors": {
            name: {"display": results[name]["editor"], "summary": results[name]["summary"]} for name in args.editors
        },
        "wall_seconds": round(wall, 1),
    }
    (args.out / "results.md").write_text(markdown)
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print(f"\n{table}\n{footnote}")
    print(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}; per-editor folders in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
