"""What a user's own rewordings file gives (``--rewordings``, rule 20 beyond CounterFact): the zsRE edits whose
question is worded as in the file, with and without it.

The file is ``bench/question_rewordings.jsonl``, made here from ``bench/question_paraphrases.json`` (30 groups of
three wordings of one question, written for an earlier study): every ordered pair of wordings in a group, about a
placeholder subject, so a question worded one way has the group's two other wordings as its rewordings. The edits are
the 23 records of ``zsre_mend_train-1k.json`` whose question is one of those wordings, edited first (in file order) as
one raw stream; the rest of the file only follows them, so the benchmark leaves out the same subjects as the
1,000-record stream and its question memory is the same. Nothing is tuned here. Each setting is scored twice:

- ``zsre``: the records' own rephrases (only 3 of the 23 are among the file's wordings): does the file help beyond
  the wordings it names? With the small suite, so a user sees what else the extra views reach;
- ``in_file``: the same edits with each rephrase replaced by the group's next wording about the same subject: how
  much of what the user wrote down is now answered.

    python bench/user_rewordings.py --data-dir ../shared/data --runs runs/user-rewordings \
        --out bench/results/user_rewordings.json
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from transformer_patcher.cli import main as cli
from transformer_patcher.data.loaders import find_data_file
from transformer_patcher.data.neighbours import question_template

HERE = Path(__file__).parent
GROUPS = HERE / "question_paraphrases.json"
REWORDINGS = HERE / "question_rewordings.jsonl"
PLACEHOLDER = "Ada Lovelace"  # any name: the bank keeps the wordings around it
SUMMARY = ("edits", "SR", "GR", "ER", "locality", "seconds_per_edit")


def rewording_records(groups: list[list[str]]) -> list[dict[str, str]]:
    """Every ordered pair of wordings in a group, about the placeholder subject."""
    return [
        {"text": a.format(PLACEHOLDER), "rephrase": b.format(PLACEHOLDER), "subject": PLACEHOLDER}
        for group in groups
        for a in group
        for b in group
        if a != b
    ]


def matched_first(rows: list[dict[str, Any]], groups: list[list[str]], in_file: bool) -> tuple[list[dict], int]:
    """The records whose question is a group's wording, first (``in_file``: each rephrase the group's next wording),
    then the rest; and how many matched."""
    where = {w: (g, i) for g, group in enumerate(groups) for i, w in enumerate(group)}
    matched, rest = [], []
    for row in rows:
        found = where.get(question_template(row["src"], row["subject"]) or "")
        if found is None:
            rest.append(row)
            continue
        g, i = found
        rephrase = groups[g][(i + 1) % len(groups[g])].format(row["subject"])
        matched.append({**row, "rephrase": rephrase} if in_file else row)
    return matched + rest, len(matched)


def run(args: list[str]) -> dict[str, Any]:
    out = Path(args[args.index("--out") + 1])
    if not (out / "results.json").is_file():
        assert cli(args) == 0, args
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    suite = {k: v for k, v in summary.items() if k.endswith(".exact") or k.endswith(".token") or "perplexity" in k}
    return {"command": shlex.join(["transformer-patcher", *args]), **{k: summary.get(k) for k in SUMMARY}, **suite}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    groups = json.loads(GROUPS.read_text(encoding="utf-8"))
    REWORDINGS.write_text("".join(json.dumps(r) + "\n" for r in rewording_records(groups)), encoding="utf-8")
    rows = json.loads(find_data_file("zsre/zsre_mend_train-1k.json", args.data_dir).read_text(encoding="utf-8"))
    args.runs.mkdir(parents=True, exist_ok=True)
    flags = ["--data-dir", str(args.data_dir), "--runs", str(args.runs), "--out", str(args.out)]
    record: dict[str, Any] = {"command": shlex.join(["python", "bench/user_rewordings.py", *flags])}
    for scored in ("zsre", "in_file"):
        data, matched = matched_first(rows, groups, in_file=scored == "in_file")
        path = args.runs / f"{scored}.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        base = ["sme", "run", "--model", "smollm2-135m", "--data", str(path), "--data-kind", "zsre"]
        base += ["--data-dir", str(args.data_dir), "--max-examples", str(matched)]
        base += ["--suite", "small" if scored == "zsre" else "none"]
        record[scored] = {
            "records": matched,
            "without": run([*base, "--out", str(args.runs / f"{scored}-without")]),
            "with": run([*base, "--rewordings", str(REWORDINGS), "--out", str(args.runs / f"{scored}-with")]),
        }
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
