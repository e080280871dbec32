"""Seconds per Transformer-Patcher edit, last-layer caching on vs off, at memory sizes 10k and 40k.

- MiniLM-L6 (classification, a fresh 2-way head; memory = [CLS] queries of FEVER claims, then WikiText sentences);
- SmolLM2-135M (causal LM; memory = queries at every position of WikiText text; edits = zsRE questions with their
  counterfactual ``alt`` answer, so every edit is needed).

Modes: ``cache`` (the default editor: official schedule, checks after steps 125, 150, …, stop at the validation
memory-loss plateau), ``cache_quick`` (``EditConfig.quick()``: the same algorithm checked every 5 steps) and
``no_cache`` (official schedule, full forward pass every step). ``no_cache`` is slow, so it runs on the first
``--edits-off`` examples only; speed-ups are ratios of medians over those same examples. Memory banks are cached as
safetensors under ``.cache/bench``.

    python bench/edit_latency.py --out bench/results/edit_latency.json [--models minilm-l6 smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from transformer_patcher import get_patcher_model
from transformer_patcher.editing import (
    CausalLMTask,
    ClassificationTask,
    EditConfig,
    EditExample,
    MemoryBank,
    PatchTrainer,
    build_memory,
)
from transformer_patcher.pretrained import resolve_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench"
MEMORY_SIZES = (10_000, 40_000)
VAL_ROWS = 2_000


def wikitext_chunks(words: int = 24) -> list[str]:
    text = (DATA / "wikitext2" / "test.txt").read_text().split()
    return [" ".join(text[i : i + words]) for i in range(0, len(text) - words, words)]


def fever_claims() -> list[str]:
    claims = []
    for name in ("paper_dev.jsonl", "paper_test.jsonl"):
        with (DATA / "fever" / name).open() as handle:
            claims += [json.loads(line)["claim"] for line in handle]
    return claims


def setup(name: str):
    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name == "minilm-l6":
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        task = ClassificationTask.for_model(model, tokenizer)
        claims = fever_claims()
        memory_pairs = [(text, 0) for text in claims[2 * VAL_ROWS :] + wikitext_chunks(8)]
        val_pairs = [(text, 0) for text in claims[:VAL_ROWS]]
        edit_texts = claims[VAL_ROWS : 2 * VAL_ROWS]

        def edits(trainer: PatchTrainer, n: int) -> list[EditExample]:
            return [EditExample(text, 1 - _prediction(trainer, text)) for text in edit_texts[:n]]

    else:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        task = CausalLMTask.for_model(model, tokenizer)
        chunks = wikitext_chunks()
        memory_pairs = [(c.split(" ", 1)[0], c.split(" ", 1)[1]) for c in chunks[500:]]
        val_pairs = [(c.split(" ", 1)[0], c.split(" ", 1)[1]) for c in chunks[:500]]
        records = json.loads((DATA / "zsre" / "zsre_mend_train-1k.json").read_text())

        def edits(trainer: PatchTrainer, n: int) -> list[EditExample]:
            return [EditExample(r["src"], r["alt"]) for r in records[:n]]

    return model, task, memory_pairs, val_pairs, edits


def _prediction(trainer: PatchTrainer, text: str) -> int:
    batch = trainer.task.batch_for(trainer.model, [(text, 0)])
    with torch.no_grad():
        return int(trainer.task.predictions(trainer.task.read_logits(trainer.model(**batch.model_kwargs()), batch))[0])


def bank(model, layer, task, pairs, rows: int, tag: str) -> MemoryBank:
    return build_memory(model, layer, task, pairs, rows, CACHE, tag=tag)


def measure(name: str, n_edits: int, n_edits_off: int) -> dict:
    base, task, memory_pairs, val_pairs, make_edits = setup(name)
    model = get_patcher_model(base)
    layer = model.base_model.patch_layer()
    val = bank(model, layer, task, val_pairs, VAL_ROWS, f"{name}-val")
    largest = bank(model, layer, task, memory_pairs, max(MEMORY_SIZES), name)
    if len(largest) < max(MEMORY_SIZES):
        raise RuntimeError(f"only {len(largest)} memory rows available for {name}, wanted {max(MEMORY_SIZES)}")
    results = []
    for size in MEMORY_SIZES:
        memory = MemoryBank(largest.rows()[:size])
        row: dict = {"memory": size}
        modes = (
            ("cache", EditConfig(), n_edits),
            ("cache_quick", EditConfig.quick(), n_edits),
            ("no_cache", EditConfig(cache=False), n_edits_off),
        )
        for mode, config, count in modes:
            trainer = PatchTrainer(model, task, config, memory, val)
            trainer.reset()
            examples = make_edits(trainer, count)
            records = []
            for i, example in enumerate(examples):
                start = time.perf_counter()
                record = trainer.edit(example, i)
                records.append({**record.to_dict(), "wall": time.perf_counter() - start})
                print(f"{name} memory={size} {mode} edit {i}: {record.steps} steps {record.seconds:.2f}s")
            trainer.reset()
            secs = [r["seconds"] for r in records if r["needed"]]
            row[mode] = {
                "edits": len(secs),
                "median_s": statistics.median(secs),
                "p90_s": sorted(secs)[max(0, round(0.9 * len(secs)) - 1)],
                "median_steps": statistics.median(r["steps"] for r in records if r["needed"]),
                "success": sum(r["success"] for r in records if r["needed"]) / max(1, len(secs)),
                "per_step_ms": statistics.median(1e3 * r["seconds"] / r["steps"] for r in records if r["needed"]),
                "seconds": secs,
            }
        paired = row["no_cache"]["edits"]
        for mode in ("cache", "cache_quick"):
            row[f"speedup_{mode}_same_edits"] = row["no_cache"]["median_s"] / statistics.median(
                row[mode]["seconds"][:paired]
            )
        results.append(row)
    return {"model": name, "rows": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--edits-off", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/edit_latency.json"))
    args = parser.parse_args()
    report = {
        "benchmark": "edit_latency",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "results": [measure(name, args.edits, args.edits_off) for name in args.models],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({r["model"]: r["rows"] for r in report["results"]}, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
