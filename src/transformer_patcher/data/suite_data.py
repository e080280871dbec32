"""What the locality suite asks a model: unrelated questions, free-generation prompts and perplexity text.

None of it is ever memory or tuning data (the memory is CounterFact-*train* facts and WikiText-2 *valid* text):

- unrelated questions: the Natural Questions items of zsRE (``loc``) and the prompts of CounterFact edit cases,
  alternating, so any prefix holds both kinds;
- free generation: the openings of WikiText-2 *test* sections (read raw) and plain chat questions (read through the
  chat template);
- perplexity: WikiText-2 *test*;
- questions about an edit's own subject that ask something else (:func:`subject_questions`): 20 templates written
  for the suite (``samples/subject_questions.json``), used nowhere else. A subject gate lets every patch through on
  text that names its subject, so only these see what a fix does to the rest of what the model knows about it.

With the shared data the full files are read; without it (or with ``embedded=True``) the sample embedded in the
package is used (``samples/suite_sample.json``; provenance in ``samples/README.md``). The chat questions are always
the package's own: no dataset here has plain chat requests.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformer_patcher.data.benchmarks import interleave, wikitext_text
from transformer_patcher.data.loaders import find_data_file, load_counterfact, load_questions, load_zsre

SUITE_SAMPLE = Path(__file__).with_name("samples") / "suite_sample.json"
SUBJECT_QUESTIONS = Path(__file__).with_name("samples") / "subject_questions.json"
_DETOKENIZE = (
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" , ", ", "),
    (" . ", ". "),
    (" ; ", "; "),
    (" : ", ": "),
    (" 's", "'s"),
    (" n't", "n't"),
    ("( ", "("),
    (" )", ")"),
)
OPENING_WORDS = 20


@dataclass
class SuiteSources:
    """Texts the suite draws its parts from (see the module docstring for where each comes from)."""

    unrelated: list[str]
    openings: list[str]
    chat_questions: list[str]
    perplexity_text: str
    origin: str  # "shared" or "embedded"


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenisation lightly (`` @-@ `` → ``-``, `` , `` → ``, ``...), so text reads as written."""
    for old, new in _DETOKENIZE:
        text = text.replace(old, new)
    return text


def section_openings(text: str, words: int = OPENING_WORDS) -> list[str]:
    """The first ``words`` words of each section's first paragraph (WikiText layout: ``= Heading =`` lines), skipping
    paragraphs shorter than 30 words or with an ``<unk>`` in the opening."""
    openings, after_heading = [], False
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("="):
            after_heading = True
            continue
        head = detokenize_wikitext(stripped).split()[:words]
        if after_heading and len(stripped.split()) >= 30 and not any("<unk>" in word for word in head):
            openings.append(" ".join(head))
        after_heading = False
    return openings


def suite_sources(
    data_dir: str | Path | None = None,
    embedded: bool = False,
    exclude: Collection[str] = (),
    questions_file: str | Path | None = None,
) -> SuiteSources:
    """The suite's texts, from the shared data when found (unless ``embedded``), else from the embedded sample.
    ``exclude`` drops unrelated questions that are edits of the run being measured; ``questions_file`` (see
    :func:`~.loaders.load_questions`) replaces our unrelated questions with yours."""
    sample = json.loads(SUITE_SAMPLE.read_text(encoding="utf-8"))
    dropped = set(exclude)
    if not embedded:
        try:
            questions = [row["loc"] for row in load_zsre(find_data_file("zsre/zsre_mend_train-1k.json", data_dir))]
            prompts = [
                row["text"]
                for row in load_counterfact(find_data_file("counterfact/counterfact-edit-1k.json", data_dir))
            ]
            test = wikitext_text("test", data_dir)
        except FileNotFoundError:
            embedded = True
    if embedded:
        questions, prompts, test = sample["nq_questions"], sample["counterfact_prompts"], sample["wikitext_test"]
    # the sample's text (or a test file without "= Heading =" lines) holds too few sections: the sample's openings
    openings = (not embedded and section_openings(test)) or [
        detokenize_wikitext(t) for t in sample["wikitext_openings"]
    ]
    asked = load_questions(questions_file) if questions_file is not None else interleave(questions, prompts)
    unrelated = [text for text in dict.fromkeys(asked) if text not in dropped]
    return SuiteSources(
        unrelated,
        openings,
        list(sample["chat_questions"]),
        detokenize_wikitext(test),
        "embedded" if embedded else "shared",
    )


def subject_questions(
    subjects: Sequence[str | None], count: int, exclude: Sequence[Collection[str]] = ()
) -> list[list[str]]:
    """Per edit, ``count`` of the suite's subject questions asked of its subject (none without one): edit ``i``
    takes the templates in turn from ``i·count``, so a stream asks all of them, skipping any text in
    ``exclude[i]`` (the edit and its rephrases). A template may ask the edit's own relation in other words."""
    templates = json.loads(SUBJECT_QUESTIONS.read_text(encoding="utf-8"))
    found = []
    for index, subject in enumerate(subjects):
        skip = set(exclude[index]) if index < len(exclude) else set()
        start = index * count
        filled = [templates[(start + j) % len(templates)].format(subject) for j in range(len(templates))]
        found.append([text for text in filled if text not in skip][:count] if subject else [])
    return found
