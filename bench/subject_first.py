"""The subject-first dev set: the first zsRE records with their rephrase put subject first (``subject_first_dev.json``).

Freer rephrases often open with the subject ("Bratislava lies on which river?"). ``../shared``'s zsRE rephrases
seldom do (17 of 1,000), so a dev stream of them says little about such questions. This writes the first records of
``zsre_mend_train-1k.json`` with their rephrase replaced by a hand-written subject-first one, a zsRE file any ``sme
run`` or ``bench/rephrase_reach.py`` reads (the records stay in ``../shared``; only the rephrases ship here).

    python bench/subject_first.py --data-dir ../shared/data --out /tmp/w/subject-first-dev.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads((HERE / "subject_first_dev.json").read_text())
    records = json.loads((args.data_dir / spec["source"]).read_text())[: len(spec["rephrases"])]
    for record, rephrase in zip(records, spec["rephrases"], strict=True):
        if not rephrase.startswith(record["subject"]):
            raise ValueError(f"{rephrase!r} does not open with its record's subject {record['subject']!r}")
        record["rephrase"] = rephrase
    args.out.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
