"""Forward-pass latency of a patched model relative to its base, at 0 / 100 / 1,000 / 10,000 patches.

Base and patched forwards are interleaved in one run (this machine is noisy) and medians are compared. Writes JSON.

    python bench/inference_overhead.py --out bench/results/inference_overhead.json [--models tiny smollm2-135m]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from transformer_patcher import PatcherConfig, get_patcher_model
from transformer_patcher.core.pretrained import SMOLLM2, resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import build

PATCH_COUNTS = (0, 100, 1_000, 10_000)


def load(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    if name == "tiny":
        model, shape = build("llama"), (8, 32)
        description = "tiny LLaMA (hidden 32, FFN 64, 2 layers)"
    else:
        model, shape = AutoModelForCausalLM.from_pretrained(resolve_model(name)).eval(), (1, 64)
        description = f"{name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)"
    ids = torch.randint(3, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, f"{description}, batch {shape}"


def timed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(**batch)
    return time.perf_counter() - start


def measure(name: str, repeats: int) -> dict:
    loaded, batch, description = load(name)
    # Both sides are fresh in-memory copies, so neither runs on lazily mapped checkpoint pages.
    base, patched = copy.deepcopy(loaded), get_patcher_model(copy.deepcopy(loaded), PatcherConfig())
    del loaded
    layer = patched.base_model.patch_layer()
    rows = []
    for count in tqdm(PATCH_COUNTS, desc=f"{name}: patch counts"):
        added = count - layer.num_patches()
        if added:
            generator = torch.Generator().manual_seed(count)
            keys = torch.randn(added, layer.query_dim, generator=generator) / layer.query_dim**0.5
            values = torch.randn(added, layer.output_dim, generator=generator)
            layer.add_patches(keys, torch.full((added,), -3.0), values, edit_id=range(layer.num_patches(), count))
            layer.commit()
        for _ in range(3):  # warm-up
            timed(base, batch), timed(patched, batch)
        base_times, patched_times = [], []
        for i in range(repeats):  # ABBA order cancels a systematic first-runner advantage
            if i % 2:
                patched_times.append(timed(patched, batch))
                base_times.append(timed(base, batch))
            else:
                base_times.append(timed(base, batch))
                patched_times.append(timed(patched, batch))
        with tempfile.TemporaryDirectory() as directory:
            patched.save_pretrained(directory)
            file_bytes = (Path(directory) / "adapter_model.safetensors").stat().st_size
        base_median, patched_median = statistics.median(base_times), statistics.median(patched_times)
        rows.append(
            {
                "patches": count,
                "base_median_ms": round(base_median * 1e3, 3),
                "patched_median_ms": round(patched_median * 1e3, 3),
                "ratio": round(patched_median / base_median, 4),
                "adapter_file_bytes": file_bytes,
            }
        )
    return {"model": name, "description": description, "repeats": repeats, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", SMOLLM2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/inference_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "benchmark": "inference_overhead",
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "results": [measure(name, args.repeats) for name in args.models],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for result in results["results"]:
        print(f"\n{result['description']}")
        print("patches | base ms | patched ms | ratio | file bytes")
        for row in result["rows"]:
            print(
                f"{row['patches']:>7} | {row['base_median_ms']:>7} | {row['patched_median_ms']:>10} | "
                f"{row['ratio']:.3f} | {row['adapter_file_bytes']}"
            )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
