"""What the commands print: text made safe for the terminal, one line each, and markdown tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Text from files (edit logs, adapter configs, data) reaches the terminal: control characters there would run as
# escape sequences (clear the screen, move the cursor, retitle the window), line breaks would forge lines, and bidi
# controls would reorder what is shown. Line breaks become ⏎; the others their Python escape.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_VISIBLE = str.maketrans(
    {chr(c): f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
    | {c: f"\\u{ord(c):04x}" for c in _BIDI_CONTROLS + "\u2028\u2029"}
    | {"\n": "⏎", "\r": "⏎"}
)


def one_line(text: object) -> str:
    """``text`` as one line that shows what it holds and cannot act on the terminal (see ``_VISIBLE``)."""
    return str(text).replace("\r\n", "\n").translate(_VISIBLE)


def md_row(cells: Iterable[Any]) -> str:
    """One markdown table row: floats to 3 decimals, text made safe by :func:`md_cell`."""
    shown = [f"{c:.3f}" if isinstance(c, float) else md_cell(str(c)) for c in cells]
    return "| " + " | ".join(shown) + " |"


def md_cell(text: str) -> str:
    """:func:`one_line` with ``|`` escaped: either would otherwise end the cell or forge a row."""
    return one_line(text).replace("|", "\\|")


def md_head(columns: Sequence[str], align: str) -> str:
    """A table's header row and separator; ``align`` has one letter per column, ``r`` for right-aligned numbers."""
    rule = ["---:" if a == "r" else "---" for _, a in zip(columns, align, strict=True)]
    return md_row(columns) + "\n|" + "|".join(rule) + "|"
