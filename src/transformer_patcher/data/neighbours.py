"""Near neighbours of an edit: the same question about another subject, where a patch leaks first.

A patch keyed on "What is the capital of Australia?" also sees "What is the capital of France?" as nearly the same
input, so neighbours are measured apart from unrelated questions. They come from, in this order:

1. the data: records whose question is the edit's with only the subject changed (zsRE has many: "What was {}'s
   occupation?"), or a CounterFact case's neighbourhood prompt;
2. the edit's own template filled with other subjects: of the subject's kind when the subject is in the package's
   pool (``samples/subjects.json``: countries, cities, people, organisations, works), people for a name of two to
   four capitalised words, else of every kind.

A user's edit names its subject (``--subject``) or :func:`guess_subject` finds the longest capitalised span.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Sequence
from pathlib import Path

SUBJECTS = Path(__file__).with_name("samples") / "subjects.json"
SLOT = "{}"
_CONNECTORS = {"of", "the", "de", "da", "del", "der", "van", "von", "la", "le", "du", "and", "y", "bin", "al"}
_PERSON = re.compile(r"[A-Z][\w'.-]+(?: [A-Z][\w'.-]+){1,3}")  # "Watts Humphrey": two to four capitalised words
_NOT_SUBJECTS = {
    "what", "who", "whom", "whose", "which", "where", "when", "why", "how", "is", "are", "was", "were", "did", "does",
    "do", "in", "on", "at", "the", "a", "an", "of", "i", "tell", "name", "give", "can", "could", "please",
}  # fmt: skip


def subject_pool() -> dict[str, list[str]]:
    """The package's subjects by kind."""
    return json.loads(SUBJECTS.read_text(encoding="utf-8"))


def question_template(text: str, subject: str) -> str | None:
    """``text`` with its first mention of ``subject`` as ``{}`` (other braces doubled), or None if it has none."""
    if not subject.strip() or subject not in text:
        return None
    before, _, after = text.partition(subject)
    escape = lambda part: part.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return escape(before) + SLOT + escape(after)


def subject_of(text: str, given: str | None = None) -> str | None:
    """The subject an edit names: ``given`` when it has one, else :func:`guess_subject`'s guess from ``text``."""
    return given or guess_subject(text)


def guess_subject(text: str) -> str | None:
    """The longest run of capitalised words (joined by "of", "de", "van"...), the last one on a tie; a leading
    question word and a trailing possessive are left out. None when the text has no capitalised word."""
    words = re.findall(r"[^\s?!,;:\"()]+", text)
    runs: list[list[str]] = []
    current: list[str] = []
    for index, word in enumerate(words):
        bare = word.strip(".")
        capital = (bare[:1].isupper() or bare[:1].isdigit()) and not (index == 0 and bare.lower() in _NOT_SUBJECTS)
        if capital or (current and bare.lower() in _CONNECTORS):
            current.append(bare)
        else:
            runs.append(current)
            current = []
    runs.append(current)
    runs = [_trim(run) for run in runs]
    runs = [run for run in runs if run]
    if not runs:
        return None
    best = max(range(len(runs)), key=lambda i: (len(runs[i]), i))
    subject = " ".join(runs[best])
    subject = re.sub(r"['’]s$", "", subject)
    return subject if subject in text else None


def _trim(run: list[str]) -> list[str]:
    while run and run[-1].lower() in _CONNECTORS:
        run = run[:-1]
    while run and run[0].lower() in _CONNECTORS:
        run = run[1:]
    return run


def fill_template(template: str, subject: str, count: int, pool: dict[str, list[str]] | None = None) -> list[str]:
    """``count`` questions: ``template`` filled with other subjects, chosen deterministically (by the template)."""
    pool = pool if pool is not None else subject_pool()
    kinds = [kind for kind, names in pool.items() if subject in names]
    if not kinds and _PERSON.fullmatch(subject) and "people" in pool:
        kinds = ["people"]
    kinds = kinds or list(pool)
    candidates = _round_robin([[n for n in pool[kind] if n != subject] for kind in kinds])
    if not candidates:
        return []
    start = int(hashlib.sha256(template.encode()).hexdigest(), 16) % len(candidates)
    chosen = [candidates[(start + i) % len(candidates)] for i in range(min(count, len(candidates)))]
    return [template.format(name) for name in chosen]


def _round_robin(groups: list[list[str]]) -> list[str]:
    out: list[str] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def neighbours_of(
    text: str,
    subject: str | None,
    count: int,
    found: Sequence[str] = (),
    pool: dict[str, list[str]] | None = None,
) -> list[str]:
    """Up to ``count`` neighbours of the question ``text``: ``found`` (the data's own, first) then template fills.
    Without a subject (or one the text does not mention) only ``found`` can be used."""
    chosen = [n for n in dict.fromkeys(found) if n != text][:count]
    template = question_template(text, subject) if subject else None
    if template is not None and len(chosen) < count:
        fills = fill_template(template, subject or "", count + len(chosen), pool)
        chosen += [q for q in fills if q != text and q not in chosen][: count - len(chosen)]
    return chosen


def same_template_records(
    records: Sequence[tuple[str, str | None]], exclude: Collection[str] = ()
) -> dict[str, list[str]]:
    """(question, subject) records grouped by question template (the question with its subject as ``{}``), leaving
    out ``exclude``d questions (those of the edit stream: a neighbour must not itself be edited)."""
    dropped = set(exclude)
    groups: dict[str, list[str]] = {}
    for text, subject in records:
        template = question_template(text, subject) if subject else None
        if template is not None and text not in dropped:
            groups.setdefault(template, []).append(text)
    return groups
