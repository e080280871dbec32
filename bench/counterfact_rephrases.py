"""How high a bar exact greedy paraphrase accuracy is on CounterFact, read on the unedited model.

The issue-15 CounterFact goal counts a paraphrase as fixed when the new object is the greedy continuation of the
case's ``rephrase_prompt``. This reads, before any edit, how often the *true* object already is: on the prompt and on
its rephrase, and on the rephrase given that the prompt has it. It also says whether the rephrase prefers the true
object to the new one (mean token log-probability) as often as the prompt does: if so, the model holds the fact
behind both wordings, and only the greedy threshold is the harder part.

    python bench/counterfact_rephrases.py --data counterfact/counterfact-edit-1k.json \\
        --out bench/results/counterfact_rephrases.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.data.loaders import load_counterfact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="counterfact/counterfact-edit-1k.json", help="relative to --data-dir")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=None, help="the first N cases (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/counterfact_rephrases.json"))
    args = parser.parse_args()
    cases = load_counterfact(args.data_dir / args.data)
    if args.n is not None:
        cases = cases.select(range(min(args.n, len(cases))))
    model, tokenizer = load_model(args.model, "generation")
    task = task_for_model(model, tokenizer, prompt_format="raw")

    def scored(column: str, answer: str) -> list:
        pairs = [(case[column], case[answer]) for case in cases]
        return score_pairs(model, task, pairs, progress=f"{column} → {answer}")

    prompt_true, rephrase_true = scored("text", "ground_truth"), scored("rephrase", "ground_truth")
    prompt_new, rephrase_new = scored("text", "target"), scored("rephrase", "target")
    n = len(cases)
    prompt_right = [o.correct for o in prompt_true]
    both = sum(p and r.correct for p, r in zip(prompt_right, rephrase_true, strict=True))

    def prefers_true(true: list, new: list) -> float:
        return sum(t.log_prob > w.log_prob for t, w in zip(true, new, strict=True)) / n

    record = {
        "model": args.model,
        "data": args.data,
        "cases": n,
        "prompt_true_greedy": sum(prompt_right) / n,
        "rephrase_true_greedy": sum(o.correct for o in rephrase_true) / n,
        "rephrase_true_greedy_given_prompt": both / max(1, sum(prompt_right)),
        "prompt_prefers_true": prefers_true(prompt_true, prompt_new),
        "rephrase_prefers_true": prefers_true(rephrase_true, rephrase_new),
        "median_true_log_prob": {
            "prompt": statistics.median(o.log_prob for o in prompt_true),
            "rephrase": statistics.median(o.log_prob for o in rephrase_true),
        },
        "command": shlex.join(["python", "bench/counterfact_rephrases.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
