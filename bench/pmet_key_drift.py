"""How far the first sequential batch's keys move under the later batches, and what the later updates do there.

With the written keys counted (``keep_written``), each later batch's solve keeps its update silent at the keys the
earlier facts had when they were written (``Kₚ Kₚᵀ``). If the later batches' writes in the layers below move those
facts' keys, the later updates act where the solve never looked. This reads a ``batch run --mode sequential``
folder's last checkpoint and, for batch 1's facts (cases ``0 … size − 1``), at each edited layer:

- the keys as batch 1 wrote them (the layer loop's keys, with batch 1's own update applied, its first ``size``
  factor columns: one per fact without refine rounds) and as the edited model now reads them;
- ``drift``: ``‖k_now − k_written‖ / ‖k_written‖`` per fact;
- the later batches' update ``ΔW_later`` (every other column) at both: ``‖ΔW_later k‖ / ‖ΔW_1 k_written‖``, what
  the later writes add to batch 1's facts' outputs, as a share of what batch 1 wrote for them.

    python bench/pmet_key_drift.py runs/pmet-seq-b100-kw-ws15-orig --out bench/results/pmet_key_drift.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from pmet_norms import layer_index
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.experiments.sme.batch_experiment import BatchExperimentConfig, load_cases
from transformer_patcher.experiments.sme.run_state import load_checkpoint
from transformer_patcher.methods.pmet import EditRequest, pmet_hparams
from transformer_patcher.methods.pmet.algorithm import applied, compute_keys
from transformer_patcher.methods.pmet.update import LowRankDelta


def quantiles(values: torch.Tensor) -> dict[str, float]:
    ordered = sorted(values.tolist())
    return {"median": round(statistics.median(ordered), 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4)}


def run_parser(doc: str, needs: str) -> argparse.ArgumentParser:
    """The arguments of a script that reads a sequential batch-run folder (``needs``: what its run must have been)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("run", type=Path, help=f"a sequential batch-run folder {needs}")
    parser.add_argument("--editor", default="pmet")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def last_checkpoint(run: Path, editor: str) -> tuple[BatchExperimentConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The run's configuration and the tensors and state of its last checkpoint."""
    config = BatchExperimentConfig.from_folder(run)
    checkpoint = load_checkpoint(run / "checkpoints", f"{editor}-b{config.batch_sizes[0]}")
    if checkpoint is None:
        raise SystemExit(f"no checkpoint of {editor}-b{config.batch_sizes[0]} in {run}")
    return config, *checkpoint


def checkpoint_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, LowRankDelta]:
    """Every edited module's whole update in a checkpoint (module name → float64 factors)."""
    return {
        name.removesuffix(".up"): LowRankDelta(tensors[name].double(), tensors[f"{name[:-3]}.down"].double())
        for name in tensors
        if name.endswith(".up")
    }


def keep_record(args: argparse.Namespace, size: int, state: dict[str, Any], **fields: Any) -> None:
    """Add the run's record (``fields`` and the command) to the JSON list in ``args.out``, replacing an earlier one
    of the same run."""
    record = {
        "run": args.run.name,
        "editor": args.editor,
        "batch_size": size,
        "batches_written": state["position"],
        **fields,
        "command": "python " + shlex.join(sys.argv),
    }
    saved = json.loads(args.out.read_text()) if args.out.exists() else []
    kept = [r for r in saved if r["run"] != record["run"]]
    args.out.write_text(json.dumps([*kept, record], indent=1) + "\n")


def main() -> None:
    args = run_parser(__doc__, "written without refine rounds").parse_args()
    config, tensors, state = last_checkpoint(args.run, args.editor)
    size = config.batch_sizes[0]
    hparams = pmet_hparams(variant=args.editor, **config.pmet_options)
    if hparams.refine_rounds:
        raise SystemExit("batch 1's columns are one per fact only without refine rounds (refine_rounds=0)")
    model, tokenizer = load_model(config.model, "generation")
    torch.manual_seed(0)
    templates = hparams.templates(model, tokenizer)
    requests = [EditRequest(c.prompt, c.subject, c.target) for c in load_cases(config)[:size]]
    total = checkpoint_deltas(tensors)
    first = {m: LowRankDelta(d.up[:, :size], d.down[:size]) for m, d in total.items()}
    rows = []
    for module in sorted(total, key=layer_index):
        with torch.no_grad():
            with applied(model, first):
                written = compute_keys(model, tokenizer, requests, templates, module).double()
            with applied(model, total):
                now = compute_keys(model, tokenizer, requests, templates, module).double()
        later = LowRankDelta(total[module].up[:, size:], total[module].down[size:]).dense()
        own = (first[module].dense() @ written).norm(dim=0)
        rows.append(
            {
                "module": module,
                "drift": quantiles((now - written).norm(dim=0) / written.norm(dim=0)),
                "later_at_written_keys": quantiles((later @ written).norm(dim=0) / own),
                "later_at_current_keys": quantiles((later @ now).norm(dim=0) / own),
            }
        )
        print(json.dumps(rows[-1]))
    keep_record(args, size, state, facts=f"batch 1 (cases 0-{size - 1})", layers=rows)


if __name__ == "__main__":
    main()
