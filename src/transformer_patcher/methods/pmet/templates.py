"""Context templates: the prompt alone plus short model-generated prefixes, so an edit holds in varied contexts.

As in the official code: ``"{}"`` plus, for each (length, count), ``count`` samples (top-k 5) of ``length`` tokens
started from "The", "Therefore", "Because", "I", "You", each followed by ``". {}"``. Sampling is seeded, so the
same model yields the same templates (and the same edit) on every run.

``start="document"`` (not the official code's) samples after the tokenizer's start-of-text token when the tokenizer
does not add one itself. GPT-2 and GPT-J, the official code's models, continue a bare "The" with text; SmolLM2,
whose tokenizer adds no BOS, continues it with hyphens ("The-the-key-to-be-."), so its context templates carried no
context (docs/pmet.md, "Deviations from the paper").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transformer_patcher.core.modes import eval_mode

STARTS = ("The", "Therefore", "Because", "I", "You")
TEMPLATE_STARTS = ("bare", "document")
BARE_PROMPT: tuple[tuple[str, ...], ...] = (("{}",),)  # the first template group: the prompt alone


def document_start(tokenizer: Any) -> list[int]:
    """The token ids a text starts with that the tokenizer does not add itself: its BOS token (its EOS, GPT-2's
    document separator, when it has none), or nothing when encoding already puts it first or it has neither."""
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if first is None or tokenizer("The")["input_ids"][:1] == [first]:
        return []
    return [first]


def context_templates(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[tuple[int, int]] = ((10, 5),),
    seed: int = 0,
    start: str = "bare",
) -> list[list[str]]:
    """Template groups: ``[["{}"], [generated prefix + ". {}", ...], ...]`` (keys average within, then across).

    ``start``: "bare" samples from the start word alone (the official code), "document" after the tokenizer's
    start-of-text token (:func:`document_start`)."""
    if start not in TEMPLATE_STARTS:
        raise ValueError(f"start must be one of {TEMPLATE_STARTS}, got {start!r}")
    head = document_start(tokenizer) if start == "document" else []
    groups = [list(group) for group in BARE_PROMPT]
    device = next(model.parameters()).device
    for length, count in lengths:
        words = [STARTS[i % len(STARTS)] for i in range(count)]
        group = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
            torch.manual_seed(seed)
            for word in words:
                word_ids = tokenizer(word)["input_ids"]
                inputs = {"input_ids": torch.tensor([head + word_ids], device=device)}
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                new_tokens = max(1, length - len(word_ids))  # the start token does not count in the length
                with torch.no_grad():
                    output = model.generate(
                        **inputs,
                        do_sample=True,
                        top_k=5,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                    )
                text = tokenizer.decode(output[0, len(head) :], skip_special_tokens=True)
                group.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(group)
    return groups
