"""Does the last FFN's own output tell a rephrase from other questions about its subject better than its input?

A T-Patcher key reads the patched FFN's input (its query) where the answer starts, and along it a zsRE rephrase and
another question about the same subject move about as far from the edit (``bench/same_subject.py``). The FFN's
output there is what the unedited model is about to add toward its answer, so a read of it might follow what is
asked rather than how. A patch could read it too: the patch layer wraps the FFN's output projection. This study reads
both, on the unedited model, for the first ``--n`` records of the issue-15 dev stream (zsRE records 0-99), at the
answer start of the edit, its rephrases, the package's 60 question templates asked of its subject (``subject``) and
the suite's 20 held-out subject questions (``probe``). Each read is centred on its mean over 3,000 memory rows; per
edit, ``auc`` is the share of (rephrase, other question) pairs in which the rephrase has the higher cosine with the
edit (1: every rephrase nearer than every other question; 0.5: no better than chance).

    python bench/output_read.py --n 60 --out bench/results/output_read.json
"""

from __future__ import annotations

import json
from statistics import median

import torch

from same_subject import PROBES
from transformer_patcher.data.neighbours import guess_subject
from transformer_patcher.data.questions import question_templates
from transformer_patcher.methods.patcher.memory import answer_start_queries
from zsre_stream import stream_arguments, stream_trainer, zsre_stream

MEMORY_SAMPLE = 3_000
PARTS = ("subject", "probe")


def centred_cosines(rows: torch.Tensor, edit: torch.Tensor, mean: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(rows - mean, (edit - mean)[None], dim=-1).tolist()


def auc(records: list[dict], read: str, other: str) -> float:
    """Share of same-edit (rephrase, ``other``) pairs in which the rephrase is nearer to the edit along ``read``."""
    wins = pairs = 0
    for record in records:
        for a in record["rephrase"][read]:
            wins += sum(a > b for b in record[other][read])
            pairs += len(record[other][read])
    return round(wins / pairs, 3)


def main() -> None:
    args = stream_arguments(__doc__, "n", 60, "bench/results/output_read.json").parse_args()
    benchmark, task, trainer = stream_trainer(zsre_stream(args.n, args.data_dir))
    model, layer, adapter = trainer.model, trainer.layer, trainer.adapter
    ffn = next(module for _, module in model.named_modules() if getattr(module, "down_proj", None) is layer)
    rows = trainer.memory.rows().float()
    memory = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:MEMORY_SAMPLE]]
    with torch.no_grad():
        means = {"query": memory.mean(0), "output": ffn(memory).mean(0)}
    templates = question_templates()
    records = []
    for example in benchmark.examples:
        name = example.subject or guess_subject(example.text)
        if not name:
            continue
        parts = {
            "edit": [example.text],
            "rephrase": list(example.rephrases),
            "subject": [t.format(name) for t in templates],
            "probe": [t.format(name) for t in PROBES],
        }
        with torch.no_grad():
            query = {k: answer_start_queries(model, layer, task, v, example.target, adapter) for k, v in parts.items()}
            reads = {k: {"query": q.float(), "output": ffn(q.float())} for k, q in query.items()}
        record = {"text": example.text, "subject": name}
        for part in ("rephrase", "subject", "probe"):
            record[part] = {
                read: centred_cosines(reads[part][read], reads["edit"][read][0], means[read]) for read in means
            }
        records.append(record)
    summary = {
        read: {
            "rephrase_median": round(median(x for r in records for x in r["rephrase"][read]), 3),
            **{f"{other}_median": round(median(x for r in records for x in r[other][read]), 3) for other in PARTS},
            **{f"auc_vs_{other}": auc(records, read, other) for other in PARTS},
        }
        for read in means
    }
    print(json.dumps(summary, indent=1))
    command = f"python bench/output_read.py --n {args.n} --out {args.out}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "summary": summary, "records": records}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
