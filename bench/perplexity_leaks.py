"""Which patches cost perplexity: a saved patch set read over the evaluation suite's WikiText-2 test tokens.

Every token where some patch fires (pre-activation above 0) is charged its added loss (patched minus base negative
log-likelihood of the next token), attributed to the patch firing highest there. Prints the total added loss, the
share of tokens with a patch firing, and the patches that carry most of it with the edit they were made for (its
input, target, which answer token the patch reads at) and the text where they fired.

    python bench/perplexity_leaks.py --patches runs/dev-views/patches/fold-0 --out bench/results/perplexity_leaks.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.suite_data import suite_sources
from transformer_patcher.experiments.evaluation import perplexity_windows
from transformer_patcher.tuners.patcher.model import PatcherModel
from transformer_patcher.tuners.patcher.patch_set import read_edit_log


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token of ``ids`` (1, n) under ``logits`` (n - 1, vocabulary)."""
    return -torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patches", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base, tokenizer = load_model(args.model, "generation")
    model = PatcherModel.from_pretrained(base, args.patches)
    layer = model.base_model.patch_layer()
    owners = layer.edit_ids().tolist()
    log = {int(entry["edit_id"]): entry for entry in read_edit_log(args.patches)}
    text = suite_sources(args.data_dir).perplexity_text
    windows = perplexity_windows(tokenizer, text, args.tokens, args.window)
    added = defaultdict(float)
    where: dict[int, list[str]] = defaultdict(list)
    total = fired_tokens = count = 0
    for window in windows:
        ids = torch.tensor([window])
        with torch.no_grad():
            with model.disable_adapter():
                base_logits = model(input_ids=ids).logits[0, :-1]
            with layer.capture() as record:
                logits = model(input_ids=ids).logits[0, :-1]
        pre = record.frozen_preactivations[0, :-1]  # (positions, patches)
        delta = next_token_nll(logits, ids) - next_token_nll(base_logits, ids)
        total += float(delta.sum())
        count += len(delta)
        top, patch = pre.max(dim=1)
        for pos in (top > 0).nonzero().flatten().tolist():
            fired_tokens += 1
            p = int(patch[pos])
            added[p] += float(delta[pos])
            context = tokenizer.decode(window[max(0, pos - 8) : pos + 1])
            written = tokenizer.decode(window[pos + 1 : pos + 2])
            where[p].append(f"{context!r} -> {written!r} ({float(delta[pos]):+.2f})")
    ranked = sorted(added, key=lambda p: -added[p])[: args.top]
    rows = []
    for p in ranked:
        edit = log.get(int(owners[p]))
        rows.append(
            {
                "patch": p,
                "added_nats": round(added[p], 2),
                "fired": len(where[p]),
                "edit": None if edit is None else {k: edit.get(k) for k in ("edit_id", "text", "target")},
                "where": where[p][:5],
            }
        )
    summary = {
        "patches": args.patches.as_posix(),
        "tokens": count,
        "added_nats": round(total, 2),
        "perplexity_change": float(torch.exp(torch.tensor(total / count)) - 1),
        "tokens_with_a_patch_firing": fired_tokens / count,
        "top": rows,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
