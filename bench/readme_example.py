"""The README example, checked: real mistakes SmolLM2-135M-Instruct makes in chat, fixed with ``Patcher`` exactly as
the README calls it, and what else changed: the fixes' rephrases, and fifteen other questions of the same kind (the
three given to ``fix`` as ``locality`` and twelve held out), asked in chat and raw, before and after (each changed
answer starred).

    python bench/readme_example.py --out bench/results/readme_example.json

The mistakes were found by asking 156 well-known factual questions in chat format (``bench/chat_mistakes.py``: 37
wrong answers naming another entity); these two are the cleanest: a famous fact, a confident wrong answer, and
neighbours the model gets right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformer_patcher import Patcher
from transformer_patcher.core.prompts import CHAT, RAW

FIXES = [  # the README's call first
    {
        "prompt": "What is the capital of Turkey?",
        "target": "Ankara",
        "subject": "Turkey",
        "rephrases": ["Which city is the capital of Turkey?", "What is the capital city of Turkey?"],
        "locality": ["What is the capital of Greece?", "Who invented the telephone?"],
    },
    {
        "prompt": "Who invented the printing press?",
        "target": "Johannes Gutenberg",
        "subject": "the printing press",
        "rephrases": ["Who was the inventor of the printing press?", "Who created the printing press?"],
        "locality": ["Who invented the telephone?"],
    },
]
COUNTRIES = ("Greece", "Bulgaria", "Syria", "Iraq", "Iran", "France", "Germany", "Japan", "Italy", "Australia")
INVENTIONS = ("the telephone", "the telegraph", "the polio vaccine", "the diesel engine", "the light bulb")
NEIGHBOURS = [f"What is the capital of {c}?" for c in COUNTRIES] + [f"Who invented {i}?" for i in INVENTIONS]
HELD_OUT = [q for q in NEIGHBOURS if all(q not in fix["locality"] for fix in FIXES)]  # never given to fix()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EditConfig override")
    args = parser.parse_args()
    options = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.set)}
    formats = (CHAT, RAW)
    with Patcher.from_pretrained(args.model, edit_options=options) as fixer:  # no patch folder: nothing is saved
        questions = [fix["prompt"] for fix in FIXES] + NEIGHBOURS
        before = {fmt: fixer.generate(questions, max_new_tokens=24, prompt_format=fmt) for fmt in formats}
        reports = [
            fixer.fix(f["prompt"], f["target"], subject=f["subject"], rephrases=f["rephrases"], locality=f["locality"])
            for f in FIXES
        ]
        after = {fmt: fixer.generate(questions, max_new_tokens=24, prompt_format=fmt) for fmt in formats}
    for report in reports:
        kept = sum(report.locality.values())
        print(
            f"{report.prompt!r} -> {report.answer!r}: fixed {report.success}, {report.neurons} neuron(s), "
            f"{report.seconds:.1f} s; rephrases {report.rephrases}; locality kept {kept}/{len(report.locality)}"
        )
    for fmt in formats:
        changed = sum(a != b for q, a, b in zip(questions, before[fmt], after[fmt], strict=True) if q in HELD_OUT)
        print(f"\n## {fmt}: {changed} of {len(HELD_OUT)} held-out answers changed")
        for question, old, new in zip(questions, before[fmt], after[fmt], strict=True):
            print(f"{'*' if old != new else ' '} {question} {old!r} -> {new!r}")
    if args.out is not None:
        result = {
            "model": args.model,
            "reports": [r.to_dict() for r in reports],
            "answers": {fmt: {"before": before[fmt], "after": after[fmt]} for fmt in formats},
            "questions": questions,
            "held_out": HELD_OUT,
            "edit_options": options,
            "command": " ".join(
                ["python bench/readme_example.py", *(f"--set {o}" for o in args.set), "--out", str(args.out)]
            ),
        }
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
