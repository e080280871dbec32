"""Whether a subject gate's cosine can tell subjects apart on a model: the gate block's output at each question's
subject, against every position of the other questions.

For each model and gate block: the running maximum cosine (the gate's measure) between one question's subject read
and the other questions' positions (their first token, the attention sink, left out), as the gate reads it, and the
same after subtracting the block's mean output over these questions (a centred gate). A 0.8 gate needs unrelated
pairs well below 0.8.

    python bench/gate_cosines.py --model smollm2-135m --depth 0.15 --out bench/results/gate_cosines.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from torch.nn.functional import normalize

from transformer_patcher.core.pretrained import load_model
from transformer_patcher.tuners.patcher.gate import subject_position

QUESTIONS = [  # (question, its subject): general-knowledge questions and zsRE-style ones
    ("What is the capital of Turkey?", "Turkey"),
    ("Who invented the telephone?", "the telephone"),
    ("Which series is The Romulan Way?", "The Romulan Way"),
    ("What is the conservation status of Steller sea lion?", "Steller sea lion"),
    ("Who designed the USRA Heavy Pacific?", "USRA Heavy Pacific"),
    ("The Eiffel Tower is located in", "The Eiffel Tower"),
    ("Which voice does Benedikt Schack have?", "Benedikt Schack"),
    ("What year did Maybach end?", "Maybach"),
]


def unrelated_maxima(reads: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[float]:
    """Each read's highest cosine over the positions of every other question."""
    return [
        float((normalize(outputs[j], dim=-1) @ normalize(r, dim=0)).max())
        for i, r in enumerate(reads)
        for j in range(len(outputs))
        if j != i
    ]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": round(ordered[0], 3), "median": round(ordered[len(ordered) // 2], 3), "max": round(ordered[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--depth", type=float, default=0.15, help="the gate block as a fraction of the depth")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, "generation")
    blocks = model.config.num_hidden_layers
    block = round(args.depth * (blocks - 1))
    outputs, reads = [], []
    for text, subject in QUESTIONS:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[block + 1][0]
        at = subject_position(tokenizer, ids, subject)
        outputs.append(hidden[1:].float())  # the first token (the attention sink) is left out, as by the gate
        reads.append(hidden[at].float())
    mean = torch.cat(outputs).mean(0)
    plain = unrelated_maxima(reads, outputs)
    centred = unrelated_maxima([r - mean for r in reads], [o - mean for o in outputs])
    result = {
        "model": args.model,
        "block": block,
        "blocks": blocks,
        "unrelated_cosine": summary(plain),
        "unrelated_cosine_centred": summary(centred),
        "command": "python " + shlex.join(sys.argv),
    }
    print(json.dumps(result))
    saved = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*[r for r in saved if r["model"] != args.model], result], indent=1) + "\n")


if __name__ == "__main__":
    main()
