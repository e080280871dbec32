"""Context templates: the prompt alone plus short model-generated prefixes, so an edit holds in varied contexts.

As in the official code: ``"{}"`` plus, for each (length, count), ``count`` samples (top-k 5) of ``length`` tokens
started from "The", "Therefore", "Because", "I", "You", each followed by ``". {}"``. Sampling is seeded, so the
same model yields the same templates (and the same edit) on every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transformer_patcher.core.modes import eval_mode

STARTS = ("The", "Therefore", "Because", "I", "You")
BARE_PROMPT: tuple[tuple[str, ...], ...] = (("{}",),)  # the first template group: the prompt alone


def context_templates(
    model: nn.Module, tokenizer: Any, lengths: Sequence[tuple[int, int]] = ((10, 5),), seed: int = 0
) -> list[list[str]]:
    """Template groups: ``[["{}"], [generated prefix + ". {}", ...], ...]`` (keys average within, then across)."""
    groups = [list(group) for group in BARE_PROMPT]
    device = next(model.parameters()).device
    for length, count in lengths:
        starts = [STARTS[i % len(STARTS)] for i in range(count)]
        group = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
            torch.manual_seed(seed)
            for start in starts:
                inputs = tokenizer(start, return_tensors="pt").to(device)
                new_tokens = max(1, length - inputs["input_ids"].shape[1])
                with torch.no_grad():
                    output = model.generate(
                        **inputs,
                        do_sample=True,
                        top_k=5,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                    )
                text = tokenizer.decode(output[0], skip_special_tokens=True)
                group.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(group)
    return groups
