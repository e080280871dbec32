"""Which well-known facts SmolLM2-135M-Instruct gets wrong when asked in chat: where the README example comes from.

``bench/chat_questions.json`` holds 156 questions (capitals, currencies, authors, painters, inventors, chemical
symbols, languages…) with their accepted true answers and a verdict read by hand from the model's answer: ``correct``,
``mistake`` (a confident wrong entity) or ``non-answer`` (no entity named). This script asks them again (chat
template, greedy, 24 new tokens), checks the first clause for a true answer, and flags any answer whose check
disagrees with the recorded verdict, so the hand labels stay honest.

    python bench/chat_mistakes.py --out bench/results/chat_mistakes.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from transformer_patcher.core.decoding import greedy_continuations
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import task_for_model

QUESTIONS = Path(__file__).with_name("chat_questions.json")
_CLAUSE_END = re.compile(r"(?<!\b[A-Z])\.(?:\s|$)|[;\n]")  # a sentence end that is not an initial ("D.C."), ; or \n


def first_clause(answer: str) -> str:
    end = _CLAUSE_END.search(answer)
    return answer[: end.start()] if end else answer


def names_a_true_answer(answer: str, accepted: list[str]) -> bool:
    clause = first_clause(answer)
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", clause, re.I) for a in accepted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=None, help="also write every answer and verdict as JSON here")
    args = parser.parse_args()
    rows = json.loads(QUESTIONS.read_text(encoding="utf-8"))
    model, tokenizer = load_model(args.model, "generation")
    task = task_for_model(model, tokenizer, prompt_format="chat")
    prompts = [task.prompt_tokens(row["question"]) for row in rows]
    outputs = greedy_continuations(model, prompts, task.prompter.stop_ids, 24, task.pad_id, progress=True)
    disagreements = []
    for row, tokens in zip(rows, outputs, strict=True):
        row["answer"] = task.decode(tokens).strip()
        row["names_a_true_answer"] = names_a_true_answer(row["answer"], row["answers"])
        if row["names_a_true_answer"] != (row["verdict"] == "correct"):
            disagreements.append(row)
    counts = Counter(row["verdict"] for row in rows)
    print(f"{len(rows)} questions: {dict(counts)}; {len(disagreements)} answers disagree with their recorded verdict")
    for row in rows:
        if row["verdict"] == "mistake":
            print(f"- {row['question']} -> {row['answer']!r} (true: {row['answers'][0]})")
    for row in disagreements:
        print(f"! {row['question']} -> {row['answer']!r}: recorded {row['verdict']}")
    if args.out is not None:
        result = {"model": args.model, "counts": dict(counts), "disagreements": len(disagreements), "questions": rows}
        result["command"] = f"python bench/chat_mistakes.py --out {args.out}"
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
