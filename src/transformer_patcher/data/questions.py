"""Questions for the memory: what a deployed chat model is asked, built from data no evaluation set contains.

A patch must stay silent on every input but its own mistake. Running text and cloze statements do not cover what a
deployed model is asked, so a patch keyed on one question fired on most other questions (issue 15: the first edits'
patches fired at 5-12 on unrelated questions). The package's question templates (``samples/question_templates.json``,
written for the package: who, what, where, when about people, places, organisations and works) are filled with
CounterFact-*train* subjects, never a subject of the benchmark being edited nor of the neighbour pool
(``samples/subjects.json``), so no question here is an edit, a rephrase, a neighbour or an unrelated suite question.

The same subjects fill an edit's own question template (:class:`Contrasts`): the edit asked of subjects the evaluation
never asks about. Its patch's threshold is set above them, so it fires on inputs closer to the edit than its
neighbours are.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformer_patcher.core.examples import EditExample
from transformer_patcher.data.loaders import load_counterfact_train
from transformer_patcher.data.neighbours import SLOT, question_template, subject_pool

QUESTION_TEMPLATES = Path(__file__).with_name("samples") / "question_templates.json"
MEMORY_SUBJECTS = Path(__file__).with_name("samples") / "memory_subjects.json"  # offline default; see samples/README
CONTRASTS = 8  # other subjects each edit's question is asked of
MEMORY_QUESTIONS = 4000  # more than a 20,000-row question memory reads (about 25 rows a question, raw and chat)


def question_templates() -> list[str]:
    """The package's question templates, each with one ``{}`` slot for a subject."""
    return json.loads(QUESTION_TEMPLATES.read_text(encoding="utf-8"))


def memory_subjects(
    data_dir: str | Path | None = None, exclude: Collection[str] = (), embedded: bool = False
) -> list[str]:
    """CounterFact-train subjects, each once in file order, without ``exclude`` and the neighbour pool's subjects;
    the embedded 1,500 of them with ``embedded`` or when the shared data is missing."""
    found = None if embedded else _counterfact_train_subjects(data_dir)
    if found is None:
        found = json.loads(MEMORY_SUBJECTS.read_text(encoding="utf-8"))
    banned = {s.casefold() for s in exclude} | {s.casefold() for kind in subject_pool().values() for s in kind}
    return [s for s in dict.fromkeys(found) if s and s.casefold() not in banned]


def _counterfact_train_subjects(data_dir: str | Path | None) -> list[str] | None:
    rows = load_counterfact_train(data_dir)
    return None if rows is None else [row["subject"].strip() for row in rows]


def memory_questions(subjects: Sequence[str]) -> list[str]:
    """The question memory's questions over ``subjects`` (more than its default 20,000 rows read)."""
    return template_questions(subjects, MEMORY_QUESTIONS)


def template_questions(subjects: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """``count`` questions, each a package template filled with a subject, every template in turn (seeded order)."""
    templates = question_templates()
    rng = random.Random(seed)
    order = list(subjects)
    rng.shuffle(order)
    return [templates[i % len(templates)].format(order[i % len(order)]) for i in range(min(count, len(order)))]


def contrast_questions(
    text: str, subject: str | None, subjects: Sequence[str], count: int, seed: int = 0, nearest: Sequence[str] = ()
) -> list[str]:
    """``text`` asked of ``count`` other subjects (its template with the subject swapped), or [] when the text does not
    name its subject: the ``nearest`` subjects first, then random ones from ``subjects``."""
    template = question_template(text, subject) if subject else None
    if template is None or SLOT not in template:
        return []
    rng = random.Random(f"{seed}|{text}")
    chosen = list(dict.fromkeys(s for s in nearest if s != subject))[:count]
    drawn = rng.sample(list(subjects), min(len(subjects), 2 * count))
    chosen += [s for s in drawn if s != subject and s not in chosen][: count - len(chosen)]
    return [template.format(other) for other in chosen]


def subject_contrasts(text: str, subject: str, count: int, seed: int = 0) -> list[str]:
    """``count`` of the package's question templates asked of ``subject`` (a seeded draw per text), without ``text``
    itself: other questions about the subject of an edit, which a patch behind its subject gate must tell the edit
    from."""
    asked = [question for question in (t.format(subject) for t in question_templates()) if question != text]
    return random.Random(f"{seed}|{text}").sample(asked, min(count, len(asked)))


@dataclass(frozen=True)
class Contrasts:
    """An edit's contrasts (:func:`contrast_questions`) over a pool of subjects: what ``PatchTrainer(contrasts=...)``
    asks for each edit."""

    subjects: tuple[str, ...]
    count: int = CONTRASTS

    def __call__(self, example: EditExample, nearest: Sequence[str] = ()) -> list[str]:
        """``nearest``: subjects of the pool to ask first (the trainer's nearest to the example's subject)."""
        return contrast_questions(example.text, example.subject, self.subjects, self.count, nearest=nearest)


def contrasts_over(subjects: Sequence[str]) -> Contrasts | None:
    """Each edit's contrasts over ``subjects``; None without subjects."""
    return Contrasts(tuple(subjects)) if subjects else None
