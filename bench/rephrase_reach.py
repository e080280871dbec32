"""How far each edit's patches reach its rephrases, and why a rephrase still gets a wrong answer.

Reads a saved patch set of an ``sme run`` (nothing is retrained). For every edit and each of its rephrases, teacher
forced on the edit's answer: at each answer read, whether the patched model predicts the answer token, the highest
pre-activation ``q·k + b`` among the edit's patches there (> 0: a ReLU-family patch passes something), and, for a gated
patch set, the running maximum cosine of the subject gate, the higher of its subject and bare reads' (open at
``gate_threshold``). Reported: quartiles of the edit's first patch at the edit and at the rephrases, how often it fires
and its gate is open there, and every wrong rephrase sorted by its first wrong read: the first answer token with the
gate closed, below the threshold, or firing under half the edit's pre-activation (a ReLU6 patch's partial fix) or above
it; or a later answer token, sorted the same way by the patches whose own read it is (where they fire highest on the
edit), or having none. ``--block N`` also counts them per block of N edits in stream order (does a long stream's GR fall
by where its failures come from?).

    python bench/rephrase_reach.py --run runs/cf-dev-9000-gate4 --data /tmp/w/cf-dev-9000.json \\
        --data-kind counterfact --out bench/results/rephrase_reach.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from subject_gate import add_run_arguments, record_result, run_benchmark
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.tuners.patcher.model import PatcherModel
from transformer_patcher.tuners.patcher.patch_set import read_edit_log


def quartiles(values: list[float]) -> list[float]:
    return [round(v, 2) for v in torch.tensor(values).quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()]


def failure(
    correct: list[bool], pre: torch.Tensor, cosine: float | None, edit_pre: torch.Tensor, threshold: float
) -> str:
    """Why a rephrase's answer is wrong, from its first wrong read. ``pre`` and ``edit_pre`` are the edit's patches'
    pre-activations at each answer read (reads × patches) of the rephrase and of the edit; a patch's own read is where
    it fires highest on the edit."""
    wrong = correct.index(False)
    if wrong > 0:
        own = [j for j in range(edit_pre.shape[1]) if int(edit_pre[:, j].argmax()) == wrong]
        if not own:
            return "later answer token: no patch of its own"
        reach, full = max(pre[wrong, j].item() for j in own), max(edit_pre[wrong, j].item() for j in own)
        if reach <= 0:
            return "later answer token: below the threshold"
        return "later answer token: fires under half" if reach < full / 2 else "later answer token: fires, still wrong"
    if cosine is not None and cosine < threshold:
        return "first token: gate closed"
    if pre[0].max() <= 0:
        return "first token: below the threshold"
    under = pre[0].max() < edit_pre[0].max() / 2
    return "first token: fires under half the edit" if under else "first token: fires, still wrong"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--block", type=int, default=0, help="also count the causes per block of N edits (0: no)")
    args = parser.parse_args()
    patches, benchmark = run_benchmark(args)
    examples = {e.text: e for e in benchmark.examples}
    base, tokenizer = load_model(args.model, "generation")
    model = PatcherModel.from_pretrained(base, patches).eval()
    layer = model.base_model.patch_layer()
    task = task_for_model(model, tokenizer, prompt_format=benchmark.prompt_format)
    ids, gate = layer.edit_ids().tolist(), layer.gate_reads()
    threshold = layer.patch_config["default"].gate_threshold
    subjects = layer.patch_frozen_subjects["default"]
    bare = layer.patch_frozen_bare_subjects["default"]

    def read(text: str, target: str, columns: list[int]) -> tuple[list[bool], torch.Tensor, float, float | None]:
        """Per answer read: right or not and the edit's patches' pre-activations (reads × patches); at the first read
        the edit's first patch's pre-activation and gate."""
        batch = task.batch_for(model, [(text, target)])
        with torch.no_grad(), layer.capture() as capture:
            output = model(**batch.model_kwargs())
        correct = task.correct(task.read_logits(output, batch), batch.labels).tolist()
        pre = task.at_reads(capture.frozen_preactivations, batch)[:, columns]
        cosine = None
        if gate is not None:
            reads = torch.cat([subjects[columns[:1]], bare[columns[:1]]])  # a zero bare read: none (cosine 0)
            running = gate.running(reads, "reach", layer.gate_frame())
            cosine = running[0, int(batch.cols[0])].max().item()
        return correct, pre, pre[0, 0].item(), cosine

    edits, rephrases, cosines, causes, blocks = [], [], [], Counter(), {}
    for position, entry in enumerate(read_edit_log(patches)):
        example = examples.get(entry["text"])
        columns = [j for j, i in enumerate(ids) if i == entry["edit_id"]]
        if example is None or not columns:
            continue
        _, edit_pre, first, _ = read(example.text, example.target, columns)
        edits.append(first)
        for text in example.rephrases:
            correct, pre, first, cosine = read(text, example.target, columns)
            rephrases.append(first)
            if cosine is not None:
                cosines.append(cosine)
            block = blocks.setdefault(position // args.block * args.block, Counter()) if args.block else Counter()
            block["rephrases"] += 1
            if not all(correct):
                cause = failure(correct, pre, cosine, edit_pre, threshold)
                causes[cause] += 1
                block[cause] += 1
    result = {
        "run": str(args.run),
        "edits": len(edits),
        "rephrases": len(rephrases),
        "edit_preactivation_quartiles": quartiles(edits),
        "rephrase_preactivation_quartiles": quartiles(rephrases),
        "rephrase_fires": round(sum(p > 0 for p in rephrases) / len(rephrases), 3),
        "rephrase_gate_open": round(sum(c >= threshold for c in cosines) / len(cosines), 3) if cosines else None,
        "rephrases_wrong": dict(causes.most_common()),
        **({"per_block": {str(start): dict(block.most_common()) for start, block in blocks.items()}} if blocks else {}),
    }
    record_result(result, args.out)


if __name__ == "__main__":
    main()
