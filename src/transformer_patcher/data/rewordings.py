"""Relation rewordings: the other ways a training set words a prompt's relation, for a patch's key views (rule 20).

A patch's key reads the query at the edit's last token, and a rephrase that words the relation another way moves
that query further than any prefix does. CounterFact words each relation through a small pool of templates: of the
1,000 rephrases of ``counterfact-edit-1k.json``, 846 (from their last sentence on) are one of the five rephrase
templates that ``counterfact-train.json`` pairs most often with the same prompt template, and 927 one of the ten
(``bench/relation_rewordings.py``; 861 and 924 of 1,000 over the 10,000 of ``counterfact-edit.json``). So the
training split says how a relation is reworded, and an edit's prompt template looks its rewordings up there: the
edit's subject in each of them is a view of the edit (:class:`~transformer_patcher.methods.patcher.views.EditViews`).
A prompt whose template the bank does not hold (a zsRE question, most prompts a user writes) gets none, unless the
user gives a bank of their own (:func:`load_rewordings`): examples of how their own prompts get reworded, in the same
``text``/``rephrase``/``subject`` shape, whose rewordings come before the training set's.

Only training records are read, never the file that is edited or scored, and the records of a benchmark's own
subjects are left out, so a dev stream drawn from the training file does not look up its own rephrases.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from transformer_patcher.core.jsonl import json_lines
from transformer_patcher.data.loaders import load_counterfact_train, read_text
from transformer_patcher.data.neighbours import SLOT, question_template

REWORDINGS = 5  # rephrase templates per prompt template (the dev stream's choice, docs/results.md)


@dataclass(frozen=True)
class RelationRewordings:
    """Prompt template → its rephrase templates, most frequent first (each with one ``{}`` slot)."""

    templates: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_records(
        cls,
        records: Iterable[tuple[str, str, str]],
        exclude: Collection[str] = (),
        count: int | None = REWORDINGS,
        cut: Callable[[str], str] = str.strip,
    ) -> RelationRewordings:
        """The bank of ``(prompt, rephrase, subject)`` records, each template's ``count`` most frequent rephrase
        templates (ties in record order; None: all of them), each rephrase ``cut`` first; records whose subject is
        in ``exclude`` (any case) are not read."""
        banned = {s.casefold() for s in exclude}
        seen: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for prompt, rephrase, subject in records:
            if subject.casefold() in banned:
                continue
            template = question_template(prompt, subject)
            reworded = question_template(cut(rephrase), subject)
            if template and reworded and template.count(SLOT) == reworded.count(SLOT) == 1 and template != reworded:
                seen[template][reworded] += 1
        return cls({t: tuple(r for r, _ in found.most_common(count)) for t, found in seen.items()})

    def __call__(self, text: str, subject: str | None) -> list[str]:
        """``text``'s relation in the bank's other wordings, about ``subject``; [] when the bank lacks its template."""
        template = question_template(text, subject) if subject else None
        return [r.format(subject) for r in self.templates.get(template, ())] if template and subject else []

    def __len__(self) -> int:
        return len(self.templates)

    def merged(self, other: RelationRewordings) -> RelationRewordings:
        """This bank's rewordings of each template, then ``other``'s that it does not already hold."""
        templates = dict(other.templates)
        for template, own in self.templates.items():
            templates[template] = own + tuple(r for r in other.templates.get(template, ()) if r not in own)
        return RelationRewordings(templates)


def last_sentence(text: str) -> str:
    """``text`` from its last sentence on: CounterFact sets some rephrases behind a random sentence ("(2011). Noise
    Unit originated in"), which says nothing about the relation."""
    cut = max(text.rfind(". "), text.rfind("\n"))
    return text[cut + 1 :].strip() if cut >= 0 else text


def relation_rewordings(data_dir: str | Path | None = None, exclude: Collection[str] = ()) -> RelationRewordings:
    """The bank of ``counterfact-train.json`` without the records of the ``exclude`` subjects; empty without the
    shared data."""
    rows = load_counterfact_train(data_dir)
    if rows is None:
        return RelationRewordings()
    records = ((r["text"], r["rephrase"], r["subject"]) for r in rows)
    return RelationRewordings.from_records(records, exclude, cut=last_sentence)


def load_rewordings(path: str | Path) -> RelationRewordings:
    """A user's own bank from a JSON Lines file of ``{"text": ..., "rephrase": ..., "subject": ...}``: a prompt,
    another wording of it, and the subject both name. Every rewording of a template is kept, most frequent first.
    A record the bank could not use (a missing field, a subject either text does not name, a rephrase that is the
    prompt itself) is refused with its line, and so is a file without records."""
    path = Path(path)
    records = []
    for number, row in json_lines(read_text(path), str(path)):
        text, rephrase, subject = (row.get(key) for key in ("text", "rephrase", "subject"))
        where = f"{path}: line {number}"
        if not all(isinstance(v, str) and v.strip() for v in (text, rephrase, subject)):
            raise ValueError(f"{where}: expected {{'text': ..., 'rephrase': ..., 'subject': ...}}, each non-empty text")
        if subject not in text or subject not in rephrase:
            raise ValueError(f"{where}: the subject {subject!r} must occur in both the text and the rephrase")
        if question_template(text, subject) == question_template(rephrase.strip(), subject):
            raise ValueError(f"{where}: the rephrase words the text the same way, so it rewords nothing")
        records.append((text, rephrase, subject))
    if not records:
        raise ValueError(f"{path} holds no rewordings")
    return RelationRewordings.from_records(records, count=None)
