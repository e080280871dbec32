"""How often a CounterFact rephrase is one of the rewordings the training split gives its prompt (rule 20).

For each case of ``--data`` (never the training file), the bank built from ``counterfact-train.json`` (without the
case's subject, as a benchmark builds it) words the case's prompt in its ``k`` most frequent rephrase templates; a hit
is a case whose own rephrase (from its last sentence on) is one of them. The share for k = 1..10 and the share of
prompts whose template the bank holds at all.

    python bench/relation_rewordings.py --data-dir ../shared/data --out bench/results/relation_rewordings.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformer_patcher.data.loaders import find_data_file, load_counterfact
from transformer_patcher.data.rewordings import RelationRewordings, last_sentence

COUNTS = (1, 2, 3, 5, 10)


def coverage(train: list[dict], cases: list[dict]) -> dict[str, object]:
    subjects = {r["subject"] for r in cases}
    records = [(r["text"], r["rephrase"], r["subject"]) for r in train]
    banks = {k: RelationRewordings.from_records(records, exclude=subjects, count=k) for k in COUNTS}
    held = sum(bool(banks[COUNTS[-1]](r["text"], r["subject"])) for r in cases)
    hits = {
        k: sum(last_sentence(r["rephrase"]) in bank(r["text"], r["subject"]) for r in cases) / len(cases)
        for k, bank in banks.items()
    }
    return {"cases": len(cases), "templates": len(banks[COUNTS[-1]]), "prompt_template_held": held / len(cases),
            "rephrase_among_top_k": hits}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--data", nargs="+", default=["counterfact/counterfact-edit-1k.json"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    train = list(load_counterfact(find_data_file("counterfact/counterfact-train.json", args.data_dir)))
    results = {name: coverage(train, list(load_counterfact(find_data_file(name, args.data_dir)))) for name in args.data}
    record = {"results": results, "command": "python bench/relation_rewordings.py " + " ".join(
        ["--data-dir", str(args.data_dir), "--data", *args.data, "--out", str(args.out)])}  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
