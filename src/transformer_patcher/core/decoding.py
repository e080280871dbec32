"""Batched greedy decoding with transformers' ``generate``: left-padded batches, the KV cache, stop tokens.

This is what a user of the model sees: the evaluation suite's references are made this way (and read back by teacher
forcing, exact for greedy decoding), and so are the model's own answers that the question memory reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from transformer_patcher.core.modes import eval_mode
from transformer_patcher.core.placement import execution_device


def greedy_continuations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    pad_id: int,
    batch_size: int = 32,
    progress: bool = False,
    description: str = "generating",
) -> list[list[int]]:
    """The greedy continuation of each prompt: up to and including the first stop token, at most
    ``max_new_tokens`` tokens. Prompts are batched by length (left-padded) and returned in input order."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=pad_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results: list[list[int]] = [[] for _ in prompts]
    stops = set(stop_ids)
    starts = range(0, len(order), batch_size)
    device = execution_device(model)
    with eval_mode(model), torch.no_grad():
        for start in tqdm(starts, desc=description, unit="batch", leave=False, disable=not progress):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
                mask[row, width - len(prompts[i]) :] = 1
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for i, tokens in zip(chunk, output[:, width:].tolist(), strict=True):
                results[i] = _until_stop(tokens, stops)
    return results


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """``tokens`` up to and including the first stop token (generate pads finished rows after it)."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[: position + 1]
    return tokens


@dataclass
class ForcedBatch:
    """Right-padded ``prompt + continuation[:-1]`` rows and their reads (teacher forcing)."""

    order: list[int]  # sequence indices in this batch
    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor  # per read: the batch row
    cols: torch.Tensor  # per read: the position
    kept: torch.Tensor  # per read: index into ``keep``
    labels: torch.Tensor
    keep: torch.Tensor  # the positions the LM head is asked for, when the model takes ``logits_to_keep``


def forced_batch(
    chunk: list[int], prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int
) -> ForcedBatch:
    """Right-padded ``prompt + continuation[:-1]`` rows; read ``t`` of a row is the position predicting token ``t``."""
    rows_ids = [list(prompts[i]) + list(continuations[i][:-1]) for i in chunk]
    width = max(len(r) for r in rows_ids)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, labels = [], [], []
    for row, (i, seq) in enumerate(zip(chunk, rows_ids, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        first = len(prompts[i]) - 1
        rows += [row] * len(continuations[i])
        cols += range(first, first + len(continuations[i]))
        labels += continuations[i]
    cols_t = torch.tensor(cols)
    keep = torch.unique(cols_t)
    return ForcedBatch(
        chunk,
        {"input_ids": ids, "attention_mask": mask},
        torch.tensor(rows),
        cols_t,
        torch.searchsorted(keep, cols_t),
        torch.tensor(labels),
        keep,
    )
