"""How counts read in what the package prints and writes: "1 neuron", "3 neurons", "1,200 rows"."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``plural`` for irregular nouns, e.g. "patches")."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
