"""Which read of the model tells a fact's rephrase from other facts? (issue 15: why T-Patcher's keys miss rephrases)

T-Patcher keys a patch on the patched FFN's input at the last token of the edit's prompt. This reads, on the unedited
model, for each of N records: that query, the residual stream at the last token and at the subject's last token
after chosen blocks, for the prompt, its rephrase and (CounterFact) its locality prompt, a neighbour asked about
another subject. Each read is centred on the mean over the N prompts; then:

- ``retrieval``: the share of rephrases whose nearest prompt (cosine) is their own fact's, among the N;
- ``own_cos`` / ``others_cos_p95``: the median cosine of a rephrase with its own prompt, and the 95th percentile of
  its cosine with the other facts' prompts;
- ``neighbour_cos`` / ``rephrase_beats_neighbour`` (last-token reads, CounterFact): the median cosine of the prompt
  with its locality prompt, and the share of facts whose rephrase is nearer to the prompt than that neighbour is.

    python bench/key_reads.py --data counterfact/counterfact-train.json --n 200 --out bench/results/key_reads.json
    python bench/key_reads.py --data zsre/zsre_mend_train-1k.json --n 200 --out bench/results/key_reads.json

Records are appended to ``--out`` (a JSON list), one per data file. Dev data only: CounterFact-train is never
scored, and zsRE's first records are the dev stream.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.functional import normalize
from tqdm.auto import tqdm

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.loaders import find_data_file
from transformer_patcher.methods.pmet import EditRequest
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.requests import encode


def subject_token(tokenizer: Any, text: str, subject: str) -> int | None:
    """Index of the subject's last token in ``text``, where PMET reads it (None when the subject is not in it)."""
    if subject not in text:
        return None
    return encode(tokenizer, EditRequest(text, subject, "-").template, subject).lookup


def reads(model: Any, tokenizer: Any, text: str, subject: str, layers: list[int]) -> dict[str, torch.Tensor]:
    """Every read of one text (float32 vectors)."""
    seen: dict[str, torch.Tensor] = {}
    ffn = block_modules(model, model.config.num_hidden_layers - 1).ffn_out
    module = model.get_submodule(ffn.rsplit(".", 1)[0])  # the FFN whose input is the patch's query
    handle = module.register_forward_pre_hook(lambda _m, args: seen.__setitem__("q", args[0].detach()))
    try:
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    out = {"query, last token, patched FFN": seen["q"][0, -1].float()}
    at = subject_token(tokenizer, text, subject)
    for layer in layers:
        out[f"residual after block {layer}, last token"] = hidden[layer + 1][0, -1].float()
        if at is not None:
            out[f"residual after block {layer}, subject's last token"] = hidden[layer + 1][0, at].float()
    return out


def separation(prompts: list[dict], rephrases: list[dict], neighbours: list[dict] | None, key: str) -> dict:
    keep = [i for i in range(len(prompts)) if key in prompts[i] and key in rephrases[i]]
    p = torch.stack([prompts[i][key] for i in keep])
    mean = p.mean(0)
    p = normalize(p - mean, dim=1)
    r = normalize(torch.stack([rephrases[i][key] for i in keep]) - mean, dim=1)
    similarity = r @ p.T
    own = similarity.diag()
    others = similarity.masked_fill(torch.eye(len(keep), dtype=torch.bool), float("nan"))
    row = {
        "read": key,
        "n": len(keep),
        "retrieval": round((similarity.argmax(1) == torch.arange(len(keep))).float().mean().item(), 3),
        "own_cos": round(own.median().item(), 3),
        "others_cos_p95": round(others.nanquantile(0.95).item(), 3),
    }
    if neighbours is not None and not key.endswith("subject's last token"):
        n = normalize(torch.stack([neighbours[i][key] for i in keep]) - mean, dim=1)
        neighbour = (n * p).sum(1)
        row["neighbour_cos"] = round(neighbour.median().item(), 3)
        row["rephrase_beats_neighbour"] = round((own > neighbour).float().mean().item(), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a CounterFact or zsRE file, a path or one under the data folder")
    parser.add_argument("--n", type=int, default=200, help="the first N records")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 20, 29])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    path = Path(args.data) if Path(args.data).is_file() else find_data_file(args.data)
    records = json.loads(path.read_text())[: args.n]
    model, tokenizer = load_model("smollm2-135m", "generation")
    zsre = "src" in records[0]
    prompts, rephrases, neighbours = [], [], []
    for record in tqdm(records, desc="reading", unit="record"):
        prompt, rephrase = (record[k] for k in (("src", "rephrase") if zsre else ("prompt", "rephrase_prompt")))
        prompts.append(reads(model, tokenizer, prompt, record["subject"], args.layers))
        rephrases.append(reads(model, tokenizer, rephrase, record["subject"], args.layers))
        if not zsre:
            neighbours.append(reads(model, tokenizer, record["locality_prompt"], record["subject"], args.layers))
    rows = [separation(prompts, rephrases, neighbours or None, key) for key in prompts[0]]
    result = {
        "data": path.name,
        "records": [0, len(records)],
        "model": "smollm2-135m",
        "rows": rows,
        "command": "python " + shlex.join(sys.argv),
    }
    saved = json.loads(args.out.read_text()) if args.out.exists() else []
    saved = [r for r in saved if r["data"] != result["data"]] + [result]
    args.out.write_text(json.dumps(saved, indent=1) + "\n")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
