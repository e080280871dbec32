"""The spectrum of PMET's key statistics on SmolLM2-135M: is there a null space for AlphaEdit's projection?

AlphaEdit projects each update onto the eigenvectors of ``C = E[k kᵀ]`` with small eigenvalues. This reads ``C`` at
the preset's edited layers over N WikiText-2 passages (``collect_second_moments``, no cache) and reports, per layer,
how many eigenvalues lie below a fraction of the mean eigenvalue (AlphaEdit-style rules) and how many of the
smallest carry a given share of ``tr C`` (the package's ``null_space_threshold``), plus eigenvalue quantiles.

    python bench/pmet_key_spectrum.py --out bench/results/pmet_key_spectrum.json [--texts 600]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.data.benchmarks import wikitext_texts
from transformer_patcher.methods.pmet import collect_second_moments, pmet_hparams
from transformer_patcher.methods.pmet.null_space import null_space_basis

FRACTIONS_OF_MEAN = (1e-4, 1e-3, 1e-2, 1e-1)
ENERGY_SHARES = (1e-3, 1e-2, 5e-2, 1e-1)
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def spectrum(moment: torch.Tensor) -> dict[str, object]:
    values = torch.linalg.eigvalsh((moment.double() + moment.double().T) / 2)  # ascending
    mean = float(values.mean())
    return {
        "dim": len(values),
        "mean_eigenvalue": mean,
        "min_eigenvalue": float(values[0]),
        "below_absolute_1e-2": int((values < 1e-2).sum()),  # AlphaEdit's own rule
        "below_fraction_of_mean": {str(f): int((values < f * mean).sum()) for f in FRACTIONS_OF_MEAN},
        "null_space_dims_by_energy_share": {str(s): null_space_basis(moment, s).shape[1] for s in ENERGY_SHARES},
        "eigenvalue_over_mean_quantiles": {
            str(q): round(float(values[int(q * (len(values) - 1))]) / mean, 5) for q in QUANTILES
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model, "generation")
    layers = pmet_hparams().layers
    start = time.perf_counter()
    moments = collect_second_moments(model, tokenizer, wikitext_texts("valid")[: args.texts], layers, progress=False)
    seconds = time.perf_counter() - start
    result = {
        "model": args.model,
        "texts": args.texts,
        "tokens": next(iter(moments.values())).tokens,
        "seconds": round(seconds, 1),
        "machine": platform.machine(),
        "layers": {str(layer): spectrum(m.matrix) for layer, m in moments.items()},
        "command": f"python bench/pmet_key_spectrum.py --out {args.out} --texts {args.texts}",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["layers"], indent=1))


if __name__ == "__main__":
    main()
