"""Seconds of the full evaluation suite on SmolLM2-135M, per part: the reference (once per model) and an evaluation.

The suite is the one ``sme run --suite full`` builds for the first 100 zsRE records: 500 unrelated questions in each
of raw and chat format, 2 near neighbours per record in each format (400), 50 WikiText-2 openings and 50 chat
questions continued for 32 tokens, 50k tokens of WikiText-2 test perplexity, and EasyEdit's rewrite, rephrase and
locality parts. The model carries 100 hand-made patch neurons (random keys and values), so evaluations compute a real
patch term.

Timed, in one process on the same machine state:

- ``reference``: greedy generation of the reference outputs plus the teacher-forced pass that records the layers
  below the patch (once per model and run);
- ``evaluation`` (replayed): what every ``--eval-every`` costs a T-Patcher run — only the patched FFN and what
  follows it are recomputed;
- ``evaluation_full``: the same evaluation with full forward passes (what an editor that changes lower layers pays).

``seconds`` is one replayed evaluation (the recurring cost the goal is about); the reference is reported beside it.
The two evaluations must give identical measures, which the script checks.

    python bench/eval_suite.py --out bench/results/eval_suite.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from transformer_patcher import get_patcher_model
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import CausalLMTask, position_limit
from transformer_patcher.data.benchmarks import zsre_benchmark
from transformer_patcher.data.loaders import find_data_file
from transformer_patcher.experiments.evaluation import EvaluationSuite, SuiteConfig, benchmark_parts
from transformer_patcher.methods.patcher.replay import ForwardReplay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100, help="zsRE records whose neighbours and edits are parts")
    parser.add_argument("--suite", choices=("full", "small"), default="full")
    parser.add_argument("--patches", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench/results/eval_suite.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    base, tokenizer = load_model("smollm2-135m", "generation")
    model = get_patcher_model(base)
    layer = model.base_model.patch_layer()
    task = CausalLMTask(tokenizer)
    benchmark = zsre_benchmark(find_data_file("zsre/zsre_mend_train-1k.json")).head(args.records)
    config = SuiteConfig.preset(args.suite)
    parts = benchmark_parts(task, benchmark, config, max_positions=position_limit(base.config))
    groups = range(args.records)

    started = time.perf_counter()
    suite = EvaluationSuite(model, parts, task.pad_id, config.batch_size, ForwardReplay(model, layer), progress=True)
    reference = time.perf_counter() - started

    keys = torch.randn(args.patches, layer.query_dim) / layer.query_dim**0.5
    layer.add_patches(keys, torch.full((args.patches,), -2.0), torch.randn(args.patches, layer.output_dim) * 0.05, 1)
    layer.commit()

    started = time.perf_counter()
    replayed = suite.evaluate(groups=groups)
    evaluation = time.perf_counter() - started
    # the same suite and reference without replay: every evaluation runs full forward passes
    unreplayed = EvaluationSuite(model, parts, task.pad_id, config.batch_size, None, True, state=suite.state_tensors())
    started = time.perf_counter()
    full = unreplayed.evaluate(groups=groups)
    evaluation_full = time.perf_counter() - started

    strip = lambda results: {p: {k: v for k, v in m.items() if k != "seconds"} for p, m in results.items()}  # noqa: E731
    if strip(replayed) != strip(full):
        raise SystemExit(f"replayed and full evaluations differ:\n{strip(replayed)}\n{strip(full)}")
    result = {
        "model": "smollm2-135m",
        "suite": args.suite,
        "records": args.records,
        "patches": args.patches,
        "parts": {
            part.name: {
                "rows": len(part.prompts),
                "tokens": sum(len(p) for p in part.prompts) + sum(len(c) for c in suite.continuations(part.name)),
                "reference_seconds": suite.seconds[part.name],
                "evaluation_seconds": replayed[part.name]["seconds"],
                "evaluation_full_seconds": full[part.name]["seconds"],
            }
            for part in suite.parts
        },
        "measures_with_patches": strip(replayed),
        "reference_seconds": reference,
        "evaluation_full_seconds": evaluation_full,
        "seconds": evaluation,
        "total_seconds": reference + evaluation,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "command": "python bench/eval_suite.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k.endswith("seconds")}, indent=1))


if __name__ == "__main__":
    main()
