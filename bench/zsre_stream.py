"""The dev and lifelong zsRE stream of issue 15 as an ``ExperimentConfig``: SmolLM2-135M over the first records of
``zsre_mend_train-1k.json``, the configuration the bench scripts that read it share."""

from __future__ import annotations

from pathlib import Path

from transformer_patcher.experiments.sme.experiment import ExperimentConfig

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
