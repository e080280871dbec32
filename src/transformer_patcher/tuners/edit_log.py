"""The edit log of an adapter folder, ``edits.jsonl``: one line per edit, for both adapter types.

Written by the CLI beside the adapter files: each line has the ``edit_id``, ``text``, ``target`` and ``success`` of an
edit, the ``prompt_format`` it was made in, and when known its ``subject`` and ``rephrases``, so later edits can
rebuild the memory of earlier ones, ``eval`` can score the fixes as they were asked, and a reader can see what each
edit fixes. It is read as a regular file only (a FIFO would hang the reader) and written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformer_patcher.core.atomic import open_regular_file, write_text_atomic
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.core.jsonl import json_lines

EDIT_LOG = "edits.jsonl"


def read_edit_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The folder's edit log (empty when it has none); a malformed line is an error naming the line."""
    log = Path(path) / EDIT_LOG
    try:
        with open_regular_file(log) as handle:
            text = handle.read().decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries = []
    for number, entry in json_lines(text, str(log), AdapterFileError):
        if not isinstance(entry.get("edit_id"), int):
            raise AdapterFileError(f"{log}: line {number}: each line must be an object with an integer 'edit_id'")
        for field, kinds, what in (("text", str, "text"), ("target", (str, int), "text or a label index")):
            value = entry.get(field)
            if not isinstance(value, kinds) or isinstance(value, bool):
                state = "missing" if field not in entry else f"a {type(value).__name__}, not {what}"
                raise AdapterFileError(f"{log}: line {number}: field {field!r} is {state}")
        entries.append(entry)
    return entries


def edit_log_entry(
    edit_id: int,
    text: str,
    target: Any,
    success: bool,
    prompt_format: dict[str, Any] | None = None,
    subject: str | None = None,
    rephrases: Sequence[str] = (),
) -> dict[str, Any]:
    """One line of the edit log; the optional fields are written only when known."""
    entry: dict[str, Any] = {"edit_id": edit_id, "text": text, "target": target, "success": success}
    if prompt_format is not None:
        entry["prompt_format"] = dict(prompt_format)
    if subject:
        entry["subject"] = subject
    if rephrases:
        entry["rephrases"] = list(rephrases)
    return entry


def write_edit_log(path: str | os.PathLike[str], entries: list[dict[str, Any]]) -> None:
    write_text_atomic(Path(path) / EDIT_LOG, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
