"""The package's unit of work: one input with the output it should have, and what an edit of it must keep.

It is plain data (no torch), so the data loaders, the editors and the runners share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditExample:
    """One input with its correct output: a class id for classification, an answer string for generation."""

    text: str
    target: int | str
    rephrases: tuple[str, ...] = ()
    locality: tuple[tuple[str, int | str], ...] = ()  # (input, its reference output) pairs that must not change
    subject: str | None = None  # what the text is about; PMET writes the fact at its last token
    keep: tuple[str, ...] = ()  # inputs whose answers this edit must not change: its patch stays below them
