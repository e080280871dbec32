"""What one step of PMET's target optimisation costs, by how many requests it holds, and where the time goes.

Optimises the targets of ``--n`` zsRE dev records (900+) with the default preset, timing every step's forward and
backward (``backward_step``) by the number of requests in it, and the window's whole-prompt forward
(``prefix_keys``); then profiles the first ``requests_per_step`` records' targets and records the share of CPU time of
the heaviest operators.

    python bench/pmet_step_costs.py --n 24 --out bench/results/pmet_step_costs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.loaders import find_data_file, load_zsre
from transformer_patcher.methods.pmet import EditRequest, compute_targets, pmet_hparams
from transformer_patcher.methods.pmet import targets as targets_module


def timed(function: Any, log: list[tuple[int, float]], size: Any) -> Any:
    """``function`` wrapped to append ``(size(args), seconds)`` to ``log`` at each call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = function(*args, **kwargs)
        log.append((size(args), time.perf_counter() - start))
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=24)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", "generation")
    hparams = pmet_hparams()
    templates = hparams.templates(model, tokenizer)
    rows = load_zsre(find_data_file("zsre/zsre_mend_train-1k.json")).select(range(900, 900 + args.n))
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    steps: list[tuple[int, float]] = []
    prefixes: list[tuple[int, float]] = []
    step, prefix = targets_module.backward_step, targets_module.prefix_keys
    targets_module.backward_step = timed(step, steps, lambda a: len(a[-1]))
    targets_module.prefix_keys = timed(prefix, prefixes, lambda a: a[1].n_requests)
    start = time.perf_counter()
    result = compute_targets(model, tokenizer, requests, hparams, templates, False)
    total = time.perf_counter() - start
    targets_module.backward_step, targets_module.prefix_keys = step, prefix
    by_size: dict[int, list[float]] = defaultdict(list)
    for size, seconds in steps:
        by_size[size].append(seconds)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        compute_targets(model, tokenizer, requests[: hparams.requests_per_step], hparams, templates, False)
    events = profiler.key_averages()
    cpu = sum(e.self_cpu_time_total for e in events)
    heaviest = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    record = {
        "facts": args.n,
        "seconds_per_fact": total / args.n,
        "mean_steps": statistics.mean(result.steps),
        "step_seconds_by_requests": {
            str(size): {"steps": len(times), "median_seconds": statistics.median(times)}
            for size, times in sorted(by_size.items())
        },
        "steps_seconds": sum(seconds for _, seconds in steps),
        "whole_prompt_forwards_seconds": sum(seconds for _, seconds in prefixes),
        "cpu_share_of_heaviest_operators": {e.key: e.self_cpu_time_total / cpu for e in heaviest},
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "command": f"python bench/pmet_step_costs.py --n {args.n} --out {args.out}",
    }
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
