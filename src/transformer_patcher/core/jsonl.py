"""JSON Lines: one object per line, blank lines skipped, every failure naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def json_lines(text: str, source: str, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of ``text``; raise ``error`` naming ``source`` and the line."""
    # "\n" only: str.splitlines also splits at U+2028, U+0085 and others, which JSON writers leave raw in strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{source}: line {number}: invalid JSON ({exc.msg})") from exc
        except RecursionError as exc:
            raise error(f"{source}: line {number}: invalid JSON (nested too deeply)") from exc
        if not isinstance(record, dict):
            raise error(f"{source}: line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record
