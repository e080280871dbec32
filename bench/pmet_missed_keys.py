"""Which facts a projected PMET write misses or a later batch takes back, read from their keys (issue 18).

AlphaEdit's update lies in the null space of the preserved keys (``P``), so along a fact's key only ``P k`` is
written. This reads, for the facts of a sequential ``batch run`` with ``null_space=true``, each fact's share of its
key in that null space, ``‖P k‖² / ‖k‖²``, at every edited layer (the base model's keys, as the layer loop computes
them: context templates, the subject's last token), and how close its projected key comes to a later batch's
(largest cosine between ``P k`` and a later fact's ``P k``). Then, from the checkpoints saved after each batch
(copies, since a run keeps only its last), which facts are the greedy answer: a batch's facts the write landed or
missed, and the first batch's facts a later batch kept or took back. The two groups' medians say whether short
projected keys, or keys that later batches share, are the ones that fail.

    python bench/pmet_missed_keys.py --run runs/pmet-seq-b100-ns-0.2-r0 \\
        --checkpoints /tmp/ck/pmet-b100.000001.safetensors /tmp/ck/pmet-b100.000002.safetensors \\
        --out bench/results/pmet_missed_keys.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from transformer_patcher.core.pretrained import cache_dir, load_model
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.experiments.sme.batch_experiment import BatchExperimentConfig, load_cases, stats_texts
from transformer_patcher.methods.pmet import EditRequest, PMETEditor, compute_keys, pmet_hparams


def projected_shares(editor: PMETEditor, requests: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer (rows) and fact (columns): ``‖P k‖² / ‖k‖²``, and the projected keys (layer × d × n), unit length."""
    shares, units = [], []
    for block, layer in zip(editor.blocks, editor.hparams.layers, strict=True):
        keys = compute_keys(editor.model, editor.tokenizer, requests, editor.context_templates(), block.ffn_out)
        keys = keys.double()
        projected = editor.written.projections[layer].to(keys.device) @ keys
        shares.append(projected.pow(2).sum(0) / keys.pow(2).sum(0))
        units.append(projected / projected.norm(dim=0, keepdim=True))
    return torch.stack(shares), torch.stack(units)


def medians(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a sequential batch-run folder (its config.json)")
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True, help="after batch 1, 2, … in order")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = BatchExperimentConfig.from_folder(args.run)
    if not config.pmet_options.get("null_space"):
        raise SystemExit(f"{args.run} ran without the null-space projection: nothing to read")
    size = config.batch_sizes[0]
    batches = len(args.checkpoints)
    cases = load_cases(config)[: size * batches]
    model, tokenizer = load_model(config.model, "generation")
    task = task_for_model(model, tokenizer, prompt_format="raw")
    hparams = pmet_hparams(variant="pmet", **config.pmet_options)
    texts = stats_texts(config)  # as the run read them: its cached statistics
    editor = PMETEditor(model, tokenizer, hparams, texts, task=task, cache_dir=cache_dir() / "pmet", progress=False)
    requests = [EditRequest(c.prompt, c.subject, c.target) for c in cases]
    shares, units = projected_shares(editor, requests)
    share = shares.mean(0)  # over the edited layers
    first = range(size)
    later_overlap = [  # the first batch's facts against every later fact, largest cosine, mean over layers
        (units[:, :, i : i + 1] * units[:, :, size:]).sum(1).abs().max(1).values.mean().item() for i in first
    ] if batches > 1 else []  # fmt: skip
    rows, landed_first = [], set()
    for number, path in enumerate(args.checkpoints, 1):
        editor.load_state_tensors(load_file(str(path)))
        edited = cases[: size * number]
        outcomes = score_pairs(editor.model, task, [(c.prompt, c.target) for c in edited])
        correct = [o.correct for o in outcomes]
        own = range(size * (number - 1), size * number)
        row = {
            "after_batch": number,
            "batch_efficacy": sum(correct[i] for i in own) / size,
            "share_landed": medians([share[i].item() for i in own if correct[i]]),
            "share_missed": medians([share[i].item() for i in own if not correct[i]]),
        }
        if number == 1:
            landed_first = {i for i in first if correct[i]}
        else:
            kept = [i for i in first if correct[i]]
            lost = [i for i in landed_first if not correct[i]]
            row |= {
                "first_batch_kept": len(kept),
                "first_batch_lost": len(lost),
                "share_kept": medians([share[i].item() for i in kept]),
                "share_lost": medians([share[i].item() for i in lost]),
                "overlap_kept": medians([later_overlap[i] for i in kept]),
                "overlap_lost": medians([later_overlap[i] for i in lost]),
            }
        rows.append(row)
        print(json.dumps(row))
    record = {
        "run": args.run.name,
        "threshold": hparams.null_space_threshold,
        "share_by_layer_median": {
            str(layer): round(shares[j].median().item(), 4) for j, layer in enumerate(hparams.layers)
        },
        "rows": rows,
        "command": shlex.join(["python", "bench/pmet_missed_keys.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
