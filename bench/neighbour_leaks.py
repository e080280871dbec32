"""Whose first-answer-token patches fire on the near neighbours of a zsRE stream: the edit's own, or others'.

Reads a saved patch set of an ``sme run`` over the first ``--edits`` records of ``zsre_mend_train-1k.json`` (raw) and,
for each edit's first near neighbour of the evaluation suite (``Benchmark.neighbours(1)``), the patch pre-activations
where its answer starts. Counts the neighbours where some patch fires (above 0), split into those where the edit's
own patch is among them and those hit only by other edits' patches, and prints a few of each with the edits whose
patches fired.

    python bench/neighbour_leaks.py --patches runs/views-first-250/patches/fold-0 --edits 250
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from transformer_patcher.core.modes import up_to
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.experiments.sme.experiment import load_benchmark
from transformer_patcher.tuners.patcher.model import PatcherModel
from transformer_patcher.tuners.patcher.patch_set import read_edit_log
from zsre_stream import DATA_DIR, zsre_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=Path, required=True)
    parser.add_argument("--edits", type=int, default=250)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--show", type=int, default=12)
    args = parser.parse_args()
    config = zsre_stream(args.edits, args.data_dir)
    benchmark = load_benchmark(config)
    base, tokenizer = load_model(config.model, config.model_kind)
    model = PatcherModel.from_pretrained(base, args.patches)
    layer = model.base_model.patch_layer()
    owners = layer.edit_ids().tolist()
    log = {int(entry["edit_id"]): entry["text"] for entry in read_edit_log(args.patches)}
    edit_of = {text: edit_id for edit_id, text in log.items()}
    task = task_for_model(model, tokenizer, prompt_format="raw")
    counts = {"neighbours": 0, "own_patch_fires": 0, "only_other_edits_fire": 0}
    shown = []
    for example, neighbours in zip(benchmark.examples, benchmark.neighbours(1), strict=True):
        for neighbour in neighbours:
            counts["neighbours"] += 1
            batch = task.batch_for(model, [(neighbour, example.target)])
            with torch.no_grad(), layer.capture() as record, up_to(layer):
                model(**batch.model_kwargs())
            fired = (task.at_reads(record.frozen_preactivations, batch)[0] > 0).nonzero().flatten().tolist()
            if not fired:
                continue
            edits = {owners[p] for p in fired}
            own = edit_of.get(example.text) in edits
            counts["own_patch_fires" if own else "only_other_edits_fire"] += 1
            shown.append({"neighbour": neighbour, "edit": example.text, "fired": sorted(log[e] for e in edits)[:3]})
    print(json.dumps(counts))
    for row in shown[: args.show]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
