"""Why rephrases miss the patch, and which key reaches them: a first-answer-token study on SmolLM2-135M + zsRE.

For each dev record (the issue-15 dev stream: the first ``--n`` records of ``zsre_mend_train-1k.json``) this reads,
at the patched layer's FFN query where the answer starts: the edit ``q``, its rephrase, its 8 contrasts (the
question asked of other subjects, what the trainer puts the threshold above) and up to 4 held-out near neighbours
(the evaluation suite's). Each key variant gives a direction ``w`` scored so the edit is 1 and the memory mean 0; the
threshold is what the trainer uses for the first answer token: the highest memory score, raised to the highest
contrast plus ``contrast_spread`` standard deviations. A ReLU6 patch then fires on x when its score passes the
threshold, and passes the whole fix past half-way to the edit.

Key variants:

- ``point``: the shipped key, Fisher's discriminant between ``q`` and the memory, ``w ∝ P(q − μ)``;
- ``views``: two-class LDA between the edit's *views* and the memory, ``w ∝ (Σ + α S_v)⁻¹ (v̄ − μ)``: the views are
  the edit's question behind K short prefixes the model wrote itself (ROME's context templates) and in the other
  prompt format (chat for raw); ``S_v`` is their scatter, so directions in which the wording around the question
  moves the query count against the key;
- ``views+contrasts``: the contrasts' scatter joins the within-class term as well.

    python bench/key_views.py --n 60 --out bench/results/key_views.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from transformer_patcher.methods.patcher.memory import answer_start_queries
from transformer_patcher.methods.patcher.views import written_prefixes
from transformer_patcher.tuners.patcher.keys import discriminant
from zsre_stream import DATA_DIR, stream_trainer, zsre_stream


def first_queries(trainer, task, texts: list[str], target: str) -> torch.Tensor:
    """FFN queries at the patched layer where each text's answer starts, shape (n, d), float64."""
    return answer_start_queries(trainer.model, trainer.layer, task, texts, target, trainer.adapter).double()


def centred_score(x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x - mean) @ w


def lda(views: torch.Tensor, contrasts: torch.Tensor, mean, covariance, alpha: float) -> torch.Tensor:
    """``views+contrasts``: (Σ + α(S_v + S_c))⁻¹ (v̄ − μ), by a direct solve."""
    scatter = sum((x - x.mean(0)).T @ (x - x.mean(0)) / len(x) for x in (views, contrasts))
    return torch.linalg.solve(covariance + alpha * scatter, views.mean(0) - mean)


def stream_leaks(gates: list[tuple[torch.Tensor, float]], held: list[torch.Tensor], mean: torch.Tensor) -> dict:
    """What a stream of all these edits does to the neighbours: the share above some edit's threshold, and past
    half-way from some edit's threshold to that edit (where a ReLU6 patch passes the whole fix)."""
    keys = torch.stack([w for w, _ in gates], dim=1)  # d × edits
    thresholds = torch.tensor([t for _, t in gates], dtype=keys.dtype)
    scores = (torch.cat(held) - mean) @ keys  # neighbours × edits
    return {
        "stream_neighbour_fires": float((scores > thresholds).any(1).float().mean()),
        "stream_neighbour_full": float((scores > (1 + thresholds) / 2).any(1).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--views", type=int, default=16, help="prefixes (the other format is one more view)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--format", default="raw")
    parser.add_argument("--layer", type=int, default=-1, help="the block whose FFN is patched (-1: the last)")
    parser.add_argument("--no-format-view", action="store_true", help="views are the prefixes alone")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench/results/key_views.json"))
    args = parser.parse_args()
    config = replace(zsre_stream(args.n, args.data_dir, args.format), layer_index=args.layer)
    benchmark, task, trainer = stream_trainer(config)
    other = task.formatted("chat" if args.format == "raw" else "raw")
    texts = written_prefixes(trainer.model, task.tokenizer, args.views)
    cfg = trainer.config
    mean, precision = (t.double() for t in trainer.memory.statistics(cfg.whiten_ridge, cfg.whiten_edit_rows))
    covariance = torch.linalg.inv(precision)
    rows = trainer.memory.rows().double()
    neighbours = benchmark.neighbours(4)
    spread = trainer.config.contrast_spread
    variants = ["point"] + [f"views a={a:g}" for a in args.alphas] + [f"views+contrasts a={a:g}" for a in args.alphas]
    measures = ("rephrase_fires", "rephrase_full", "neighbour_fires", "contrast_fires")
    tally = {v: {k: [] for k in measures} for v in variants}
    gates: dict[str, list[tuple[torch.Tensor, float]]] = {v: [] for v in variants}  # per edit: key, threshold
    held_out: list[torch.Tensor] = []  # per edit: its neighbours' queries
    for example, near in zip(benchmark.examples, neighbours, strict=True):
        target = example.target
        q = first_queries(trainer, task, [example.text], target)[0]
        views = torch.cat(
            [
                q[None],
                first_queries(trainer, task, [f"{p} {example.text}" for p in texts], target),
                *([] if args.no_format_view else [first_queries(trainer, other, [example.text], target)]),
            ]
        )
        rephrase = first_queries(trainer, task, list(example.rephrases[:1]), target)
        contrast_texts = trainer._contrast_texts(example)
        if not contrast_texts or not near:
            continue
        contrasts = first_queries(trainer, task, contrast_texts, target)
        held = first_queries(trainer, task, near, target)
        held_out.append(held)
        for v in variants:
            if v == "point":
                w = discriminant(q, mean, precision)
            elif v.startswith("views+contrasts"):
                w = lda(views, contrasts, mean, covariance, float(v.split("a=")[1]))
            else:
                w = discriminant(q, mean, precision, views=views[1:], scatter=float(v.split("a=")[1]))
            w = w.double() / (w.double() @ (q - mean))  # the edit scores 1, the memory mean 0
            score = partial(centred_score, mean=mean, w=w)
            top_memory = float((rows @ w).max() - w @ mean)
            c = score(contrasts)
            threshold = max(top_memory, float(c.max()) + spread * float(c.std()))
            r = score(rephrase)
            t = tally[v]
            t["rephrase_fires"].append(float((r > threshold).float().mean()))
            t["rephrase_full"].append(float((r > (1 + threshold) / 2).float().mean()))
            t["neighbour_fires"].append(float((score(held) > threshold).float().mean()))
            t["contrast_fires"].append(float((c > threshold).float().mean()))
            gates[v].append((w, threshold))
    records = [
        {"variant": v, "edits": len(t["rephrase_fires"])}
        | {k: statistics.fmean(x) for k, x in t.items()}
        | stream_leaks(gates[v], held_out, mean)
        for v, t in tally.items()
    ]
    command = f"python bench/key_views.py --n {args.n} --views {args.views} --format {args.format}"
    command += f" --layer {args.layer}" if args.layer != -1 else ""
    command += " --no-format-view" if args.no_format_view else ""
    command += f" --alphas {' '.join(map(str, args.alphas))} --out {args.out}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "prefixes": texts, "records": records}, indent=1) + "\n")
    for row in records:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
