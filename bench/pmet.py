"""PMET cost on SmolLM2-135M: the key-statistics precompute, and seconds per batch for several batch sizes.

- ``covariance``: ``collect_second_moments`` for the preset's 6 layers over N WikiText-2 passages (no cache), the
  tokens seen, and seconds per 1,000 tokens;
- ``batches``: for each batch size b, ``--repeats`` edits of b CounterFact facts from the original model, each timed
  as its two phases, target vectors (``compute_targets``; linear in b) and the closed-form layer loop
  (``compute_deltas``: keys over the context templates, a d_ff × d_ff solve per layer), plus their sum. Medians.
  Records come from the end of the 1k file (900+), away from the reported cases.

    python bench/pmet.py --out bench/results/pmet.json [--texts 2000] [--batch-sizes 1 10] [--variant pmet]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.benchmarks import wikitext_texts
from transformer_patcher.data.loaders import find_data_file, load_counterfact
from transformer_patcher.methods.pmet import (
    EditRequest,
    collect_second_moments,
    compute_deltas,
    compute_targets,
    pmet_hparams,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=2000, help="WikiText-2 passages (~128 tokens) for statistics")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=("pmet", "memit"), default="pmet")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", "generation")
    hparams = pmet_hparams(variant=args.variant)

    texts = wikitext_texts("valid")[: args.texts]
    start = time.perf_counter()
    moments = collect_second_moments(model, tokenizer, texts, hparams.layers, progress=False)
    seconds = time.perf_counter() - start
    tokens = next(iter(moments.values())).tokens
    covariance = {
        "texts": len(texts),
        "tokens": tokens,
        "layers": len(hparams.layers),
        "key_width": int(next(iter(moments.values())).matrix.shape[0]),
        "seconds": seconds,
        "seconds_per_1k_tokens": seconds / tokens * 1000,
    }
    print(json.dumps({"covariance": covariance}), flush=True)

    rows = list(load_counterfact(find_data_file("counterfact/counterfact-edit-1k.json")))[900:]
    templates = hparams.templates(model, tokenizer)
    batches = []
    offset = 0
    for size in args.batch_sizes:
        timings = {"targets": [], "update": [], "total": []}
        for _ in range(args.repeats):
            chunk = rows[offset : offset + size]
            offset += size
            requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in chunk]
            began = time.perf_counter()
            targets = compute_targets(model, tokenizer, requests, hparams, templates, progress=False)
            middle = time.perf_counter()
            compute_deltas(model, tokenizer, requests, hparams, moments, templates, targets)
            done = time.perf_counter()
            timings["targets"].append(middle - began)
            timings["update"].append(done - middle)
            timings["total"].append(done - began)
        row = {"batch_size": size, "repeats": args.repeats}
        row |= {f"{phase}_seconds_median": statistics.median(values) for phase, values in timings.items()}
        row["seconds_per_edit"] = row["total_seconds_median"] / size
        batches.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "benchmark": "pmet",
        "model": "smollm2-135m",
        "variant": args.variant,
        "hparams": hparams.to_dict(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "covariance": covariance,
        "batches": batches,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
