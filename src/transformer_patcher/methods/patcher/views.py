"""Views of an edit: its input behind short prefixes the model wrote itself, asked in the other prompt formats, and
(``subject_first``) reworded to open with its subject.

A patch's key is a direction along which its edit scores high and the memory low. Built from the edit's one query,
it also rewards what is particular to that one wording: on SmolLM2's last FFN a zsRE rephrase scored below half of
the edit along it on 63 % of 60 dev edits (``bench/key_views.py``). Reading the same edit behind other words (ROME's
context templates: a few tokens the model writes itself from common openings) and in the other prompt format shows
which directions the surroundings move, and two-class LDA over those readings (:func:`discriminant`'s ``views``)
weighs them down. The same 60 edits: rephrases past half-way 37 % → 63 %, held-out neighbours above the threshold
8.8 % → 6.3 %. ``EditConfig.key_views`` is 16 by default: ungated, over a 250-edit stream it cost near-neighbour
locality, but behind the subject gate it lifted the zsRE dev stream's GR 0.61 -> 0.65 with every locality part at
1.00 (docs/editing.md, rules 11 and 12). Ungated, only the first answer token's key is built this way.

A rephrase that opens with its subject ("UniFirst makes what product?") moves the query in a direction no prefix
does: behind the bare subject read (rule 18) the gate opened on every such dev rephrase, yet the key missed 36 of 60.
The edit's question behind its subject (``subject_first_texts``) shows that direction too: on the subject-first dev
rephrases of the first 60 zsRE records, the share scoring past the threshold along the views key rose 0.58 -> 0.78
and past half-way 0.12 -> 0.40, with no contrast above it (docs/results.md).

A rephrase that words the relation another way ("X's greatest weakness is" for "X plays the sport") moves the last
token's query furthest of all: on a CounterFact dev stream its pre-activations had quartiles -74.7 / -30.8 / -9.3
against the edit's 12. With ``rewordings`` (rule 20: the relation as a training set words it, about the edit's subject)
as views at every answer read they were 7.2 / 9.6 / 11.8, and paraphrase accuracy went 0.10 -> 0.67.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.tasks import Task
from transformer_patcher.methods.patcher.memory import answer_queries, answer_start_queries, question_formats

OPENINGS = ("The", "Therefore", "Because", "I", "You", "In", "A", "It", "When", "She", "We", "This", "After", "He",
            "My", "If")  # fmt: skip
PREFIX_TOKENS = 10
Rewordings = Callable[[str, str | None], Sequence[str]]  # (text, subject) → the text's relation in other words


def subject_first_texts(text: str, subject: str | None) -> list[str]:
    """``text`` (a question) reworded to open with ``subject``: after it and a colon or a full stop, behind "About
    subject,", and after it and a dash with the subject's mention turned to "it". An empty list when the text does not
    name the subject."""
    text = text.strip()
    if not subject or not text or subject not in text:
        return []
    lowered = text[0].lower() + text[1:] if not text.startswith(subject) else text
    return [
        f"{subject}: {text}",
        f"{subject}. {text}",
        f"About {subject}, {lowered}",
        f"{subject} - {text.replace(subject, 'it')}",
    ]


def written_prefixes(model: nn.Module, tokenizer: Any, count: int, seed: int = 0) -> list[str]:
    """``count`` (at most ``len(OPENINGS)``) short texts the model writes from common openings, each ending in a
    full stop: top-5 sampling under a fixed seed from the start of a document (the tokenizer's BOS; SmolLM2 writes
    "The-the-key-to-be-t" without one), with any patches switched off, so a session reopened over a patch set
    writes the same ones."""
    if not 0 <= count <= len(OPENINGS):
        raise ValueError(f"key_views must be between 0 and {len(OPENINGS)}, got {count}")
    texts = []
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else torch.no_grad()
    with torch.random.fork_rng(devices=[]), torch.no_grad(), disabled:
        torch.manual_seed(seed)
        for opening in OPENINGS[:count]:
            ids = tokenizer(opening, return_tensors="pt").input_ids
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is not None and int(ids[0, 0]) != start:  # text from a document's start, not mid-stream
                ids = torch.cat([torch.tensor([[start]]), ids], dim=1)
            ids = ids.to(model.device)
            written = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=PREFIX_TOKENS,
                do_sample=True,
                top_k=5,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            text = " ".join(tokenizer.decode(written[0], skip_special_tokens=True).split())
            texts.append(text.rstrip(".") + ".")
    return texts


class EditViews:
    """Reads an edit's views at the patched layer: the task's format behind each prefix, then the other formats.
    ``rewordings`` (rule 20) gives an edit's relation in other words about its subject (``text, subject`` → texts,
    e.g. :class:`~transformer_patcher.data.rewordings.RelationRewordings`); they are views at every answer read."""

    def __init__(
        self, prefixes: Sequence[str], subject_first: bool = True, rewordings: Rewordings | None = None
    ) -> None:
        self.prefixes = list(prefixes)
        self.subject_first = subject_first
        self.rewordings = rewordings

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any,
        count: int,
        subject_first: bool = True,
        rewordings: Rewordings | None = None,
    ) -> EditViews:
        return cls(written_prefixes(model, tokenizer, count), subject_first, rewordings)

    def queries(self, model: nn.Module, layer: Any, task: Task, example: EditExample) -> list[torch.Tensor]:
        """The FFN queries of the views at each of the edit's answer reads: for the first, every view (views, d);
        for a later one, the views behind a prefix and the relation's rewordings (n, d), whose answer reads are the
        edit's own. One forward pass per prompt format (and one for the subject-first rewordings), stopped at the
        patched layer."""
        related = self.rewordings(example.text, example.subject) if self.rewordings is not None else []
        texts = [example.text] + [f"{p} {example.text}" for p in self.prefixes] + related
        behind = answer_queries(model, layer, task, texts, example.target)[1:]  # the edit's own row sizes the reads
        first = [behind[:, 0]]
        for fmt in question_formats(task)[1:]:
            first.append(answer_start_queries(model, layer, task.formatted(fmt), [example.text], example.target))
        reworded = subject_first_texts(example.text, example.subject) if self.subject_first else []
        if reworded:
            first.append(answer_start_queries(model, layer, task, reworded, example.target))
        return [torch.cat(first), *behind[:, 1:].unbind(1)]
