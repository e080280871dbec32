"""PMET target vectors alone: seconds per fact on SmolLM2-135M, and what they reach.

Optimises the targets of ``--n`` CounterFact facts (records 900+, away from the reported cases) in one
``compute_targets`` call with the ``smollm2-135m`` preset, and records seconds per fact, the steps and the final mean
probability of each target. ``--against FILE`` compares the targets with an earlier run's (``--save`` writes them):
run it once on another version of the package (``PYTHONPATH=<checkout>/src``) to see that a speed-up changed
nothing but the time.

    python bench/pmet_targets.py --n 8 --out bench/results/pmet_targets.json [--save T.safetensors] [--against T]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.loaders import find_data_file, load_counterfact
from transformer_patcher.methods.pmet import EditRequest, compute_targets, context_templates, pmet_hparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--variant", choices=("pmet", "memit"), default="pmet")
    parser.add_argument("--requests-per-step", type=int, default=8)
    parser.add_argument("--label", default="", help="what this run measures (kept in the record)")
    parser.add_argument("--save", type=Path, help="write the targets here (safetensors)")
    parser.add_argument("--against", type=Path, help="an earlier run's --save file to compare with")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", "generation")
    hparams = pmet_hparams(variant=args.variant, requests_per_step=args.requests_per_step)
    rows = load_counterfact(find_data_file("counterfact/counterfact-edit-1k.json")).select(range(900, 900 + args.n))
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    templates = context_templates(model, tokenizer, hparams.context_template_lengths)
    start = time.perf_counter()
    targets = compute_targets(model, tokenizer, requests, hparams, templates, progress=False)
    seconds = time.perf_counter() - start
    record = {
        "label": args.label,
        "facts": args.n,
        "variant": args.variant,
        "requests_per_step": args.requests_per_step,
        "seconds_per_fact": seconds / args.n,
        "steps": targets.steps,
        "probabilities": targets.probabilities,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
    }
    if args.save:
        save_file({"values": targets.values, "init": targets.init}, str(args.save))
    if args.against:
        earlier = load_file(str(args.against))
        scale = earlier["values"].norm(dim=1)
        record["largest_relative_difference"] = float(((targets.values - earlier["values"]).norm(dim=1) / scale).max())
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*runs, record], indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
