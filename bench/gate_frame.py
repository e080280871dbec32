"""Whether the subject gate tells subjects apart on a model: its cosines plain, centred, and in the gate frame.

For the first ``--max-examples`` zsRE records (the dev part), the gate block's output at each edit's subject (the
subject read a patch holds) against: the edit's rephrase (it should open), the edit's question asked of 8 other
subjects (``Contrasts``: it should not) and 400 memory questions the frame never read (none should open any patch).
Each is the gate's own measure, the running maximum over a text's positions (its first token left out), compared
plain, centred (the frame's mean subtracted) and in the frame (mean subtracted, each feature divided by its spread),
the frame read as ``build_trainer`` reads it (``methods.patcher.gate_frame``: memory running text and memory questions
in every format). Raw prompts; nothing is edited. ``--subject-views T ...`` also scores, in the frame, a gate that
holds more reads of the subject than the edit's: the subject read in each template ``T`` (``{}`` is the subject;
``"{}"`` alone reads it at the text's start), the gate open where any of a patch's reads is met.

    python bench/gate_frame.py --model smollm2-135m --out bench/results/gate_frame.json
    python bench/gate_frame.py --model gemma3-270m --out bench/results/gate_frame.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from transformer_patcher.core.modes import up_to
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.data.questions import Contrasts
from transformer_patcher.experiments.sme.experiment import ExperimentConfig, load_benchmark
from transformer_patcher.methods.patcher.config import GATE_DEPTH
from transformer_patcher.methods.patcher.gate_frame import frame_prompts, read_gate_frame
from transformer_patcher.tuners.patcher.config import PatcherConfig
from transformer_patcher.tuners.patcher.gate import GateReads, subject_position
from transformer_patcher.tuners.patcher.model import get_patcher_model

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
OTHER_QUESTIONS = slice(2000, 2400)  # memory questions past the 256 the frame reads


def gate_pass(model: Any, gate: GateReads, ids: list[int]) -> None:
    """One text through the model up to the gate block: ``gate`` then holds its outputs."""
    with torch.no_grad(), up_to(gate.block):
        model(input_ids=torch.tensor([ids]))


def rates(values: torch.Tensor) -> dict[str, float]:
    """Share of ``values`` at or above each threshold."""
    return {str(t): round(float((values >= t).float().mean()), 4) for t in THRESHOLDS}


def quantiles(values: torch.Tensor) -> list[float]:
    """The 5th, 50th and 95th percentiles."""
    return [round(float(v), 3) for v in values.float().quantile(torch.tensor([0.05, 0.5, 0.95]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--depth", type=float, default=GATE_DEPTH, help="the gate block as a fraction of the depth")
    parser.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--subject-views", nargs="*", default=[], help="templates of more subject reads per patch")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base, tokenizer = load_model(args.model, "generation")
    model = get_patcher_model(base, PatcherConfig(gate_depth=args.depth)).eval()
    layer = model.base_model.patch_layer()
    gate = layer.gate_reads()
    config = ExperimentConfig(model=args.model, data=args.data, data_kind="zsre", data_dir=args.data_dir, suite="none")
    benchmark = load_benchmark(config).head(args.max_examples)
    task = task_for_model(model, tokenizer, prompt_format=benchmark.prompt_format)
    texts = [f"{text} {target}" for text, target in benchmark.memory]
    frame = read_gate_frame(model, gate, task, frame_prompts(task, texts, benchmark.questions), progress=False)
    frames = {"plain": None, "centred": torch.stack([frame[0], torch.ones_like(frame[1])]), "frame": frame}
    if args.subject_views:
        frames["frame+views"] = frame
    views = len(args.subject_views) + 1
    contrasts = Contrasts(tuple(benchmark.memory_subjects))
    others = [task.prompt_tokens(q) for q in benchmark.questions[OTHER_QUESTIONS]]
    result: dict[str, Any] = {"model": args.model, "block": layer.patch_config["default"].gate_layer}
    result["blocks"] = model.get_base_model().config.num_hidden_layers
    for name, f in frames.items():
        subjects, own, contrast = [], [], []
        for example in benchmark.examples:
            ids = task.prompt_tokens(example.text)
            at = subject_position(tokenizer, ids, example.subject or "")
            if at in (None, 0):
                continue
            gate_pass(model, gate, ids)
            read = [gate.reads(f)[0, at]]
            for template in args.subject_views if name == "frame+views" else []:
                view = task.prompt_tokens(template.format(example.subject))
                where = subject_position(tokenizer, view, example.subject)
                if where is not None:  # the tokens decode to another spelling: no read from this template
                    gate_pass(model, gate, view)
                    read.append(gate.reads(f)[0, where])
            read = torch.stack(read + read[:1] * (views - len(read)))  # every subject holds ``views`` rows
            subjects.append(read)
            for rephrase in example.rephrases:
                gate_pass(model, gate, task.prompt_tokens(rephrase))
                own.append(gate.running(read, "bench", f)[0, -1].max())
            for question in contrasts(example):
                gate_pass(model, gate, task.prompt_tokens(question))
                contrast.append(gate.running(read, "bench", f)[0, -1].max())
        rows = torch.cat(subjects)
        other = []
        for ids in others:
            gate_pass(model, gate, ids)
            other.append(gate.running(rows, "bench", f)[0, -1].view(-1, views).max(1).values)  # (subjects,)
        other_t = torch.stack(other)
        own_t, contrast_t, any_t = torch.stack(own), torch.stack(contrast), other_t.max(1).values
        result[name] = {
            "rephrase": {"cosine_q05_q50_q95": quantiles(own_t), "open": rates(own_t)},
            "contrast": {"cosine_q05_q50_q95": quantiles(contrast_t), "open": rates(contrast_t)},
            "other_question_any_patch": {"cosine_q05_q50_q95": quantiles(any_t), "open": rates(any_t)},
            "other_question_per_patch": {"open": rates(other_t.flatten())},
        }
        print(name, json.dumps(result[name]))
    result |= {"subjects": len(subjects), "subject_views": args.subject_views}
    result["command"] = "python " + shlex.join(sys.argv)
    saved = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*[r for r in saved if r["model"] != args.model], result], indent=1) + "\n")


if __name__ == "__main__":
    main()
