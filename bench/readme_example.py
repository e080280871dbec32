"""The README example's check: ``What is the capital of X?`` for ten countries, greedy, chat and raw, before and after
a patch set (the README's Canberra fix), each changed answer starred.

    transformer-patcher edit --model smollm2-135m --patches runs/readme --text "What is the capital of Australia?" \\
        --target Canberra --subject Australia --prompt-format chat --data-dir ../shared/data
    python bench/readme_example.py --patches runs/readme
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel

from transformer_patcher.editing.decoding import greedy_continuations
from transformer_patcher.editing.prompts import CHAT, RAW
from transformer_patcher.editing.tasks import CausalLMTask, task_for_model
from transformer_patcher.pretrained import load_model

COUNTRIES = ("Australia", "France", "New Zealand", "Austria", "Canada", "Germany", "Japan", "Italy", "Spain", "Brazil")


def answers(model: torch.nn.Module, task: CausalLMTask, questions: list[str]) -> list[str]:
    prompts = [task.prompt_tokens(q) for q in questions]
    outputs = greedy_continuations(model, prompts, task.prompter.stop_ids, 16, task.pad_id)
    return [task.tokenizer.decode(o) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patches", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, "generation")
    tasks = {fmt: task_for_model(model, tokenizer, prompt_format=fmt) for fmt in (CHAT, RAW)}
    questions = [f"What is the capital of {country}?" for country in COUNTRIES]
    with torch.no_grad():
        before = {fmt: answers(model, task, questions) for fmt, task in tasks.items()}
        patched = PeftModel.from_pretrained(model, args.patches).eval()
        after = {fmt: answers(patched, task, questions) for fmt, task in tasks.items()}
    for fmt in tasks:
        changed = sum(a != b for a, b in zip(before[fmt], after[fmt], strict=True))
        print(f"## {fmt}: {changed} of {len(questions)} answers changed")
        for question, old, new in zip(questions, before[fmt], after[fmt], strict=True):
            print(f"{'*' if old != new else ' '} {question} {old!r} -> {new!r}")


if __name__ == "__main__":
    main()
