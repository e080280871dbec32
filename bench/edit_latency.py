"""Seconds per Transformer-Patcher edit next to the edits' quality, per (model, memory rows, mode), plus a 1,000-edit
stream and the cost of one training step with and without last-layer caching.

- MiniLM-L6 (classification, a fresh 2-way head; memory = [CLS] queries of FEVER claims, then WikiText sentences;
  edits flip the model's prediction on held-out FEVER claims, which have no rephrases, so GR is null);
- SmolLM2-135M (causal LM; memory = queries at every position of WikiText text; edits = zsRE questions with their
  counterfactual ``alt`` answer, so every edit is needed).

Modes: ``default`` (``EditConfig()``: solved patches, stop once the edit and the memory constraints hold) and
``faithful`` (``EditConfig.faithful()``: the official code's algorithm and schedule). Each mode edits the same
``--edits`` examples one after another from the unedited model. Per record:

- ``median_s``: median seconds per needed edit; ``SR``: edits fixed; ``GR``: each edit's rephrase right just after it
  (teacher-forced, every answer token);
- ``locality``: after the last edit, the share of 200 unrelated inputs whose output is unchanged: the evaluation
  suite's ``unrelated-raw`` questions answered greedily (SmolLM2), held-out FEVER claims' predictions (MiniLM).

``step_ms`` times training steps of the faithful algorithm with caching (one replayed copy) and without (the full
forward pass of the official 8-copy batch). ``stream_1000_seconds``: SmolLM2, mode ``default``, 10k memory rows, the
first 1,000 zsRE records edited in order with the 200-question evaluation every 100 edits. Memory banks are cached as
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
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from transformer_patcher import get_patcher_model
from transformer_patcher.core.pretrained import resolve_model
from transformer_patcher.core.tasks import position_limit
from transformer_patcher.data.loaders import load_zsre
from transformer_patcher.data.suite_data import suite_sources
from transformer_patcher.experiments.evaluation import EvaluationSuite, SuiteConfig, locality_parts
from transformer_patcher.methods.patcher import (
    CausalLMTask,
    ClassificationTask,
    EditConfig,
    EditExample,
    ForwardReplay,
    MemoryBank,
    PatchTrainer,
    build_memory,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench"
MEMORY_SIZES = (10_000, 40_000)
VAL_ROWS = 2_000
UNRELATED = 200
MODES = ("default", "faithful")


def wikitext_chunks(words: int = 24) -> list[str]:
    text = (DATA / "wikitext2" / "test.txt").read_text().split()
    return [" ".join(text[i : i + words]) for i in range(0, len(text) - words, words)]


def fever_claims() -> list[str]:
    claims = []
    for name in ("paper_dev.jsonl", "paper_test.jsonl"):
        with (DATA / "fever" / name).open() as handle:
            claims += [json.loads(line)["claim"] for line in handle]
    return claims


class Case:
    """A model with its task, memory pairs, edits (with rephrases when the data has them) and a locality probe."""

    def __init__(self, name: str) -> None:
        path = resolve_model(name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.name = name
        if name == "minilm-l6":
            torch.manual_seed(0)
            self.base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
            self.task = ClassificationTask.for_model(self.base, tokenizer)
            claims = fever_claims()
            self.memory_pairs = [(text, 0) for text in claims[2 * VAL_ROWS :] + wikitext_chunks(8)]
            self.val_pairs = [(text, 0) for text in claims[:VAL_ROWS]]
            self.edit_texts = claims[VAL_ROWS : 2 * VAL_ROWS - UNRELATED]
            self.unrelated = claims[2 * VAL_ROWS - UNRELATED : 2 * VAL_ROWS]
        else:
            self.base = AutoModelForCausalLM.from_pretrained(path).eval()
            self.task = CausalLMTask.for_model(self.base, tokenizer)
            chunks = wikitext_chunks()
            self.memory_pairs = [(c.split(" ", 1)[0], c.split(" ", 1)[1]) for c in chunks[500:]]
            self.val_pairs = [(c.split(" ", 1)[0], c.split(" ", 1)[1]) for c in chunks[:500]]
            self.records = load_zsre(DATA / "zsre" / "zsre_mend_train-1k.json", target="alt")  # 998: 2 have no alt
        self.model = get_patcher_model(self.base)
        self.layer = self.model.base_model.patch_layer()
        self.val = build_memory(self.model, self.layer, self.task, self.val_pairs, VAL_ROWS, CACHE, tag=f"{name}-val")
        self.largest = build_memory(
            self.model, self.layer, self.task, self.memory_pairs, max(MEMORY_SIZES), CACHE, tag=name
        )
        if len(self.largest) < max(MEMORY_SIZES):
            raise RuntimeError(f"only {len(self.largest)} memory rows for {name}, wanted {max(MEMORY_SIZES)}")
        self.suite = self._locality_suite()

    def edits(self, n: int, start: int = 0) -> list[tuple[EditExample, EditExample | None]]:
        """(edit, rephrase) pairs; classification edits flip the unedited model's prediction."""
        if isinstance(self.task, CausalLMTask):
            rows = self.records.select(range(start, min(start + n, len(self.records))))
            return [(EditExample(r["text"], r["target"]), EditExample(r["rephrase"], r["target"])) for r in rows]
        texts = self.edit_texts[start : start + n]
        labels = self._predictions(texts)
        return [(EditExample(text, 1 - label), None) for text, label in zip(texts, labels, strict=True)]

    def _predictions(self, texts: list[str]) -> list[int]:
        batch = self.task.batch_for(self.model, [(text, 0) for text in texts])
        with torch.no_grad():
            logits = self.task.read_logits(self.model(**batch.model_kwargs()), batch)
        return self.task.predictions(logits).tolist()

    def _locality_suite(self) -> EvaluationSuite | list[int]:
        if not isinstance(self.task, CausalLMTask):
            return self._predictions(self.unrelated)
        config = SuiteConfig(unrelated=UNRELATED, neighbours=0, generation=0, perplexity_tokens=0, formats=("raw",))
        parts = locality_parts(self.task, suite_sources(DATA), config, max_positions=position_limit(self.base.config))
        return EvaluationSuite(self.model, parts, self.task.pad_id, replay=ForwardReplay(self.model, self.layer))

    def locality(self) -> float:
        if isinstance(self.suite, list):
            now = self._predictions(self.unrelated)
            return sum(a == b for a, b in zip(now, self.suite, strict=True)) / len(now)
        return self.suite.evaluate()["unrelated-raw"]["exact"]


def run_mode(case: Case, config: EditConfig, memory: MemoryBank, n_edits: int) -> dict[str, Any]:
    trainer = PatchTrainer(case.model, case.task, config, memory, case.val)
    trainer.reset()
    records, rephrased = [], []
    for i, (example, rephrase) in enumerate(case.edits(n_edits)):
        record = trainer.edit(example, i)
        records.append(record)
        if record.needed and rephrase is not None:
            rephrased.append(trainer.check(rephrase)[0])
        print(f"{case.name} memory={len(memory)} edit {i}: {record.steps} steps {record.seconds:.2f}s", flush=True)
    locality = case.locality()
    trainer.reset()
    needed = [r for r in records if r.needed]
    seconds = [r.seconds for r in needed]
    return {
        "edits": len(needed),
        "median_s": statistics.median(seconds),
        "p90_s": sorted(seconds)[max(0, round(0.9 * len(seconds)) - 1)],
        "median_steps": statistics.median(r.steps for r in needed),
        "SR": sum(r.success for r in needed) / len(needed),
        "GR": sum(rephrased) / len(rephrased) if rephrased else None,
        "locality": locality,
        "neurons": sum(r.neurons for r in needed),
        "seconds": seconds,
    }


def step_ms(case: Case, memory: MemoryBank, n_edits: int = 3, steps: int = 40) -> dict[str, float]:
    """Milliseconds per training step (faithful algorithm, no stopping check), cached and full-forward."""
    result = {}
    for name, cache in (("cached", True), ("full_forward", False)):
        config = EditConfig.faithful(max_steps=steps, start_val_step=10**6, lr_every=10**6, cache=cache)
        trainer = PatchTrainer(case.model, case.task, config, memory, case.val)
        per_step = []
        for i, (example, _) in enumerate(case.edits(n_edits)):
            record = trainer.edit(example, i)
            if record.needed:
                per_step.append(1e3 * record.seconds / record.steps)
        trainer.reset()
        result[name] = statistics.median(per_step)
    result["ratio"] = result["full_forward"] / result["cached"]
    return result


def stream(case: Case, n_edits: int, every: int) -> dict[str, Any]:
    memory = MemoryBank(case.largest.rows()[: MEMORY_SIZES[0]])
    trainer = PatchTrainer(case.model, case.task, EditConfig(), memory, case.val)
    trainer.reset()
    started = time.perf_counter()
    edit_seconds, evaluations, records, rephrased = 0.0, [], [], []
    examples = case.edits(n_edits)
    for i, (example, rephrase) in enumerate(examples):
        record = trainer.edit(example, i)
        edit_seconds += record.seconds
        records.append(record)
        if record.needed and rephrase is not None:
            rephrased.append(trainer.check(rephrase)[0])
        if (i + 1) % every == 0:
            evaluations.append({"edits": i + 1, "locality": case.locality()})
            print(f"stream {i + 1} edits, {time.perf_counter() - started:.0f}s: {evaluations[-1]}", flush=True)
    total = time.perf_counter() - started
    needed = [r for r in records if r.needed]
    kept = sum(trainer.check(example)[0] for example, _ in examples) / len(examples)
    trainer.reset()
    return {
        "edits": len(examples),
        "needed": len(needed),
        "seconds": total,
        "edit_seconds": edit_seconds,
        "median_s": statistics.median(r.seconds for r in needed),
        "SR": sum(r.success for r in needed) / len(needed),
        "GR": sum(rephrased) / len(rephrased),
        "ER_at_end": kept,
        "neurons": sum(r.neurons for r in needed),
        "given_up": sum(not r.success for r in needed),
        "evaluations": evaluations,
        "steps": [r.steps for r in needed],
        "edit_s": [round(r.seconds, 3) for r in needed],
    }


def measure(case: Case, n_edits: int) -> list[dict[str, Any]]:
    rows = []
    for size in MEMORY_SIZES:
        memory = MemoryBank(case.largest.rows()[:size])
        modes = {mode: run_mode(case, EditConfig.mode(mode), memory, n_edits) for mode in MODES}
        for mode, result in modes.items():
            row = {"model": case.name, "memory": size, "mode": mode, **result}
            if mode != "faithful":
                faithful = modes["faithful"]
                row["speedup_vs_faithful"] = faithful["median_s"] / result["median_s"]
                row["quality_vs_faithful"] = {
                    key: None if result[key] is None else result[key] - faithful[key]
                    for key in ("SR", "GR", "locality")
                }
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--stream", type=int, default=1000, help="zsRE records in the SmolLM2 stream (0: skip it)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/edit_latency.json"))
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "edit_latency",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "command": "python bench/edit_latency.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "results": [],
        "step_ms": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        case = Case(name)
        report["step_ms"][name] = step_ms(case, MemoryBank(case.largest.rows()[: MEMORY_SIZES[0]]))
        report["results"] += measure(case, args.edits)
        args.out.write_text(json.dumps(report, indent=1))
        if name == "smollm2-135m" and args.stream:
            report["stream"] = stream(case, args.stream, every=100)
            report["stream_1000_seconds"] = report["stream"]["seconds"]
            args.out.write_text(json.dumps(report, indent=1))
    summary = [{k: v for k, v in row.items() if k != "seconds"} for row in report["results"]]
    print(json.dumps({"results": summary, "step_ms": report["step_ms"]}, indent=1))
    print("stream_1000_seconds", report.get("stream_1000_seconds"))


if __name__ == "__main__":
    main()
