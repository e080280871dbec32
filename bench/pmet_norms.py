"""How large the written update is against the weight it edits, after the last batch of a sequential run.

Sequential batch editing collapses when the edited matrices' norms grow (Gupta et al., 2024, "Model Editing at
Scale leads to Gradual and Catastrophic Forgetting"). This reads the latest checkpoint of a ``batch run --mode
sequential`` folder and, per edited FFN output projection, compares ``ΔW = up @ down`` with the base weight ``W``:
Frobenius and spectral norm ratios, the Frobenius norm of the first and last ``--block`` factor columns (the
factors are concatenated in the order they were written, so these are the oldest and newest updates), and how much
the update moves the layer's output on ordinary text: ``sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))`` with ``C = E[k kᵀ]`` the
key statistics the editor used (WikiText-2, read from the PMET statistics cache), the RMS output change over typical
keys as a share of the RMS output.

    python bench/pmet_norms.py runs/pmet-seq-b100-ns-false runs/pmet-seq-b100-ns-0.2 --out bench/results/pmet_norms.json
    python bench/pmet_norms.py runs/RUN --history COPIES --out ...   # every batch whose checkpoint was copied

Records of the runs read are replaced in ``--out``, others kept, so the file gathers runs read at different times.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from transformer_patcher.core.pretrained import cache_dir, load_model
from transformer_patcher.experiments.sme.batch_experiment import BatchExperimentConfig, stats_texts
from transformer_patcher.methods.pmet import pmet_hparams, second_moments


def typical_change(delta: torch.Tensor, weight: torch.Tensor, moment: torch.Tensor) -> float:
    """``sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))``: the RMS output change over keys with second moment ``C``, relative."""
    c = moment.double()
    return (torch.trace(delta @ c @ delta.T) / torch.trace(weight @ c @ weight.T)).sqrt().item()


def layer_norms(checkpoint: Path, model: torch.nn.Module, block: int, moments: dict[int, torch.Tensor]) -> list[dict]:
    """One row per edited module of the checkpoint's DELTA factors."""
    rows = []
    with safe_open(str(checkpoint), "pt") as tensors:
        for up_name in sorted(name for name in tensors.keys() if name.endswith(".up")):  # noqa: SIM118 (no __iter__)
            module = up_name.removesuffix(".up")
            up = tensors.get_tensor(up_name).double()
            down = tensors.get_tensor(f"{module}.down").double()
            delta = up @ down
            weight = model.get_submodule(module).weight.double()
            rows.append(
                {
                    "module": module,
                    "rank": up.shape[1],
                    "frobenius_ratio": round((delta.norm() / weight.norm()).item(), 4),
                    "spectral_ratio": round(
                        (torch.linalg.matrix_norm(delta, 2) / torch.linalg.matrix_norm(weight, 2)).item(), 4
                    ),
                    "oldest_columns_norm": round((up[:, :block] @ down[:block]).norm().item(), 3),
                    "newest_columns_norm": round((up[:, -block:] @ down[-block:]).norm().item(), 3),
                    "weight_norm": round(weight.norm().item(), 3),
                    "typical_output_change": round(typical_change(delta, weight, moments[layer_index(module)]), 4),
                }
            )
    return rows


def layer_index(module: str) -> int:
    """The block index in a module name such as ``model.layers.3.mlp.down_proj``."""
    return int(module.split(".layers.")[1].split(".")[0])


def run_moments(model: torch.nn.Module, tokenizer: Any, config: BatchExperimentConfig) -> dict[int, torch.Tensor]:
    """``C = E[k kᵀ]`` per edited layer, as the run's editor read it (from the PMET statistics cache)."""
    hparams = pmet_hparams(**config.pmet_options)
    texts = stats_texts(config)[: hparams.mom2_n_texts]
    stats = second_moments(
        model, tokenizer, texts, hparams.layers, cache_dir=cache_dir() / "pmet", max_length=hparams.mom2_max_length
    )
    return {layer: moment.matrix for layer, moment in stats.items()}


def checkpoint_files(run: Path, history: Path | None) -> dict[tuple[str, int], Path]:
    """``(editor stem, batch index) → tensors`` of a run: its latest checkpoint, and the earlier ones copied to
    ``history`` as ``{run}-{file}`` while it ran (the run keeps only its latest)."""
    files = {}
    for meta_file in (run / "checkpoints").glob("*.json"):
        tensors = run / "checkpoints" / json.loads(meta_file.read_text())["tensors"]
        files[checkpoint_key(tensors.name)] = tensors
    for path in history.glob(f"{run.name}-*.safetensors") if history is not None else ():
        files.setdefault(checkpoint_key(path.name.removeprefix(f"{run.name}-")), path)
    return files


def checkpoint_key(name: str) -> tuple[str, int]:
    """``pmet-b100.000003.safetensors`` → ``("pmet-b100", 3)``."""
    stem, number = name.removesuffix(".safetensors").rsplit(".", 1)
    return stem, int(number)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="sequential batch-run folders")
    parser.add_argument("--block", type=int, default=100, help="columns counted as the oldest / newest update")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--history", type=Path, help="a folder of earlier checkpoints copied as {run}-{file}")
    args = parser.parse_args()
    configs = {run: BatchExperimentConfig.from_folder(run) for run in args.runs}
    models = {config.model for config in configs.values()}
    if len(models) != 1:
        raise SystemExit(f"the runs edited different models ({sorted(models)}): read them one model at a time")
    model, tokenizer = load_model(models.pop(), "generation")
    records = []
    for run, config in configs.items():
        moments = run_moments(model, tokenizer, config)
        for (stem, index), tensors in sorted(checkpoint_files(run, args.history).items()):
            part = json.loads((run / "parts" / f"{stem}-seq{index}.json").read_text())
            records.append(
                {
                    "run": run.name,
                    "editor": part["editor"],
                    "batch_size": part["batch_size"],
                    "batch_index": part["batch_index"],
                    "edited": part["edited"],
                    "perplexity_change": part["perplexity.change"],
                    "layers": layer_norms(tensors, model, args.block, moments),
                    "command": "python " + shlex.join(sys.argv),
                }
            )
    saved = json.loads(args.out.read_text()) if args.out.exists() else []
    kept = [r for r in saved if r["run"] not in {run.name for run in args.runs}]
    args.out.write_text(json.dumps(kept + records, indent=1) + "\n")
    for record in records:
        for row in record["layers"]:
            print(record["run"], record["batch_index"], row)


if __name__ == "__main__":
    main()
