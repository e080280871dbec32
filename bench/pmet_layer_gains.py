"""How far a change at each edited FFN's output carries to the logits: the ``layer_weights`` of the joint solve.

Gaussian noise at one block's FFN output, at every token of WikiText-2 valid passages (the key statistics' corpus),
and the squared change of the logits per unit of squared noise, relative to the z layer's
(``methods/pmet/layer_gains.py``). The printed list is what ``--pmet-set layer_weights=…`` takes.

    python bench/pmet_layer_gains.py --layers 0 1 2 3 4 5 6 7 8 --out bench/results/pmet_layer_gains.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.benchmarks import wikitext_texts
from transformer_patcher.methods.pmet.layer_gains import logit_gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", nargs="+", type=int, required=True, help="edited blocks, the z layer last")
    parser.add_argument("--texts", type=int, default=16, help="WikiText-2 valid passages")
    parser.add_argument("--scale", type=float, default=0.05, help="the noise's standard deviation per feature")
    parser.add_argument("--data-dir", default=None)
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
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["layer_weights"]))


if __name__ == "__main__":
    main()
