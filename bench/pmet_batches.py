"""Collect batch-run results into ``bench/results/pmet_batches.json``: one record per (editor, batch size, mode) of
an independent run and one per batch index of a sequential run, each with the command that produced it.

    python bench/pmet_batches.py runs/pmet-counterfact runs/pmet-sequential ... [--out bench/results/pmet_batches.json]
    python bench/pmet_batches.py bench/results/pmet_scored.jsonl   # rows of bench/pmet_tune.py (one batch each)

A run folder is what ``transformer-patcher batch run`` writes; its ``results.json`` holds the rows and the command.
A ``.jsonl`` file is what ``bench/pmet_tune.py`` appends: one batch of all its records per row.
Records of the same run folder are replaced, others kept, so the file gathers runs made at different times.
"""

from __future__ import annotations

import argparse
import json
import shlex
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
            **({"sequential_targets": config["sequential_targets"]} if "sequential_targets" in config else {}),
            "pmet_options": config["pmet_options"],
            "device": config.get("device", "cpu"),
            **{k: v for k, v in row.items() if k != "mode"},
            "command": results["command"],
        }
        for row in rows
    ]


def tune_records(path: Path) -> list[dict[str, Any]]:
    """The edited rows of a ``bench/pmet_tune.py`` file, as independent batches of all their records."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for row in rows:
        if row["lam"] is None:
            continue
        options = {**row["options"], "mom2_update_weight": row["lam"], **row.get("trial", {})}
        variant = options.get("variant", "pmet")
        start, stop = row["records"]
        settings = " ".join(shlex.quote(f"{k}={json.dumps(v)}") for k, v in row["options"].items())
        out.append(
            {
                "run": path.name,
                "model": "smollm2-135m",
                "data": row["data"],
                "mode": "independent",
                "pmet_options": options,
                "editor": "MEMIT" if variant == "memit" else "PMET",
                "batch_size": stop - start,
                **{k: row[k] for k in row if k.endswith(("_acc", "_score"))},
                "seconds_per_fact_targets": row["target_s_per_request"],
                "command": f"python bench/pmet_tune.py --data counterfact/{row['data']} --start {start} "
                f"--n {stop - start} --set {settings} --lams {row['lam']:g} "
                f"--trials {shlex.quote(json.dumps(row.get('trial', {})))} --out {path}",
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="batch-run folders or bench/pmet_tune.py .jsonl files")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pmet_batches.json"))
    args = parser.parse_args()
    names = {folder.name for folder in args.runs}
    kept = json.loads(args.out.read_text()) if args.out.is_file() else []
    merged = [r for r in kept if r["run"] not in names] + [
        r for path in args.runs for r in (tune_records(path) if path.suffix == ".jsonl" else records(path))
    ]
    args.out.write_text(json.dumps(merged, indent=1))
    print(f"{len(merged)} records in {args.out}")


if __name__ == "__main__":
    main()
