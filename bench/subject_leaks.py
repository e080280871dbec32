"""How many of the suite's subject questions a saved patch set changes, and in how many the edit's answer appears.

Reads an ``sme run``'s patch set (nothing is retrained). Each fix in its edit log is asked ``--per-edit`` of the
suite's subject questions (``data.suite_data.subject_questions``, as the suite picks them), raw, answered greedily
(16 tokens) with the patches off and on, raw or chat (``--prompt-format``). A changed answer that contains the first
12 characters of the edit's own answer is the fix written into another question about its subject. ``first_token``
counts the changed answers that differ from their first token on. For each changed answer the patch that adds the
most (activation times value norm) where the answer first differs is named: ``leading`` counts whether it is the
first patch of its edit (the first answer token's, when that token was wrong, as on nearly every zsRE edit of
SmolLM2) or a later one, and whether it belongs to the question's own edit; ``median_first_difference`` is the
answer token at which changed answers first differ (0: the first).

    python bench/subject_leaks.py --patches runs/dev-subject/patches/fold-0
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics

import torch

from transformer_patcher.core.decoding import greedy_continuations
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.data.neighbours import subject_of
from transformer_patcher.data.suite_data import subject_questions
from transformer_patcher.tuners.patcher.layer import PatcherLayer
from transformer_patcher.tuners.patcher.model import PatcherModel
from transformer_patcher.tuners.patcher.patch_set import read_edit_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-edit", type=int, default=1)
    parser.add_argument("--prompt-format", choices=("raw", "chat"), default="raw")
    args = parser.parse_args()
    log = read_edit_log(args.patches)
    base, tokenizer = load_model(args.model, "generation")
    model = PatcherModel.from_pretrained(base, args.patches).eval()
    task = task_for_model(model, tokenizer).formatted(args.prompt_format)
    named = [subject_of(e["text"], e.get("subject")) for e in log]
    asked = subject_questions(named, args.per_edit, [{e["text"], *e.get("rephrases", [])} for e in log])
    rows = [(str(e["target"]), q) for e, qs in zip(log, asked, strict=True) for q in qs]
    owners = [int(e["edit_id"]) for e, qs in zip(log, asked, strict=True) for _ in qs]
    prompts = [task.prompt_tokens(q) for _, q in rows]
    stop, pad = task.prompter.stop_ids, task.pad_id
    with model.disable_adapter():
        before = greedy_continuations(model, prompts, stop, 16, pad)
    after = greedy_continuations(model, prompts, stop, 16, pad)
    changed = [
        (t, q, task.decode(b), task.decode(a)) for (t, q), b, a in zip(rows, before, after, strict=True) if a != b
    ]
    written = [c for c in changed if c[0].lower()[:12] in c[3].lower()]
    first = sum(b[:1] != a[:1] for b, a in zip(before, after, strict=True))
    layer = next(m for m in model.modules() if isinstance(m, PatcherLayer))
    leading, where = collections.Counter(), []
    for owner, prompt, b, a in zip(owners, prompts, before, after, strict=True):
        if a != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            edit, rank = leading_patch(model, layer, [*prompt, *b[:at]])
            leading[f"{'first' if rank == 0 else 'later'} patch, {'own' if edit == owner else 'other'} edit"] += 1
            where.append(at)
    summary = {"patches": args.patches, "format": args.prompt_format, "questions": len(rows), "changed": len(changed)}
    found = {"answer_written": len(written), "first_token": first, "leading": dict(leading)}
    print(json.dumps(summary | found | {"median_first_difference": statistics.median(where) if where else None}))


def leading_patch(model: PatcherModel, layer: PatcherLayer, tokens: list[int]) -> tuple[int, int]:
    """The committed patch that adds the most to the FFN output at the last of ``tokens``: its edit id and its rank
    among its edit's patches (0: the first answer token's)."""
    adapter = layer.active_adapters[0]
    with torch.no_grad(), layer.capture(adapter) as record:
        model(input_ids=torch.tensor([tokens]))
    activations = layer.activation(adapter)(record.frozen_preactivations[0, -1])
    opened = layer.gate_opened(layer.patch_frozen_subjects[adapter], adapter, True)
    if opened is not None:
        activations = activations * opened.reshape(len(tokens), -1)[-1].to(activations)
    top = int((activations.abs() * layer.patch_frozen_values[adapter].norm(dim=1)).argmax())
    ids = layer.patch_frozen_edit_ids[adapter]
    return int(ids[top]), int((ids[:top] == ids[top]).sum())


if __name__ == "__main__":
    main()
