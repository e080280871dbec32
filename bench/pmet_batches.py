"""Collect batch-run results into ``bench/results/pmet_batches.json``: one record per (editor, batch size, mode) of
an independent run and one per batch index of a sequential run, each with the command that produced it.

    python bench/pmet_batches.py runs/pmet-counterfact runs/pmet-sequential ... [--out bench/results/pmet_batches.json]

A run folder is what ``transformer-patcher batch run`` writes; its ``results.json`` holds the rows and the command.
Records of the same run folder are replaced, others kept, so the file gathers runs made at different times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def records(folder: Path) -> list[dict[str, Any]]:
    """The rows of one run folder's ``results.json``, without the unedited baseline, each with its run and command."""
    results = json.loads((folder / "results.json").read_text())
    config = results["config"]
    rows = [row for row in results["rows"] if row["editor"] != "unedited"]
    return [
        {
            "run": folder.name,
            "model": config["model"],
            "data": config["data"],
            "mode": row.get("mode", "independent"),
            "pmet_options": config["pmet_options"],
            **{k: v for k, v in row.items() if k != "mode"},
            "command": results["command"],
        }
        for row in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="batch-run folders")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pmet_batches.json"))
    args = parser.parse_args()
    names = {folder.name for folder in args.runs}
    kept = json.loads(args.out.read_text()) if args.out.is_file() else []
    merged = [r for r in kept if r["run"] not in names] + [r for folder in args.runs for r in records(folder)]
    args.out.write_text(json.dumps(merged, indent=1))
    print(f"{len(merged)} records in {args.out}")


if __name__ == "__main__":
    main()
