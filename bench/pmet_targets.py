"""PMET target vectors alone: seconds per fact on SmolLM2-135M, and what they reach.

Optimises the targets of ``--n`` CounterFact facts (records 900+, away from the reported cases; ``--data-kind zsre``
reads zsRE records 900+ of ``zsre_mend_train-1k.json`` instead, issue 18's dev part) in one
``compute_targets`` call with the ``smollm2-135m`` preset, and records seconds per fact, the steps and the final mean
probability of each target. ``--against FILE`` compares the targets with an earlier run's (``--save`` writes them):
run it once on another version of the package (``PYTHONPATH=<checkout>/src``) to see that a speed-up changed
nothing but the time.

    python bench/pmet_targets.py --n 8 --out bench/results/pmet_targets.json [--save T.safetensors] [--against T]

``--settings '{"settled_steps": 0}' '{}' --repeats 3`` times option sets against the preset in turn, in one process,
and reports each one's median and its speed-up over the first. A setting's ``"window"`` sets how many steps' worth
of requests share a window (``methods/pmet/targets.py``, ``WINDOW``; 1: fixed chunks, none waits to take a finished
request's place), and its ``"group"`` how many requests share a packed sequence of a step (``GROUP``; one at least
``requests_per_step`` packs each step into one sequence, as before the thirty-fourth round).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.loaders import find_data_file, load_counterfact, load_zsre
from transformer_patcher.methods.pmet import EditRequest, Targets, compute_targets, pmet_hparams
from transformer_patcher.methods.pmet import targets as targets_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--data-kind", choices=("counterfact", "zsre"), default="counterfact")
    parser.add_argument("--variant", choices=("pmet", "memit"), default="pmet")
    parser.add_argument("--requests-per-step", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--settings", nargs="+", default=["{}"], metavar="JSON", help="PMETHyperParams option sets, timed in turn"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the settings (medians are reported)")
    parser.add_argument("--label", default="", help="what this run measures (kept in the record)")
    parser.add_argument("--save", type=Path, help="write the first setting's targets here (safetensors)")
    parser.add_argument("--against", type=Path, help="an earlier run's --save file to compare the first setting with")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", "generation")
    base = pmet_hparams(variant=args.variant)
    if args.requests_per_step is not None:
        base = base.with_options(requests_per_step=args.requests_per_step)
    settings = [json.loads(text) for text in args.settings]
    if args.data_kind == "zsre":
        records = load_zsre(find_data_file("zsre/zsre_mend_train-1k.json"))
    else:
        records = load_counterfact(find_data_file("counterfact/counterfact-edit-1k.json"))
    rows = records.select(range(900, 900 + args.n))
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    windows = [options.get("window", targets_module.WINDOW) for options in settings]
    groups = [options.get("group", targets_module.GROUP) for options in settings]
    local = ("window", "group")
    hparams = [base.with_options(**{k: v for k, v in options.items() if k not in local}) for options in settings]
    # each setting's own context templates (a setting may change how many there are)
    templates = [h.templates(model, tokenizer) for h in hparams]
    seconds: list[list[float]] = [[] for _ in settings]
    results: list[Targets] = []
    for repeat in range(args.repeats):
        for i in range(len(settings)):  # alternating, so drift in the machine's load hits every setting
            targets_module.WINDOW, targets_module.GROUP = windows[i], groups[i]
            start = time.perf_counter()
            targets = compute_targets(model, tokenizer, requests, hparams[i], templates[i], False)
            seconds[i].append((time.perf_counter() - start) / args.n)
            if repeat == 0:
                results.append(targets)
    medians = [statistics.median(times) for times in seconds]
    record: dict[str, Any] = {
        "label": args.label,
        "facts": args.n,
        "data_kind": args.data_kind,
        "variant": args.variant,
        "requests_per_step": base.requests_per_step,
        "repeats": args.repeats,
        "settings": [
            {
                "options": options,
                "seconds_per_fact": median,
                "seconds_per_fact_each": times,
                "speed_up_over_first": medians[0] / median,
                "mean_steps": statistics.mean(targets.steps),
                "steps": targets.steps,
                "probabilities": targets.probabilities,
            }
            for options, median, times, targets in zip(settings, medians, seconds, results, strict=True)
        ],
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
    }
    if args.save:
        save_file({"values": results[0].values, "init": results[0].init}, str(args.save))
    if args.against:
        earlier = load_file(str(args.against))
        scale = earlier["values"].norm(dim=1)
        change = (results[0].values - earlier["values"]).norm(dim=1) / scale
        record["largest_relative_difference"] = float(change.max())
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*runs, record], indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
