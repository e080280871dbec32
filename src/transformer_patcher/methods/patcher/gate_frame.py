"""The subject gate's frame, measured once per patch set on text no evaluation set contains.

A gate compares the gate block's output with each patch's subject read by cosine. In the raw residual stream every
position shares a large common part: on Gemma-3's block 3 a subject read meets other subjects' questions at cosine
0.91-0.98, so a 0.8 gate opened on everything and cost near-neighbour locality (0.89 → 0.59 at 100 edits). The frame
subtracts that part and evens out the features' spreads (``tuners.patcher.gate.measure_frame``): then a 0.8 gate kept
99 % of zsRE rephrases open and let 1 % (Gemma-3) and 0.25 % (SmolLM2) of other questions open any of 100 patches
(``bench/gate_frame.py``).

It is read from the memory's own texts, running text and the memory questions in every format a deployed model is
asked in, all positions but each text's first; so it never sees an edit or an evaluation input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from transformer_patcher.core.decoding import forced_batch
from transformer_patcher.core.modes import eval_mode, up_to
from transformer_patcher.core.tasks import Task
from transformer_patcher.methods.patcher.memory import question_formats
from transformer_patcher.tuners.patcher.gate import GateReads, measure_frame

FRAME_TEXTS = 256  # of running text, and as many questions in each format: 10,000+ positions on SmolLM2


def frame_prompts(
    task: Task, texts: Sequence[str], questions: Sequence[str], count: int = FRAME_TEXTS
) -> list[list[int]]:
    """Token ids of the first ``count`` running ``texts`` (raw) and the first ``count`` ``questions`` as each
    :func:`question_formats` format asks them."""
    tokenizer = task.tokenizer
    prompts = [tokenizer(text)["input_ids"] for text in texts[:count]]
    for fmt in question_formats(task):
        prompts += [task.formatted(fmt).prompt_tokens(question) for question in questions[:count]]
    return [p for p in prompts if len(p) > 1]


def read_gate_frame(
    model: nn.Module,
    gate: GateReads,
    task: Task,
    prompts: Sequence[Sequence[int]],
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """The gate frame (rows: mean, inverse spread) of ``gate``'s block over every position of ``prompts`` but each
    one's first: the forward passes stop at the gate block."""
    if not prompts:
        raise ValueError("a gate frame needs text to read: pass memory texts or questions")
    rows = []
    pad = task.pad_id
    with eval_mode(model), torch.no_grad():
        for start in tqdm(range(0, len(prompts), batch_size), desc="gate frame", unit="batch", disable=not progress):
            chunk = list(range(start, min(start + batch_size, len(prompts))))
            batch = forced_batch(chunk, prompts, [[pad]] * len(prompts), pad)  # one-token continuations: the prompts
            with up_to(gate.block):
                model(**batch.inputs)
            outputs = gate.outputs
            rows.append(outputs[outputs.ne(0).any(-1)].cpu())
    return measure_frame(torch.cat(rows))
