"""Do subject-first rewordings of the edit's question, as extra key views, reach subject-first rephrases? (rule 19)

On the subject-first dev set (the first 60 records of ``zsre_mend_train-1k.json`` with the hand-written rephrases of
``bench/subject_first_dev.json``) this builds the first answer token's views key as ``bench/key_views.py`` builds its
``views`` variant (the edit behind the written prefixes and in chat), with and without the four rewordings of
``views.subject_first_texts``, and scores along each: the subject-first rephrase, the shared rephrase, the contrasts
and up to 4 held-out near neighbours. The threshold is the highest memory score or the contrasts' top plus
``contrast_spread`` standard deviations; "full" is past half-way from it to the edit. Nothing is trained. Writes JSON.

    python bench/subject_first_views.py --data-dir ../shared/data --out bench/results/subject_first_views.json
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path

import torch

from key_views import centred_score, first_queries
from transformer_patcher.methods.patcher.views import subject_first_texts, written_prefixes
from transformer_patcher.tuners.patcher.keys import discriminant
from zsre_stream import stream_arguments, stream_trainer, zsre_stream

DEV = Path(__file__).resolve().parent / "subject_first_dev.json"


def main() -> None:
    parser = stream_arguments(__doc__, "n", 60, "bench/results/subject_first_views.json")
    args = parser.parse_args()
    dev = json.loads(DEV.read_text())["rephrases"]
    benchmark, task, trainer = stream_trainer(zsre_stream(min(args.n, len(dev)), args.data_dir, "raw"))
    chat = task.formatted("chat")
    prefixes = written_prefixes(trainer.model, task.tokenizer, trainer.config.key_views)
    cfg = trainer.config
    mean, precision = (t.double() for t in trainer.memory.statistics(cfg.whiten_ridge, cfg.whiten_edit_rows))
    rows = trainer.memory.rows().double()
    measures = ("subject_first_fires", "subject_first_full", "rephrase_fires", "rephrase_full", "contrast_fires")
    tally = {v: {m: [] for m in (*measures, "neighbour_fires")} for v in ("views", "views + subject-first")}
    for i, (example, near) in enumerate(zip(benchmark.examples, benchmark.neighbours(4), strict=True)):
        contrast_texts = trainer._contrast_texts(example)
        if not contrast_texts or not near:
            continue
        target = example.target
        q = first_queries(trainer, task, [example.text], target)[0]
        views = torch.cat(
            [
                first_queries(trainer, task, [f"{p} {example.text}" for p in prefixes], target),
                first_queries(trainer, chat, [example.text], target),
            ]
        )
        reworded = subject_first_texts(example.text, example.subject)
        extra = first_queries(trainer, task, reworded, target) if reworded else views[:0]
        asked = {
            "subject_first": first_queries(trainer, task, [dev[i]], target),
            "rephrase": first_queries(trainer, task, list(example.rephrases[:1]), target),
        }
        contrasts = first_queries(trainer, task, contrast_texts, target)
        held = first_queries(trainer, task, near, target)
        for variant, used in (("views", views), ("views + subject-first", torch.cat([views, extra]))):
            w = discriminant(q, mean, precision, views=used, scatter=cfg.view_scatter).double()
            w = w / (w @ (q - mean))  # the edit scores 1, the memory mean 0
            score = partial(centred_score, mean=mean, w=w)
            c = score(contrasts)
            threshold = max(float((rows @ w).max() - w @ mean), float(c.max()) + cfg.contrast_spread * float(c.std()))
            t = tally[variant]
            for name, x in asked.items():
                s = score(x)
                t[f"{name}_fires"].append(float((s > threshold).float().mean()))
                t[f"{name}_full"].append(float((s > (1 + threshold) / 2).float().mean()))
            t["contrast_fires"].append(float((c > threshold).float().mean()))
            t["neighbour_fires"].append(float((score(held) > threshold).float().mean()))
    records = [
        {"variant": v, "edits": len(t["rephrase_fires"])} | {k: round(statistics.fmean(x), 4) for k, x in t.items()}
        for v, t in tally.items()
    ]
    command = f"python bench/subject_first_views.py --n {args.n} --data-dir {args.data_dir} --out {args.out}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "records": records}, indent=1) + "\n")
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
