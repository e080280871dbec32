"""Where PMET's efficacy goes on SmolLM2-135M: the optimised targets against what the written update delivers.

For CounterFact records 900+ (never reported) with the ``smollm2-135m`` preset: optimise the targets, write one
batch, and per fact read

- ``realised``: the share of the optimised FFN change ``δ_mlp = z − h`` that the edited model's z-layer FFN output
  carries at the bare prompt's subject token (projection onto ``δ_mlp`` / ``‖δ_mlp‖``; 1 = the target is written
  whole), and ``off_target`` (the rest of the change, relative to ``‖δ_mlp‖``);
- ``residual_change``: how far the z layer's block output (the residual stream) moved, over ``‖δ_mlp‖``, and
  ``residual_cosine`` with ``δ_mlp``: the lower layers' writes reach the residual stream too;
- ``attention_share``: ``‖δ_attn‖ / (‖δ_attn‖ + ‖δ_mlp‖)``, the optimised change the FFN target leaves out;
- the target's probability while optimising (both deltas) and after the write (greedy: ``efficacy``).

    python bench/pmet_write_gap.py --n 32 --out bench/results/pmet_write_gap.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from transformer_patcher.core.pretrained import cache_dir, load_model
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.data.benchmarks import wikitext_texts
from transformer_patcher.data.loaders import find_data_file, load_counterfact
from transformer_patcher.experiments.sme.fact_scores import FactCase, score_cases
from transformer_patcher.methods.pmet import (
    EditRequest,
    compute_deltas,
    compute_targets,
    pmet_hparams,
    second_moments,
)
from transformer_patcher.methods.pmet.algorithm import applied, read_at_subject
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.requests import encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=900)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", "generation")
    hparams = pmet_hparams()
    texts = wikitext_texts("valid")[: hparams.mom2_n_texts]
    moments = second_moments(model, tokenizer, texts, hparams.layers, cache_dir=cache_dir() / "pmet")
    rows = load_counterfact(find_data_file("counterfact/counterfact-edit-1k.json")).select(
        range(args.start, args.start + args.n)
    )
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    templates = hparams.templates(model, tokenizer)
    targets = compute_targets(model, tokenizer, requests, hparams, templates)
    deltas = compute_deltas(model, tokenizer, requests, hparams, moments, templates, targets)
    modules = block_modules(model, hparams.layers[-1])
    bare = [encode(tokenizer, r.template, r.subject) for r in requests]
    block_before = read_at_subject(model, tokenizer, bare, modules.block, "output")
    with applied(model, deltas):
        written = read_at_subject(model, tokenizer, bare, modules.ffn_out, "output")
        block_moved = read_at_subject(model, tokenizer, bare, modules.block, "output") - block_before
        after = score_cases(model, CausalLMTask(tokenizer), [FactCase.from_row(r) for r in rows])
    change = targets.values - targets.init
    norm = change.norm(dim=1)
    moved = written - targets.init
    realised = (moved * change).sum(1) / norm**2
    off = (moved - realised[:, None] * change).norm(dim=1) / norm
    attn = torch.tensor(targets.attention_norms)
    residual_cosine = torch.nn.functional.cosine_similarity(block_moved, change, dim=1)
    facts = [
        {
            "prompt": request.text,
            "target": request.target,
            "probability_optimised": targets.probabilities[i],
            "steps": targets.steps[i],
            "realised": float(realised[i]),
            "off_target": float(off[i]),
            "residual_change": float(block_moved[i].norm() / norm[i]),
            "residual_cosine": float(residual_cosine[i]),
            "residual_norm": float(block_before[i].norm()),
            "attention_share": float(attn[i] / (attn[i] + norm[i])),
            "efficacy": after[i]["edit"].correct,
        }
        for i, request in enumerate(requests)
    ]

    def median(key: str, rows: list[dict]) -> float:
        return statistics.median(float(f[key]) for f in rows) if rows else float("nan")

    hit = [f for f in facts if f["efficacy"]]
    miss = [f for f in facts if not f["efficacy"]]
    summary = {
        "records": [args.start, args.start + args.n],
        "efficacy_acc": len(hit) / len(facts),
        **{
            f"{key}_median_{name}": median(key, group)
            for key in ("realised", "off_target", "residual_change", "attention_share", "probability_optimised")
            for name, group in (("hit", hit), ("miss", miss))
        },
    }
    args.out.write_text(json.dumps({"summary": summary, "facts": facts}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
