"""What a saved, gated patch set costs a forward pass, and what each of the layer's savings gives.

Loads a patch set (for example the 2,895 neurons of the 1,000-edit raw zsRE stream) on its base model and times the
same batch five ways, interleaved so the machine's noise falls on all alike:

- the base model (adapter disabled);
- the patch set as saved: runs of neurons that share an edit's reads compared once by the gate
  (``tuners.patcher.gate.SharedReads``), and only the frozen neurons open somewhere in the batch computed;
- the same with the gate answering neuron by neuron;
- the same with every neuron computed, as under a capture (``PatcherLayer.capture``);
- both, as before either saving;
- a second copy with its bare subject reads zeroed (the gate then reads the edit's subject read alone, rule 18's
  share).

Medians and their ratios to the base, and how many neurons the batch opens. Writes JSON.

    python bench/gate_overhead.py --patches runs/zsre-raw-bare-1k/patches/fold-0 --out bench/results/gate_overhead.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.tuners.patcher.gate import GateReads, SharedReads
from transformer_patcher.tuners.patcher.model import PatcherModel


def per_neuron(gate: GateReads) -> Any:
    """``gate.opened`` as it was before runs of neurons were folded: every neuron's reads compared on their own."""

    def opened(subjects: torch.Tensor, threshold: float, key: Any, frame: Any = None, bare: Any = None) -> torch.Tensor:
        running = gate.running(subjects, key, frame)
        result = (running >= threshold) | (subjects.detach().norm(dim=1) == 0)
        if bare is not None and bool(bare.any()):
            result |= (gate.running(bare, (key, "bare"), frame) >= threshold) & (bare.detach().norm(dim=1) > 0)
        return result

    return opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64, help="random tokens timed when no --text is given")
    parser.add_argument("--text", help="time this text instead (for example a question about an edited subject)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base, tokenizer = load_model(args.model, "generation")
    model = PatcherModel.from_pretrained(base, args.patches).eval()
    layer = model.base_model.patch_layer()
    saved = layer.patch_frozen_bare_subjects["default"]
    without = PatcherModel.from_pretrained(load_model(args.model, "generation")[0], args.patches).eval()
    without.base_model.patch_layer().patch_frozen_bare_subjects["default"].zero_()
    gate = layer.gate_reads()
    if args.text:
        ids = tokenizer(args.text, return_tensors="pt").input_ids
    else:
        ids = torch.randint(100, 10_000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    names = ("base", "patched", "gate neuron by neuron", "every neuron computed", "both, as before")
    names += ("without bare reads",)
    times: dict[str, list[float]] = {name: [] for name in names}

    def timed(name: str, patched: torch.nn.Module) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            patched(input_ids=ids)
        times[name].append((time.perf_counter() - start) * 1000)

    with torch.no_grad():
        saving = model(input_ids=ids).logits
        opened = layer.gate_opened(layer.patch_frozen_subjects["default"], key="count", bare=saved)
        gate.opened = per_neuron(gate)
        with layer.capture():
            before = model(input_ids=ids).logits
        del gate.opened
    for repeat in range(args.repeats + 2):  # the first two rounds warm up and are dropped
        with model.disable_adapter():
            timed("base", model)
        timed("patched", model)
        with layer.capture():
            timed("every neuron computed", model)
        gate.opened = per_neuron(gate)
        timed("gate neuron by neuron", model)
        with layer.capture():
            timed("both, as before", model)
        del gate.opened
        timed("without bare reads", without)
        if repeat < 2:
            for values in times.values():
                values.clear()
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "patches": str(args.patches),
        "neurons": layer.num_patches(),
        "with_bare_read": int((saved.norm(dim=1) > 0).sum()),
        "distinct_reads": len(SharedReads(layer.patch_frozen_subjects["default"], saved).subjects),
        "neurons_open_on_the_batch": int(opened.reshape(-1, opened.shape[-1]).any(dim=0).sum()),
        "largest_logit_change_from_the_savings": float((saving - before).abs().max()),
        "text": args.text,
        "batch": list(ids.shape),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "median_ms": {name: round(value, 2) for name, value in medians.items()},
        "ratio_to_base": {name: round(value / medians["base"], 4) for name, value in medians.items()},
        "command": "python " + shlex.join(sys.argv),
    }
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
