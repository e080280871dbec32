"""How far a change at each edited FFN's output carries to the logits: the ``layer_weights`` of the joint solve.

Gaussian noise at one block's FFN output, at every token of WikiText-2 valid passages (the key statistics' corpus),
and the squared change of the logits per unit of squared noise, relative to the z layer's
(``methods/pmet/layer_gains.py``). The printed list is what ``--pmet-set layer_weights=…`` takes.

``--runs`` also reads each ``batch run`` folder's last checkpoint and says where its write acts on ordinary text:
per edited block, the rms change of the FFN output on typical keys, ``sqrt(tr(ΔW C ΔWᵀ))`` with the key statistics
``C``, and the sum of those squared changes weighed by the gains (what the joint solve with ``layer_weights``
minimises beside the fit).

    python bench/pmet_layer_gains.py --layers 0 1 2 3 4 5 6 7 8 --out bench/results/pmet_layer_gains.json \
        [--runs runs/cf-b1000-ka runs/cf-b1000-jointw15]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from pmet_key_drift import checkpoint_deltas, last_checkpoint
from transformer_patcher.core.pretrained import cache_dir, load_model
from transformer_patcher.data.benchmarks import wikitext_texts
from transformer_patcher.methods.pmet import pmet_hparams, second_moments
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.layer_gains import logit_gains


def typical_change(run: Path, model, tokenizer, layers: list[int], gains: list[float]) -> dict:
    """Per edited block, the rms change a run's whole update makes to the FFN output on typical keys, and their
    squares summed with the gains as weights."""
    _, tensors, _ = last_checkpoint(run, "pmet")
    deltas = checkpoint_deltas(tensors)
    texts = wikitext_texts("valid")[: pmet_hparams().mom2_n_texts]
    moments = second_moments(model, tokenizer, texts, layers, cache_dir=cache_dir() / "pmet", progress=False)
    rms = []
    for layer in layers:
        delta = deltas[block_modules(model, layer).ffn_out]
        inner = delta.down @ moments[layer].matrix.double() @ delta.down.T
        rms.append(float(torch.trace(delta.up @ inner @ delta.up.T)) ** 0.5)
    weighed = sum(gain * change**2 for gain, change in zip(gains, rms, strict=True))
    return {"run": run.name, "rms_change": [round(change, 2) for change in rms], "gain_weighted": round(weighed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", nargs="+", type=int, required=True, help="edited blocks, the z layer last")
    parser.add_argument("--texts", type=int, default=16, help="WikiText-2 valid passages")
    parser.add_argument("--scale", type=float, default=0.05, help="the noise's standard deviation per feature")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="batch run folders (PMET) to read")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, "generation")
    texts = wikitext_texts("valid", args.data_dir)[: args.texts]
    gains = logit_gains(model, tokenizer, texts, args.layers, scale=args.scale)
    record = {
        "model": args.model,
        "layers": args.layers,
        "texts": args.texts,
        "scale": args.scale,
        "layer_weights": [round(gain, 2) for gain in gains],
        "command": shlex.join(["python", *sys.argv]),
    }
    if args.runs:
        record["runs"] = [typical_change(run, model, tokenizer, args.layers, gains) for run in args.runs]
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["layer_weights"]))
    for run in record.get("runs", []):
        print(json.dumps(run))


if __name__ == "__main__":
    main()
