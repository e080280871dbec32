"""``plot RUN_DIR``: (re)draw the figures of a finished ``sme run`` from its results.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformer_patcher.cli.output import one_line
from transformer_patcher.experiments.plots import latency_histogram, metrics_curve


def setup(plot: argparse.ArgumentParser) -> None:
    plot.add_argument("run_dir", type=Path)
    plot.set_defaults(handler=plot_run)


def plot_run(args: argparse.Namespace) -> int:
    results_file = args.run_dir / "results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file} not found: give the --out folder of a finished `sme run`")
    folds = json.loads(results_file.read_text())["folds"]
    written = [metrics_curve(folds, args.run_dir / "metrics.png")]
    if any(r["needed"] for fold in folds for r in fold["records"]):
        written.append(latency_histogram(folds, args.run_dir / "latency.png"))
    written += sorted((args.run_dir / "heatmaps").glob("*.png"))
    print("\n".join(one_line(path) for path in written))
    return 0
