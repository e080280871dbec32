"""Where PMET's target steps go: every request's loss at every step, and what an exit on a stalled loss would save.

Optimises the targets of ``--n`` dev facts (zsRE records ``--start``+ of ``zsre_mend_train-1k.json``, or
CounterFact-train) with the default preset (``--set`` overrides fields), recording at each step of each request its
mean answer NLL over its prompts, its KL term and how many answer tokens do not yet lead by the preset's margin.
Then it replays the trace under a "stall" exit (stop once ``k`` steps in a row bring no new lowest NLL + KL, keep the
lowest): the steps it would save and the targets it would leave short of the margin.

    python bench/pmet_step_trace.py --data-kind zsre --start 900 --n 100 --out bench/results/pmet_step_trace.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import torch

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.loaders import find_data_file, load_counterfact, load_zsre
from transformer_patcher.methods.pmet import EditRequest, compute_targets, pmet_hparams
from transformer_patcher.methods.pmet import targets as targets_module

STALLS = (5, 8, 10, 15, 20)


def traced() -> list[dict[str, Any]]:
    """Wrap the target module's scoring so that each step appends one row per active request to the list returned
    (requests numbered across windows, in the order given)."""
    rows: list[dict[str, Any]] = []
    step: dict[str, Any] = {}
    scores, loss_of, losses_of = (
        targets_module.answer_scores,
        targets_module.request_loss,
        targets_module.step_losses,
    )

    def answer_scores(batch, reads, log_probs, margin=0.0):
        row_nll, wrong = scores(batch, reads, log_probs, margin)
        step["short"] = wrong.detach().cpu()
        return row_nll, wrong

    def request_loss(hp, state, nll_each, kl_now, decay):
        loss, kl = loss_of(hp, state, nll_each, kl_now, decay)
        step["terms"].append((float(nll_each.detach().mean()), float(kl.detach())))
        return loss, kl

    def step_losses(hp, batch, reads, log_probs, shift, states, active):
        if states is not step.get("states"):  # a new window: its requests count on from the last window's
            step["offset"] = step.get("offset", 0) + len(step.get("states", []))
            step["states"] = states
        step["terms"] = []
        result = losses_of(hp, batch, reads, log_probs, shift, states, active)
        for (nll, kl), r in zip(step["terms"], active, strict=True):
            short = int(step["short"][r])
            request = step["offset"] + int(r)
            rows.append({"request": request, "step": states[r].steps - 1, "nll": nll, "kl": kl, "short": short})
        return result

    targets_module.answer_scores = answer_scores
    targets_module.request_loss = request_loss
    targets_module.step_losses = step_losses
    return rows


def stall_exit(trace: dict[int, list[dict[str, Any]]], k: int) -> dict[str, Any]:
    """The trace replayed with an exit after ``k`` steps without a new lowest NLL + KL, each request keeping its
    lowest: the steps taken and the requests whose kept target is short of the margin (against the full run's)."""
    steps = short = 0
    for rows in trace.values():
        best, since, taken = float("inf"), 0, len(rows)
        for i, row in enumerate(rows):
            score = row["nll"] + row["kl"]
            best, since = (score, 0) if score < best else (best, since + 1)
            if since >= k:
                taken = i + 1
                break
        kept = min(rows[:taken], key=lambda row: row["nll"] + row["kl"])
        if taken == len(rows) and rows[-1]["short"] == 0:
            kept = rows[-1]
        steps += taken
        short += kept["short"] > 0
    return {"stall_steps": k, "steps": steps, "short_of_the_margin": short}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-kind", choices=("counterfact", "zsre"), default="zsre")
    parser.add_argument("--start", type=int, default=900)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="PMETHyperParams fields")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", "generation")
    hparams = pmet_hparams(**{k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)})
    if args.data_kind == "zsre":
        records = load_zsre(find_data_file("zsre/zsre_mend_train-1k.json"))
    else:
        records = load_counterfact(find_data_file("counterfact/counterfact-train.json"))
    rows = records.select(range(args.start, args.start + args.n))
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    log = traced()
    start = time.perf_counter()
    targets = compute_targets(model, tokenizer, requests, hparams, hparams.templates(model, tokenizer), False)
    seconds = (time.perf_counter() - start) / args.n
    trace: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in log:
        trace[row["request"]].append(row)
    total = sum(targets.steps)
    long = [s for s in targets.steps if s >= 40]
    record = {
        "data_kind": args.data_kind,
        "records": [args.start, args.start + args.n],
        "options": args.set,
        "target_precision": hparams.target_precision,
        "seconds_per_fact": seconds,
        "mean_steps": total / args.n,
        "requests_at_40_steps_or_more": len(long),
        "requests_at_the_cap": sum(s == hparams.v_num_grad_steps for s in targets.steps),
        "share_of_steps_at_40_or_more": sum(long) / total,
        "short_of_the_margin_at_the_end": sum(rows[-1]["short"] > 0 for rows in trace.values()),
        "stall_exits": [stall_exit(trace, k) for k in STALLS],
        "trace": {str(r): [[row["nll"], row["kl"], row["short"]] for row in rows] for r, rows in trace.items()},
    }
    args.out.write_text(json.dumps(record))
    print(json.dumps({k: v for k, v in record.items() if k != "trace"}, indent=1))


if __name__ == "__main__":
    main()
