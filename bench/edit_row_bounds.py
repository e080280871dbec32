"""What sets a long stream's thresholds: the built memory or the earlier edits' own rows.

Reads a finished ``sme run``'s last checkpoint (its committed patches and the memory rows its edits appended, in
stream order) and the built memory bank it trained against (``--memory``, the cached file). For each edit's first
patch (the first answer token's), the highest pre-activation ``q·k + b`` over the built memory and over the rows the
*earlier* edits appended: the solved key puts its threshold just above the highest row it must stay below, so the
higher of the two is what bounded it. Reported per block of ``--block`` edits: how often the earlier edits' rows were
that bound (above the built memory's highest, within 0.2 of the -1 the key is placed at), and the medians.

Why: a gated patch never meets an earlier edit's text unless that text opens its gate, yet every earlier edit's rows
bounded it, and a stream piles up rows that read like its questions. This is the measurement behind rule 16
(``EditConfig.gated_edit_rows``).

    python bench/edit_row_bounds.py --run runs/lifelong/zsre-raw-weak-1k \\
        --memory ~/.cache/transformer_patcher/memory/memory-30000-e0a25e33588b602c.safetensors \\
        --out bench/results/edit_row_bounds.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from subject_gate import record_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="an sme run folder with checkpoints/")
    parser.add_argument("--memory", type=Path, required=True, help="the built memory bank the run used")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    checkpoint = sorted((args.run / "checkpoints").glob("fold-0.*.safetensors"))[-1]
    state = load_file(str(checkpoint))
    keys, bias, ids = state["patch_frozen_keys"], state["patch_frozen_bias"], state["patch_frozen_edit_ids"].tolist()
    columns = torch.tensor(sorted({edit: ids.index(edit) for edit in dict.fromkeys(ids)}.values()))
    keys, bias = keys[columns], bias[columns]
    appended = state["memory.appended"] @ keys.T + bias  # (rows, edits)
    own = appended.argmax(0)  # each first patch's own first read: where it fires at the edit's height
    earlier = torch.stack([appended[: int(o), i].max() if o else torch.tensor(-torch.inf) for i, o in enumerate(own)])
    built = (load_file(str(args.memory))["rows"].float() @ keys.T + bias).amax(0)
    blocks = []
    for start in range(0, len(columns), args.block):
        part = slice(start, start + args.block)
        e, b = earlier[part], built[part]
        blocks.append(
            {
                "edits": f"{start}-{start + len(e) - 1}",
                "earlier_rows_bound": round(float(((e > b) & (e > -1.2)).float().mean()), 2),
                "built_memory_bounds": round(float((b > -1.1).float().mean()), 2),
                "median_earlier": round(float(e.median()), 2),
                "median_built": round(float(b.median()), 2),
            }
        )
    record_result({"run": str(args.run), "checkpoint": checkpoint.name, "blocks": blocks}, args.out)


if __name__ == "__main__":
    main()
