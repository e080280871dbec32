"""Which earlier edits' texts open a later patch's subject gate, and whether the earlier subject read alone tells.

Reads a saved patch set of an ``sme run`` (nothing is retrained). For every edit in stream order, its text is read
once (teacher forced on its answer, in the run's prompt format) and, at each of its answer reads (the rows that edit
appended to the memory), the gate's running maximum cosine is taken against every *later* edit's first patch's
subject read: the gate is open there at ``gate_threshold``, exactly as the adapter decides it. Beside it, the
shortcut of comparing the two edits' subject reads (the earlier one's cosine at its own subject position).

Why: rule 16 (``EditConfig.gated_edit_rows``) lets a gated patch ignore the earlier edits' rows its gate is shut on.
If the subject reads alone decided that, a row whose text opens the later gate elsewhere (another mention, another
word that reads like the subject) would be missed and the new patch could fire on an earlier fix. The trainer keeps
each edit's gate reads instead (``methods/patcher/gate_traces.py``); this counts what the shortcut would miss.

    python bench/gate_rows.py --run runs/lifelong/zsre-raw-weak-1k --data ../shared/data/zsre/zsre_mend_train-1k.json \\
        --data-kind zsre --out bench/results/gate_rows.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn.functional import normalize

from subject_gate import add_run_arguments, record_result, run_benchmark
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.tuners.patcher.model import PatcherModel
from transformer_patcher.tuners.patcher.patch_set import read_edit_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    patches, benchmark = run_benchmark(args)
    base, tokenizer = load_model(args.model, "generation")
    model = PatcherModel.from_pretrained(base, patches).eval()
    layer = model.base_model.patch_layer()
    task = task_for_model(model, tokenizer, prompt_format=benchmark.prompt_format)
    gate, frame = layer.gate_reads(), layer.gate_frame()
    if gate is None:
        raise SystemExit(f"{patches} has no subject gate")
    threshold = layer.patch_config["default"].gate_threshold
    ids = layer.edit_ids().tolist()
    first = {edit: ids.index(edit) for edit in dict.fromkeys(ids)}
    log = [entry for entry in read_edit_log(patches) if entry["edit_id"] in first]
    subjects = torch.stack([layer.patch_frozen_subjects["default"][first[e["edit_id"]]] for e in log]).float()
    gated = subjects.norm(dim=1) > 0
    by_read = normalize(subjects, dim=1) @ normalize(subjects, dim=1).T >= threshold  # (earlier, later)
    pairs = opened = shortcut = missed = 0
    patches_missing: set[int] = set()
    for i, entry in enumerate(log):
        batch = task.batch_for(model, [(entry["text"], entry["target"])])
        with torch.no_grad(), layer.capture():
            model(**batch.model_kwargs())
        running = gate.running(subjects, "rows", frame)[0, batch.cols]  # (reads, edits)
        later = (torch.arange(len(log)) > i) & gated
        for row in running >= threshold:
            truly, guessed = row & later, (by_read[i] | ~gated[i]) & later  # an ungated edit: open
            pairs, opened, shortcut = pairs + int(later.sum()), opened + int(truly.sum()), shortcut + int(guessed.sum())
            missed += int((truly & ~guessed).sum())
            patches_missing.update((truly & ~guessed).nonzero().flatten().tolist())
    result = {
        "run": str(args.run),
        "edits": len(log),
        "gated_edits": int(gated.sum()),
        "row_patch_pairs": pairs,
        "gate_open": opened,
        "open_by_subject_reads": shortcut,
        "missed_by_subject_reads": missed,
        "later_patches_with_a_missed_row": len(patches_missing),
    }
    record_result(result, args.out)


if __name__ == "__main__":
    main()
