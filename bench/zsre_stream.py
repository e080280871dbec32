"""The dev and lifelong zsRE stream of issue 15 as an ``ExperimentConfig``: SmolLM2-135M over the first records of
``zsre_mend_train-1k.json``, the configuration the bench scripts that read it share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.data.benchmarks import Benchmark
from transformer_patcher.experiments.sme.experiment import ExperimentConfig, config_editor, load_benchmark

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def zsre_stream(edits: int, data_dir: Path = DATA_DIR, prompt_format: str = "raw") -> ExperimentConfig:
    """The first ``edits`` records of the stream, asked in ``prompt_format``."""
    return ExperimentConfig(
        model="smollm2-135m",
        data=str(data_dir / "zsre" / "zsre_mend_train-1k.json"),
        data_kind="zsre",
        max_examples=edits,
        data_dir=str(data_dir),
        prompt_format=prompt_format,
    )


def stream_trainer(config: ExperimentConfig) -> tuple[Benchmark, Any, Any]:
    """The benchmark, task and editor an ``sme run`` of ``config`` builds, on a freshly loaded model."""
    benchmark = load_benchmark(config)
    model, tokenizer = load_model(config.model, config.model_kind)
    task = task_for_model(model, tokenizer, prompt_format=benchmark.prompt_format)
    return benchmark, task, config_editor(config, benchmark, model, task)


def stream_arguments(doc: str, count: str, default: int, out: str) -> argparse.ArgumentParser:
    """A bench script's parser over the stream: ``--COUNT`` records, ``--data-dir``, ``--out`` (default ``out``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(f"--{count}", type=int, default=default)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser
