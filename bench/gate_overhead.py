"""What a saved, gated patch set costs a forward pass, and the share of it that its bare subject reads (rule 18) add.

Loads a patch set (for example the 2,895 neurons of the 1,000-edit raw zsRE stream) on its base model and times the
same batch three ways, interleaved so the machine's noise falls on all alike: the base model (adapter disabled), the
patch set as saved, and the patch set with its bare subject reads zeroed (the gate then reads the edit's subject read
alone, as before rule 18). Medians and their ratios to the base. Writes JSON.

    python bench/gate_overhead.py --patches runs/zsre-raw-bare-1k/patches/fold-0 --out bench/results/gate_overhead.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.tuners.patcher.model import PatcherModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base, _ = load_model(args.model, "generation")
    model = PatcherModel.from_pretrained(base, args.patches).eval()
    layer = model.base_model.patch_layer()
    bare = layer.patch_frozen_bare_subjects["default"]
    saved = bare.clone()
    ids = torch.randint(100, 10_000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"base": [], "patched": [], "without bare reads": []}

    def timed(name: str) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        times[name].append((time.perf_counter() - start) * 1000)

    for repeat in range(args.repeats + 2):  # the first two rounds warm up and are dropped
        with model.disable_adapter():
            timed("base")
        timed("patched")
        bare.zero_()
        timed("without bare reads")
        bare.copy_(saved)
        if repeat < 2:
            for values in times.values():
                values.clear()
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "patches": str(args.patches),
        "neurons": layer.num_patches(),
        "with_bare_read": int((saved.norm(dim=1) > 0).sum()),
        "batch": [1, args.tokens],
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "median_ms": {name: round(value, 2) for name, value in medians.items()},
        "ratio_to_base": {name: round(value / medians["base"], 4) for name, value in medians.items()},
        "command": "python " + shlex.join(sys.argv),
    }
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
