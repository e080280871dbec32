"""Shared fixtures: an isolated HF cache, offline mode, and tiny models."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    warnings.filterwarnings("ignore", message=".*must be `None` or an integer within the vocabulary.*")
