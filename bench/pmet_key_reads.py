"""How far the layer loop's key for a fact, averaged over the context templates (the papers'), is from the key where
the fact is asked (its bare prompt), at each edited block: the cosine and the distance relative to the bare key.

    python bench/pmet_key_reads.py --data counterfact/counterfact-train.json --start 0 --n 200 \
        --layers 0 1 2 3 4 5 6 7 8 --out bench/results/pmet_key_reads.json

With ``--misses`` (a ``bench/pmet_tune.py --misses`` file of the same records) and ``--trial`` (the JSON of one of its
trials), the facts are split into the ones that trial's write missed and the rest. Templates: two generated prefixes
of 10 tokens, as the SmolLM2 presets use.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.loaders import find_data_file, load_counterfact
from transformer_patcher.methods.pmet import EditRequest, context_templates
from transformer_patcher.methods.pmet.algorithm import compute_layer_keys
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.templates import BARE_PROMPT


def summary(values: list[float]) -> dict[str, float]:
    deciles = statistics.quantiles(values, n=10)
    return {"median": round(statistics.median(values), 3), "p10": round(deciles[0], 3), "p90": round(deciles[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="counterfact/counterfact-train.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--layers", nargs="+", type=int, default=list(range(9)))
    parser.add_argument("--misses", type=Path, default=None, help="bench/pmet_tune.py --misses file")
    parser.add_argument("--trial", default=None, help="the JSON of the trial whose misses split the facts")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if (args.misses is None) != (args.trial is None):
        parser.error("--misses and --trial go together")
    model, tokenizer = load_model("smollm2-135m", "generation", device="cpu")
    data = Path(args.data) if Path(args.data).is_file() else find_data_file(args.data)
    rows = list(load_counterfact(data))[args.start : args.start + args.n]
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    templates = context_templates(model, tokenizer, ((10, 2),))
    names = [block_modules(model, layer).ffn_out for layer in args.layers]
    bare = compute_layer_keys(model, tokenizer, requests, BARE_PROMPT, names)
    mean = compute_layer_keys(model, tokenizer, requests, templates, names)
    missed = torch.zeros(len(requests), dtype=torch.bool)
    if args.misses is not None:
        wanted = json.loads(args.trial)
        entries = [json.loads(line) for line in args.misses.read_text().splitlines()]
        chosen = [e for e in entries if e["trial"] == wanted and e["records"] == [args.start, args.start + args.n]]
        if len(chosen) != 1:
            parser.error(f"{args.misses} holds {len(chosen)} entries for that trial and these records, not one")
        missed[[fact["fact"] for fact in chosen[0]["missed"]]] = True
    result: dict = {"data": data.name, "records": [args.start, args.start + args.n], "templates": templates}
    result["trial"], result["missed"] = args.trial, int(missed.sum())
    per_layer = {}
    for layer, k_bare, k_mean in zip(args.layers, bare, mean, strict=True):
        cosine = torch.nn.functional.cosine_similarity(k_bare, k_mean, dim=0)
        distance = (k_bare - k_mean).norm(dim=0) / k_bare.norm(dim=0)
        per_layer[layer] = {
            group: {"cosine": summary(cosine[mask].tolist()), "distance": summary(distance[mask].tolist())}
            for group, mask in (("all", torch.ones_like(missed)), ("missed", missed), ("landed", ~missed))
            if int(mask.sum()) > 1
        }
        print(layer, json.dumps(per_layer[layer]))
    result["per_layer"] = per_layer
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
