"""The reliability figures of docs/reliability.md: crash safety under SIGKILL and counted fuzz campaigns.

- ``crash``: a real ``sme run`` (tiny GPT-2, zsRE-format stream) killed ``--kills`` times over ``--examples``
  examples and resumed each time, compared with an uninterrupted run (``tests/crash_campaign.py``); with
  ``--fallback-swap`` its folder swaps take the two-rename fallback (no ``renameat2``) and one kill lands between
  the two renames, recorded as ``crash-fallback-swap``;
- ``fuzz``: every campaign of ``tests/fuzz_files.py`` (untrusted adapter, memory, statistics and checkpoint files)
  and ``tests/fuzz_inputs.py`` (data loaders, configs, edit inputs) at ``--cases`` examples each.

Each part is merged into the JSON file, so the two can run separately:

    python bench/reliability.py --parts crash --out bench/results/reliability.json
    python bench/reliability.py --parts crash --fallback-swap --out bench/results/reliability.json
    python bench/reliability.py --parts fuzz --cases 500 --out bench/results/reliability.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
FUZZ_MODULES = ("fuzz_files", "fuzz_inputs")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers' own, once per model


def crash_part(args: argparse.Namespace) -> dict:
    from crash_campaign import run_crash_campaign

    with tempfile.TemporaryDirectory() as root:
        return run_crash_campaign(
            Path(root), n_examples=args.examples, n_kills=args.kills, seed=args.seed, fallback_swap=args.fallback_swap
        )


def fuzz_part(args: argparse.Namespace) -> dict:
    from fuzzing import CAMPAIGNS

    for module in FUZZ_MODULES:
        importlib.import_module(module)
    results = {}
    for name, campaign in CAMPAIGNS.items():
        start = time.perf_counter()
        tally = campaign(args.cases)
        results[name] = {
            "cases": sum(tally.values()),
            "outcomes": dict(tally.most_common()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"{name}: {results[name]['cases']} cases, {results[name]['outcomes']}", flush=True)
    return {"max_examples": args.cases, "campaigns": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("crash", "fuzz"), default=["crash", "fuzz"])
    parser.add_argument("--examples", type=int, default=200, help="stream length of the crash campaign")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fallback-swap", action="store_true", help="crash: force the two-rename folder swap and kill between them"
    )
    parser.add_argument("--cases", type=int, default=500, help="max examples per fuzz campaign")
    parser.add_argument("--out", type=Path, default=Path("bench/results/reliability.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for part in args.parts:
        start = time.perf_counter()
        figures = crash_part(args) if part == "crash" else fuzz_part(args)
        figures["command"] = "python " + " ".join(sys.argv)
        figures["wall_seconds"] = round(time.perf_counter() - start, 1)
        figures["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
        results["crash-fallback-swap" if part == "crash" and args.fallback_swap else part] = figures
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: v for k, v in figures.items() if k not in ("kills", "campaigns")}, indent=1))


if __name__ == "__main__":
    main()
