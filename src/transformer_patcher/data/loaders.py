"""Loaders for the three editing datasets (FEVER, zsRE, CounterFact) as HuggingFace ``datasets.Dataset`` objects.

Records are validated on load, so a malformed file fails at once with the file, the line or record and the field
named, instead of deep inside an editing run: a :class:`DatasetFormatError` for invalid UTF-8 or JSON (nesting too
deep included), a record that is not an object, a missing, empty, whitespace-only or non-string text field, a string
holding a lone surrogate (``"\ud800"``, which no encoder can write), and an unknown FEVER label. Files are UTF-8, a
byte-order mark is skipped, JSON lines are separated by ``\n`` only (U+2028 and other Unicode line breaks inside
strings are text). Fields the loader does not read are ignored, whatever their type. Any other text is kept as it is
(NUL, zero-width, right-to-left and astral characters, any length): the editing task truncates long inputs with a
warning and refuses targets it cannot encode. :func:`to_edit_examples` turns a loaded dataset into the package's
:class:`~transformer_patcher.core.examples.EditExample` list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformer_patcher.core.errors import PatcherError
from transformer_patcher.core.examples import EditExample
from transformer_patcher.core.jsonl import json_lines

if TYPE_CHECKING:
    import datasets


DATA_ENV_VAR = "TRANSFORMER_PATCHER_DATA"
FEVER_LABELS: dict[str, int | None] = {"SUPPORTS": 1, "REFUTES": 0, "NOT ENOUGH INFO": None}
_NQ_PREFIX = "nq question: "
ZSRE_SAMPLE = Path(__file__).with_name("samples") / "zsre_sample.json"  # 40 real records; provenance in samples/


class DatasetFormatError(PatcherError, ValueError):
    """A dataset file is not in the expected format; the message names the file, the line or record and the field."""


class DataDirError(PatcherError, ValueError):
    """A data folder was given that does not exist (not a FileNotFoundError: that one means "use the fallback")."""


# --------------------------------------------------------------------------------------------------- locating
def find_data_file(name: str, data_dir: str | Path | None = None) -> Path:
    """Find ``name`` (e.g. ``"fever/paper_dev.jsonl"``) so scripts run unchanged on machines with different layouts.

    Looks in ``data_dir``, then ``$TRANSFORMER_PATCHER_DATA``, then ``shared/data`` and ``../shared/data`` relative to
    the current directory and to the repository checkout. A ``data_dir`` that is not a folder is refused
    (:class:`DataDirError`, which the callers that fall back to embedded samples on a missing file do not catch):
    a mistyped folder must not quietly give other data.
    """
    candidates: list[Path] = []
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise DataDirError(f"the data folder {str(data_dir)!r} does not exist or is not a folder")
        candidates.append(Path(data_dir))
    if os.environ.get(DATA_ENV_VAR):
        candidates.append(Path(os.environ[DATA_ENV_VAR]))
    repo = Path(__file__).resolve().parents[3]
    for base in (Path.cwd(), repo):
        candidates += [base / "shared" / "data", base.parent / "shared" / "data"]
    seen: list[Path] = []
    for directory in candidates:
        if directory in seen:
            continue
        seen.append(directory)
        path = directory / name
        if path.is_file():
            return path
    looked = ", ".join(str(d / name) for d in seen)
    raise FileNotFoundError(  # one line, as the CLI shows every error
        f"data file {name!r} not found; looked in {looked}; pass data_dir= or set {DATA_ENV_VAR} to the folder "
        "holding it"
    )


# --------------------------------------------------------------------------------------------------- reading
def _is_url(path: str | Path) -> bool:
    return isinstance(path, str) and path.startswith(("http://", "https://"))


def read_text(file: Path) -> str:
    """A data file's text (UTF-8, a BOM allowed); invalid bytes are a :class:`DatasetFormatError` naming the line."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetFormatError(f"{file}: line {line}: not valid UTF-8 (byte {e.start}: {e.reason})") from e


def _records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, record) pairs; location is "line N" (1-based) for JSON lines, "record N" (0-based) otherwise.

    Local files are parsed here rather than by ``datasets`` so that a bad record can be reported by its line.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if _is_url(path):
        import datasets

        rows = datasets.load_dataset("json", data_files=str(path), split="train")
        for i, row in enumerate(rows):
            yield f"record {i}", row
        return
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"dataset file not found: {file}")
    text = read_text(file)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
        except RecursionError as e:
            raise DatasetFormatError(f"{file}: invalid JSON (nested too deeply)") from e
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DatasetFormatError(f"{file}: record {i}: expected a JSON object, got {type(rec).__name__}")
            yield f"record {i}", rec
        return
    for n, rec in json_lines(text, str(file), DatasetFormatError):
        yield f"line {n}", rec


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _encodable(value: str) -> bool:
    """False for a string holding a lone surrogate (JSON allows the escape; UTF-8 and Arrow cannot store it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _str_field(rec: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        state = "missing" if key not in rec else f"not a non-empty string (got {_shown(value)})"
        raise DatasetFormatError(f"{where}: field {key!r} is {state}")
    if not _encodable(value):
        raise DatasetFormatError(f"{where}: field {key!r} holds a lone UTF-16 surrogate, which is not text")
    return value


def _target_field(rec: dict[str, Any], key: str, where: str) -> str:
    """CounterFact targets are strings in EasyEdit's format and ``{"str": ...}`` dicts in ROME's original one."""
    value = rec.get(key)
    if isinstance(value, dict):
        return _str_field(value, "str", f"{where}: field {key!r}")
    return _str_field(rec, key, where)


def _load(path: str | Path, parse: Callable[[dict[str, Any], str], dict[str, Any] | None]) -> datasets.Dataset:
    import datasets

    rows, read = [], 0
    for loc, rec in _records(path):
        read += 1
        row = parse(rec, f"{path}: {loc}")
        if row is not None:
            rows.append(row)
    if not rows:
        why = (
            "the file holds no records"
            if not read
            else f"all {read} records were dropped (e.g. NOT ENOUGH INFO, or an empty alt)"
        )
        raise DatasetFormatError(f"{path}: no usable records: {why}")
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------------- loaders
def load_fever(path: str | Path, *, drop_nei: bool = True) -> datasets.Dataset:
    """FEVER claims as columns ``text``, ``label`` (1 = SUPPORTS, 0 = REFUTES), the paper's binary fact-checking task.

    NOT ENOUGH INFO has no binary label, so it is dropped when ``drop_nei`` (else kept with label -1).
    """

    def parse(rec: dict[str, Any], where: str) -> dict[str, Any] | None:
        claim = _str_field(rec, "claim", where)
        label = rec.get("label")
        if not isinstance(label, str) or label not in FEVER_LABELS:
            state = "missing" if "label" not in rec else _shown(label)
            raise DatasetFormatError(f"{where}: field 'label' is {state}, expected one of {sorted(FEVER_LABELS)}")
        value = FEVER_LABELS[label]
        if value is None:
            return None if drop_nei else {"text": claim, "label": -1}
        return {"text": claim, "label": value}

    return _load(path, parse)


ZSRE_TARGETS = ("answers", "alt")


def load_zsre(path: str | Path = ZSRE_SAMPLE, target: str = "answers") -> datasets.Dataset:
    """zsRE (MEND/EasyEdit format) as ``text, target, rephrase, loc, loc_ans, subject`` (+ ``ground_truth``).

    ``target="answers"`` (ours, the paper's): the target is ``answers[0]``, the question's true answer, which the
    unedited model does not know. ``target="alt"`` (EasyEdit's convention, for tables that stand next to WISE, GRACE
    or AlphaEdit): the target is ``alt`` and ``answers[0]`` the ground truth; records with an empty ``alt`` are skipped,
    as EasyEdit does. The "nq question: " prefix on ``loc`` is removed so the locality input reads like a natural
    question. Without a path, the 40-record sample embedded in the package is loaded (offline default for examples
    and the demo).
    """
    if target not in ZSRE_TARGETS:
        raise ValueError(f"target must be one of {ZSRE_TARGETS}, got {target!r}")

    def parse(rec: dict[str, Any], where: str) -> dict[str, Any] | None:
        answers = rec.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            got = "missing" if "answers" not in rec else _shown(answers)
            raise DatasetFormatError(f"{where}: field 'answers' must be a non-empty list of strings, got {got}")
        if not all(_encodable(a) for a in answers):
            raise DatasetFormatError(f"{where}: field 'answers' holds a lone UTF-16 surrogate, which is not text")
        loc = _str_field(rec, "loc", where)
        if loc.startswith(_NQ_PREFIX):
            loc = loc[len(_NQ_PREFIX) :]
            if not loc.strip():
                raise DatasetFormatError(f"{where}: field 'loc' is only the {_NQ_PREFIX.strip()!r} prefix, no question")
        if target == "alt" and not (isinstance(rec.get("alt"), str) and rec["alt"].strip()):
            return None
        truth = {"target": _str_field(rec, "alt", where), "ground_truth": answers[0]} if target == "alt" else {}
        return {
            "text": _str_field(rec, "src", where),
            "target": answers[0],
            **truth,
            "rephrase": _str_field(rec, "rephrase", where),
            "loc": loc,
            "loc_ans": _str_field(rec, "loc_ans", where),
            "subject": _str_field(rec, "subject", where),
        }

    return _load(path, parse)


def load_counterfact(path: str | Path) -> datasets.Dataset:
    """CounterFact (EasyEdit format) as ``text, target, ground_truth, rephrase, loc, loc_ans, subject``.

    ROME-style prompts hold a ``{}`` slot for the subject; it is filled so ``text`` is always the full prompt.
    """

    def parse(rec: dict[str, Any], where: str) -> dict[str, Any]:
        subject = _str_field(rec, "subject", where)
        prompt = _str_field(rec, "prompt", where)
        return {
            "text": prompt.replace("{}", subject) if "{}" in prompt else prompt,
            "target": _target_field(rec, "target_new", where),
            "ground_truth": _target_field(rec, "ground_truth", where),
            "rephrase": _str_field(rec, "rephrase_prompt", where),
            "loc": _str_field(rec, "locality_prompt", where),
            "loc_ans": _target_field(rec, "locality_ground_truth", where),
            "subject": subject,
        }

    return _load(path, parse)


def load_counterfact_train(data_dir: str | Path | None = None) -> datasets.Dataset | None:
    """``counterfact/counterfact-train.json`` of the data folder (:func:`load_counterfact`), or None without it: the
    split the memory subjects and relation rewordings read, never edited or scored."""
    try:
        return load_counterfact(find_data_file("counterfact/counterfact-train.json", data_dir))
    except FileNotFoundError:
        return None


def load_questions(path: str | Path) -> list[str]:
    """Questions of a locality file (JSON lines or a JSON list of ``{"text": ...}``), for the evaluation suite's
    unrelated part: each must be non-empty text; other fields are ignored."""
    return [row["text"] for row in _load(path, lambda rec, where: {"text": _str_field(rec, "text", where)})]


def load_neighbours(path: str | Path) -> dict[str, list[str]]:
    """A neighbour file: ``{"text": <an edit's question>, "neighbours": [<the same question about others>, ...]}``
    per record, as {edit question: neighbours}. Every neighbour must be non-empty text."""

    def parse(rec: dict[str, Any], where: str) -> dict[str, Any]:
        text = _str_field(rec, "text", where)
        found = rec.get("neighbours")
        if not isinstance(found, list) or not found:
            state = "missing" if "neighbours" not in rec else f"not a non-empty list (got {_shown(found)})"
            raise DatasetFormatError(f"{where}: field 'neighbours' is {state}")
        for i, item in enumerate(found):
            if not isinstance(item, str) or not item.strip() or not _encodable(item):
                raise DatasetFormatError(f"{where}: field 'neighbours' item {i} is not text (got {_shown(item)})")
        return {"text": text, "neighbours": found}

    return {row["text"]: list(row["neighbours"]) for row in _load(path, parse)}


def to_edit_examples(dataset: datasets.Dataset, kind: str) -> list[EditExample]:
    """Turn a loaded dataset into :class:`EditExample` objects, the form the editing API consumes."""
    if kind == "fever":
        return [EditExample(text=r["text"], target=int(r["label"])) for r in dataset]
    if kind in ("zsre", "counterfact"):
        return [
            EditExample(
                text=r["text"],
                target=r["target"],
                rephrases=(r["rephrase"],),
                locality=((r["loc"], r["loc_ans"]),),
                subject=r["subject"],
            )
            for r in dataset
        ]
    raise ValueError(f"unknown dataset kind {kind!r}; expected 'fever', 'zsre' or 'counterfact'")
