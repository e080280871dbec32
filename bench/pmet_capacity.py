"""How much of a batch the joint solve can fit, as the batch grows: the spectrum of its Gram matrix ``G``.

The joint solve over edited blocks ``m`` leaves the misfit ``E = R (I + G)⁻¹`` with ``G = Σ_m K_mᵀ S_m⁻¹ K_m``
(``solve_joint``; ``S_m`` is λ·gain_m·C_m plus the kept prompts' moment). A direction of the facts' residuals along
an eigenvector of ``G`` with eigenvalue ``g`` keeps ``1 / (1 + g)`` of itself, so the eigenvalues say how many
independent facts the blocks' key spaces hold against the penalty. This reads the first solve of a batch of the first
``n`` facts (keys in the bare prompt at the subject's last token, as ``key_reads="prompt"``) for each ``n`` and each
block range, on the unedited model, and reports:

- ``fitted``: eigenvalues above 1 (directions that keep less than half of themselves);
- ``misfit_isotropic``: the mean of ``1 / (1 + g)``, the share a residual spread evenly over the facts keeps;
- with ``--targets`` (a folder of ``pmet_tune.py`` targets for these records, and its ``--set`` as
  ``--target-set``): per fact, ``‖E_i‖ / ‖R_i‖`` for its real residual at the z layer (median, and the share of
  facts above one half).

A block range's gains (``layer_weights``) are measured relative to its own z layer (``logit_gains``); its z layer is
where the targets would be read, so ranges other than the targets' give only the spectrum.

    python bench/pmet_capacity.py --data counterfact/counterfact-train.json --ns 500 1000 2000 3000 \
        --ranges 0-8 0-12 0-16 --out bench/results/pmet_capacity.json [--targets runs/tune3000 --target-set ...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

from pmet_tune import kept_targets
from transformer_patcher.core.pretrained import cache_dir, load_model
from transformer_patcher.data.benchmarks import wikitext_texts
from transformer_patcher.data.loaders import find_data_file, load_counterfact
from transformer_patcher.methods.pmet import EditRequest, PMETHyperParams, pmet_hparams, second_moments
from transformer_patcher.methods.pmet.algorithm import joint_penalties, layer_reads, written_values, z_read_module
from transformer_patcher.methods.pmet.architecture import block_modules
from transformer_patcher.methods.pmet.layer_gains import logit_gains
from transformer_patcher.methods.pmet.update import joint_gram


def block_range(text: str) -> tuple[int, ...]:
    """``"0-8"`` → blocks 0 … 8."""
    first, _, last = text.partition("-")
    return tuple(range(int(first), int(last or first) + 1))


def gram(model, tokenizer, requests: list[EditRequest], hparams: PMETHyperParams, moments) -> tuple:
    """``G`` (n × n, float64) of the first joint solve over ``hparams.layers``, and the z layer's value now."""
    names = [block_modules(model, layer).ffn_out for layer in hparams.layers]
    read_module = z_read_module(model, hparams)
    keys, current, kept = layer_reads(model, tokenizer, requests, hparams, [], names, read_module, requests)
    _, g = joint_gram(keys, joint_penalties(hparams, moments, hparams.layers, kept, keys[0].device))
    return g, current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="counterfact/counterfact-train.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--ns", nargs="+", type=int, required=True, help="batch sizes (the first n facts)")
    parser.add_argument("--ranges", nargs="+", default=["0-8"], help="edited blocks, first-last (the z layer last)")
    parser.add_argument("--preset", default="smollm2-135m-wide")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="PMETHyperParams fields")
    parser.add_argument("--targets", type=Path, default=None, help="pmet_tune.py targets for these records")
    parser.add_argument("--target-set", nargs="*", default=[], metavar="KEY=JSON", help="pmet_tune.py's --set")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", "generation")
    options = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    base = pmet_hparams(args.preset, **options)
    data = Path(args.data) if Path(args.data).is_file() else find_data_file(args.data)
    rows = list(load_counterfact(data))[args.start : args.start + max(args.ns)]
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    texts = wikitext_texts("valid")[: base.mom2_n_texts]
    ranges = [block_range(text) for text in args.ranges]
    everything = sorted({layer for blocks in ranges for layer in blocks})
    moments = second_moments(model, tokenizer, texts, everything, cache_dir=cache_dir() / "pmet", progress=True)
    targets = None
    if args.targets is not None:
        target_options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.target_set)}
        target_hparams = PMETHyperParams(**target_options)

        def missing(_index):
            raise SystemExit(f"no saved targets for these records in {args.targets}: run pmet_tune.py first")

        targets, _ = kept_targets(args.targets, data, args.start, max(args.ns), target_hparams, missing)
    record = {"data": data.name, "start": args.start, "preset": args.preset, "options": options, "rows": []}
    for blocks in ranges:
        gains = logit_gains(model, tokenizer, texts[:16], blocks, scale=0.05)
        hparams = base.with_options(layers=blocks, layer_weights=tuple(gains))
        for n in args.ns:
            g, current = gram(model, tokenizer, requests[:n], hparams, moments)
            eigen = torch.linalg.eigvalsh(g)
            row = {
                "blocks": f"{blocks[0]}-{blocks[-1]}",
                "n": n,
                "fitted": int((eigen > 1).sum()),
                "misfit_isotropic": round(float((1 / (1 + eigen.clamp_min(0))).mean()), 4),
            }
            if targets is not None and blocks[-1] == base.layers[-1]:
                _, values = written_values(model, tokenizer, requests[:n], hparams, targets.select(range(n)))
                residual = values - current
                lifted = g + torch.eye(n, dtype=g.dtype)
                misfit = torch.linalg.solve(lifted, residual.T).T  # E = R (I + G)⁻¹
                share = (misfit.norm(dim=0) / residual.norm(dim=0)).tolist()
                row["misfit_median"] = round(statistics.median(share), 4)
                row["misfit_over_half"] = round(sum(s > 0.5 for s in share) / n, 4)
            print(json.dumps(row), flush=True)
            record["rows"].append(row)
    record["command"] = shlex.join(["python", *sys.argv])
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
