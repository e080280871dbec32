"""What stopping the key-statistics pass after the deepest edited FFN saves: the same ``collect_second_moments``
with ``up_to`` on and off, alternating, in one process (SmolLM2-135M, WikiText-2 validation passages).

    python bench/pmet_stats_speed.py --texts 48 --repeats 3 --out bench/results/pmet_stats_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import transformer_patcher.methods.pmet.covariance as covariance
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.benchmarks import wikitext_texts

LAYERS = (3, 4, 5, 6, 7, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", "generation")
    texts = wikitext_texts("valid")[: args.texts]
    stopping = covariance.up_to
    seconds: dict[str, list[float]] = {"stopped": [], "full": []}
    matrices: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for mode in seconds:
            covariance.up_to = stopping if mode == "stopped" else (lambda _module: contextlib.nullcontext())
            start = time.perf_counter()
            moments = covariance.collect_second_moments(model, tokenizer, texts, LAYERS, progress=False)
            seconds[mode].append(time.perf_counter() - start)
            matrices[mode] = moments[LAYERS[-1]].matrix
    covariance.up_to = stopping
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    record = {
        "command": f"python bench/pmet_stats_speed.py --texts {args.texts} --repeats {args.repeats} --out {args.out}",
        "threads": torch.get_num_threads(),
        "texts": args.texts,
        "layers": list(LAYERS),
        "seconds": seconds,
        "median_seconds": medians,
        "speedup": medians["full"] / medians["stopped"],
        "same_matrices": bool(torch.allclose(matrices["stopped"], matrices["full"])),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
