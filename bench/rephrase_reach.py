"""How far each edit's first patch reaches its rephrases: its pre-activation there against the edit's, and its gate.

Reads a saved patch set of an ``sme run`` (nothing is retrained): for every edit, the pre-activation ``q·k + b`` of
the edit's first patch at the last token of the edit's prompt and of each rephrase, whether the patch fires there
(> 0: a ReLU-family patch passes nothing below), and, for a gated patch set, the running maximum cosine of the
subject gate there (open at ``gate_threshold``). Quartiles over all rephrases go to ``--out``.

    python bench/rephrase_reach.py --run runs/cf-dev-9000-gate4 --data /tmp/w/cf-dev-9000.json \\
        --data-kind counterfact --out bench/results/rephrase_reach.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from subject_gate import add_run_arguments, run_benchmark
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.tuners.patcher.model import PatcherModel
from transformer_patcher.tuners.patcher.patch_set import read_edit_log


def quartiles(values: list[float]) -> list[float]:
    return [round(v, 2) for v in torch.tensor(values).quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    patches, benchmark = run_benchmark(args)
    examples = {e.text: e for e in benchmark.examples}
    base, tokenizer = load_model(args.model, "generation")
    model = PatcherModel.from_pretrained(base, patches).eval()
    layer = model.base_model.patch_layer()
    ids, gate = layer.edit_ids().tolist(), layer.gate_reads()
    threshold = layer.patch_config["default"].gate_threshold

    def read(text: str, column: int) -> tuple[float, float | None]:
        with torch.no_grad(), layer.capture() as capture:
            model(**tokenizer(text, return_tensors="pt"))
        pre = capture.frozen_preactivations[0, -1, column].item()
        if gate is None:
            return pre, None
        subject = layer.patch_frozen_subjects["default"][column : column + 1]
        return pre, gate.running(subject, "reach")[0, -1, 0].item()

    edits, rephrases, cosines = [], [], []
    for entry in read_edit_log(patches):
        example = examples.get(entry["text"])
        columns = [j for j, i in enumerate(ids) if i == entry["edit_id"]]
        if example is None or not columns:
            continue
        edits.append(read(example.text, columns[0])[0])
        for text in example.rephrases:
            pre, cosine = read(text, columns[0])
            rephrases.append(pre)
            if cosine is not None:
                cosines.append(cosine)
    result = {
        "run": str(args.run),
        "edits": len(edits),
        "rephrases": len(rephrases),
        "edit_preactivation_quartiles": quartiles(edits),
        "rephrase_preactivation_quartiles": quartiles(rephrases),
        "rephrase_fires": round(sum(p > 0 for p in rephrases) / len(rephrases), 3),
        "rephrase_gate_open": round(sum(c >= threshold for c in cosines) / len(cosines), 3) if cosines else None,
        "command": "python " + shlex.join(sys.argv),
    }
    print(json.dumps(result))
    saved = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*saved, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
