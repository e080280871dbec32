"""How large the written update is against the weight it edits, after the last batch of a sequential run.

Sequential batch editing collapses when the edited matrices' norms grow (Gupta et al., 2024, "Model Editing at
Scale leads to Gradual and Catastrophic Forgetting"). This reads the latest checkpoint of a ``batch run --mode
sequential`` folder and, per edited FFN output projection, compares ``ΔW = up @ down`` with the base weight ``W``:
Frobenius and spectral norm ratios, and the Frobenius norm of the first and last ``--block`` factor columns (the
factors are concatenated in the order they were written, so these are the oldest and newest updates).

    python bench/pmet_norms.py runs/pmet-seq-b100-ns-false runs/pmet-seq-b100-ns-0.2 --out bench/results/pmet_norms.json

Records of the runs read are replaced in ``--out``, others kept, so the file gathers runs read at different times.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from transformer_patcher.core.pretrained import load_model


def layer_norms(checkpoint: Path, model: torch.nn.Module, block: int) -> list[dict]:
    """One row per edited module of the checkpoint's DELTA factors."""
    rows = []
    with safe_open(str(checkpoint), "pt") as tensors:
        for up_name in sorted(name for name in tensors.keys() if name.endswith(".up")):  # noqa: SIM118 (no __iter__)
            module = up_name.removesuffix(".up")
            up = tensors.get_tensor(up_name).double()
            down = tensors.get_tensor(f"{module}.down").double()
            delta = up @ down
            weight = model.get_submodule(module).weight.double()
            rows.append(
                {
                    "module": module,
                    "rank": up.shape[1],
                    "frobenius_ratio": round((delta.norm() / weight.norm()).item(), 4),
                    "spectral_ratio": round(
                        (torch.linalg.matrix_norm(delta, 2) / torch.linalg.matrix_norm(weight, 2)).item(), 4
                    ),
                    "oldest_columns_norm": round((up[:, :block] @ down[:block]).norm().item(), 3),
                    "newest_columns_norm": round((up[:, -block:] @ down[-block:]).norm().item(), 3),
                    "weight_norm": round(weight.norm().item(), 3),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="sequential batch-run folders")
    parser.add_argument("--block", type=int, default=100, help="columns counted as the oldest / newest update")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, _ = load_model("smollm2-135m", "generation")
    records = []
    checkpoints = [(run, path) for run in args.runs for path in sorted((run / "checkpoints").glob("*.json"))]
    for run, meta_file in checkpoints:
        meta = json.loads(meta_file.read_text())
        record = meta["state"]["record"]
        records.append(
            {
                "run": run.name,
                "editor": record["editor"],
                "batch_size": record["batch_size"],
                "batch_index": record["batch_index"],
                "edited": record["edited"],
                "perplexity_change": record["perplexity.change"],
                "layers": layer_norms(run / "checkpoints" / meta["tensors"], model, args.block),
                "command": "python " + shlex.join(sys.argv),
            }
        )
    saved = json.loads(args.out.read_text()) if args.out.exists() else []
    kept = [r for r in saved if r["run"] not in {run.name for run in args.runs}]
    args.out.write_text(json.dumps(kept + records, indent=1) + "\n")
    for record in records:
        for row in record["layers"]:
            print(record["run"], record["batch_index"], row)


if __name__ == "__main__":
    main()
