"""Second moments of FFN keys, ``C_l = E[k kᵀ]``: the statistics PMET/MEMIT updates are regularised with.

A key ``k`` is the input of a layer's FFN output projection (``down_proj``, ``c_proj``, ``fc_out``) at one token.
``C_l`` is accumulated in float64 over every non-padding token of some text (WikiText-2 offline), with a progress
bar, and cached as safetensors keyed by the model's exact content (``content_key``: the layer's weights byte for
byte, samples of every other weight) and the exact text, so a cache file can never be applied to another model,
layer or corpus. With too few tokens ``C_l`` is rank-deficient: a warning says so
below 10 × the key width, and :meth:`SecondMoment.regularized` adds a ridge.

The keys are summed on the model's device; ``C_l`` is kept on the CPU, computed or read from the cache alike, and the
updates move it to where they are solved.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from transformer_patcher.core.atomic import save_safetensors_atomic
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.core.modes import eval_mode, up_to
from transformer_patcher.core.tasks import position_limit
from transformer_patcher.tuners.architectures import PatchTarget, resolve_patch_target
from transformer_patcher.tuners.fingerprint import content_key

logger = logging.getLogger(__name__)
MIN_TOKENS_PER_DIM = 10


@dataclass
class SecondMoment:
    """``E[k kᵀ]`` (float64, on the CPU) of one layer's FFN keys, from ``tokens`` tokens."""

    module: str
    matrix: torch.Tensor
    tokens: int

    def regularized(self, ridge: float) -> torch.Tensor:
        """``C + ridge·(tr C / d)·I``: relative to C's mean eigenvalue, so a ridge means the same at any scale."""
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        d = self.matrix.shape[0]
        scale = float(torch.trace(self.matrix)) / d
        return self.matrix + ridge * scale * torch.eye(d, dtype=self.matrix.dtype, device=self.matrix.device)


def ffn_target(model: nn.Module, layer: int) -> PatchTarget:
    """The FFN of decoder layer ``layer`` (negative counts from the end), found by ``tuners.architectures``."""
    return resolve_patch_target(model, layer_index=layer)


def _key_width(module: nn.Module) -> int:
    weight = module.weight
    return weight.shape[1] if isinstance(module, nn.Linear) else weight.shape[0]  # Conv1D stores (in, out)


def _max_positions(model: nn.Module) -> int:
    """How many positions a statistics text may use: the model's own limit (core's rule, which also knows that
    RoBERTa-family positions start after the padding index), unbounded (2³⁰) when the positions are relative."""
    limit = position_limit(getattr(model, "config", None))
    return limit if limit else 1 << 30


def stats_key(model: nn.Module, target: PatchTarget, texts: Sequence[str], max_length: int) -> str:
    """Content key of one layer's statistics: the layer's fingerprint and the exact token source."""
    max_length = min(max_length, _max_positions(model))  # what collect_second_moments really reads
    digest = hashlib.sha256(content_key(model, [target.key_module, target.value_module]).encode())
    digest.update(f"|{target.value_module}|{max_length}|{len(texts)}|".encode())
    for text in texts:
        digest.update(text.encode() + b"\x1e")
    return digest.hexdigest()


class KeyMoments:
    """Forward pre-hooks that sum ``k kᵀ`` of each layer's FFN keys over the tokens :attr:`mask` marks as real.

    Before each forward the caller sets :attr:`mask` (the flattened attention mask of the batch) and adds its real
    tokens to :attr:`tokens`.
    """

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.tokens = 0

    def record(self, layer: int, _module: nn.Module, args: tuple[Any, ...]) -> None:
        keys = args[0].detach().reshape(-1, args[0].shape[-1])[self.mask].float()
        # One batch (≤ batch_size × max_length tokens) is summed in float32, where the matmul cost lies;
        # the running sum over batches, where rounding would accumulate, is float64.
        self.sums[layer] = self.sums.get(layer, 0) + (keys.T @ keys).double()

    @contextmanager
    def attached(self, modules: dict[int, nn.Module]) -> Iterator[None]:
        """Hook :meth:`record` onto each layer's FFN output projection (layer → module) while inside."""
        handles = [module.register_forward_pre_hook(partial(self.record, layer)) for layer, module in modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def moment(self, layer: int, module: str) -> SecondMoment:
        """Layer ``layer``'s mean ``E[k kᵀ]``, with a warning when there are too few tokens for its key width."""
        width = self.sums[layer].shape[0]
        if self.tokens < MIN_TOKENS_PER_DIM * width:
            logger.warning(
                "layer %d: %d tokens for %d-dimensional keys (< %d x width): the statistics are rank-deficient; "
                "use more text or a ridge",
                layer,
                self.tokens,
                width,
                MIN_TOKENS_PER_DIM,
            )
        return SecondMoment(module, (self.sums[layer] / self.tokens).cpu(), self.tokens)


def _batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Each padded, truncated batch of ``texts`` with how many texts it holds."""
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        yield batch, len(chunk)


def collect_second_moments(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    max_length: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Accumulate ``E[k kᵀ]`` for each layer in one pass over ``texts`` (padding excluded; texts are truncated to
    ``max_length`` tokens, or to the model's context when that is shorter)."""
    if not texts:
        raise ValueError("no text to compute statistics from")
    max_length = min(max_length, _max_positions(model))
    modules = dict(model.named_modules())
    targets = {layer: ffn_target(model, layer) for layer in layers}
    moments = KeyMoments()
    hooked = {layer: modules[t.value_module] for layer, t in targets.items()}
    device = next(model.parameters()).device
    bar = tqdm(total=len(texts), desc="FFN key statistics", unit="text", disable=not progress)
    deepest = modules[max(targets.values(), key=lambda t: t.layer).value_module]  # nothing after it is needed
    with moments.attached(hooked), eval_mode(model), torch.no_grad(), bar:
        for batch, size in _batches(tokenizer, texts, batch_size, max_length):
            inputs = {name: tensor.to(device) for name, tensor in batch.items()}
            moments.mask = inputs["attention_mask"].reshape(-1).bool()
            moments.tokens += int(moments.mask.sum())
            with up_to(deepest):
                model(**inputs)
            bar.update(size)
    return {layer: moments.moment(layer, target.value_module) for layer, target in targets.items()}


def second_moments(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    cache_dir: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """:func:`collect_second_moments`, read from / written to ``cache_dir`` per layer when given."""
    targets = {layer: ffn_target(model, layer) for layer in layers}
    keys = {layer: stats_key(model, t, texts, max_length) for layer, t in targets.items()}
    cached: dict[int, SecondMoment] = {}
    if cache_dir is not None:
        for layer, key in keys.items():
            path = Path(cache_dir) / f"mom2-{key[:24]}.safetensors"
            if path.is_file():
                value = targets[layer].value_module
                cached[layer] = _load(path, key, value, _key_width(model.get_submodule(value)))
    missing = [layer for layer in layers if layer not in cached]
    if missing:
        fresh = collect_second_moments(model, tokenizer, texts, missing, max_length, batch_size, progress)
        for layer, moment in fresh.items():
            if cache_dir is not None:
                path = Path(cache_dir) / f"mom2-{keys[layer][:24]}.safetensors"
                metadata = {"key": keys[layer], "module": moment.module, "tokens": str(moment.tokens)}
                save_safetensors_atomic({"mom2": moment.matrix}, path, metadata=metadata)
            cached[layer] = moment
    return {layer: cached[layer] for layer in layers}


def _load(path: Path, key: str, module: str, width: int | None = None) -> SecondMoment:
    """Read one layer's cached statistics; refuse a file for another key or module, or not a finite (width × width)
    float64 matrix with a positive token count."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterFileError(f"cannot read statistics file {path}: {error}") from error
    if metadata.get("key") != key or metadata.get("module") != module or set(tensors) != {"mom2"}:
        raise AdapterFileError(f"statistics file {path} was computed for another model, layer or text")
    matrix = tensors["mom2"]
    if matrix.dtype != torch.float64 or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise AdapterFileError(f"statistics file {path} does not hold a square float64 matrix")
    if width is not None and matrix.shape[0] != width:
        raise AdapterFileError(
            f"statistics file {path} holds a {matrix.shape[0]}-wide matrix; the keys are {width}-wide"
        )
    if not torch.isfinite(matrix).all():
        raise AdapterFileError(f"statistics file {path} holds NaN or inf")
    tokens = metadata.get("tokens", "")
    if not (tokens.isascii() and tokens.isdigit() and int(tokens) > 0):
        raise AdapterFileError(f"statistics file {path}: token count {tokens!r} is not a positive integer")
    return SecondMoment(module, matrix, int(tokens))
