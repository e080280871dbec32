"""Behind the subject gate, what bounds a key: the memory's top row, or other questions about the same subject?

A gated patch can only fire where its subject has been read, so of everything the memory holds, only text that names
the subject ever meets it. Yet its threshold sits over the memory's highest row, almost all of which is about other
subjects. This study reads, on the unedited model for the first ``--n`` records of the issue-15 dev stream (zsRE
records 0-99), along the first answer token's key as the trainer builds it (views, gate, frame: today's default):

- ``memory``: the memory's highest score (today's threshold for a gated patch, which skips other-subject contrasts);
- ``rephrase``: the edit's rephrases (what GR counts);
- ``subject``: the package's 60 question templates asked of the edit's own subject (what a trainer could put the
  threshold over: text that opens the gate and is not the edit);
- ``probe``: the suite's 20 held-out subject questions (``data/samples/subject_questions.json``) asked of the edit's
  subject (what a user who asks something else about the subject sees). A probe may ask the edit's own relation in
  other words.

Two keys: ``views`` (today's: LDA between the edit's views and the memory) and ``relation`` (LDA between the views and
the ``subject`` rows that score under 0.9 along ``views``, over the memory's covariance plus both scatters): behind
the gate a key need only tell this subject's relations apart.

``--paraphrase-scatter α ...`` adds one key per α: the views key over the memory's covariance plus ``α S_p``, where
``S_p`` is the scatter of the differences between two wordings of one question asked of the same subject
(``--paraphrase-templates``, e.g. ``bench/question_paraphrases.json``: 30 groups of three wordings written for this
study, filled with the first ``--paraphrase-subjects`` CounterFact-train memory subjects). If rewording moved a
query along directions apart from those that change what is asked, that key would keep rephrases near the edit and
leave the subject's other questions where they are. ``summary`` gives, per key, the share of rephrases and of the
suite's subject questions above the threshold (the memory's top row) and past half-way from it to the edit.

Scores are ``t = w·(x − μ)``: the edit 1, the memory mean 0. A ReLU6 patch fires above its threshold and passes the
whole fix past half-way from the threshold to the edit. Each row also says whether the text opens the edit's gate.

    python bench/same_subject.py --n 60 --out bench/results/same_subject.json
    python bench/same_subject.py --n 60 --paraphrase-scatter 1 4 16 64 \
        --paraphrase-templates bench/question_paraphrases.json --out bench/results/same_subject_paraphrases.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from transformer_patcher.data.neighbours import guess_subject
from transformer_patcher.data.questions import memory_subjects, question_templates
from transformer_patcher.data.suite_data import SUBJECT_QUESTIONS
from transformer_patcher.methods.patcher.memory import answer_start_queries
from transformer_patcher.tuners.patcher.keys import discriminant
from zsre_stream import stream_arguments, stream_trainer, zsre_stream

PROBES = tuple(json.loads(SUBJECT_QUESTIONS.read_text(encoding="utf-8")))


def paraphrase_scatter(
    model: Any, layer: Any, task: Any, adapter: Any, groups: list[list[str]], subjects: list[str]
) -> torch.Tensor:
    """``S_p = DᵀD / n`` over the differences ``D`` of the answer-start queries of every two wordings of one question
    (a group of templates) asked of the same subject: the directions in which rewording a question moves its query.
    The answer ("it") is a placeholder: the query where the answer starts reads only the question before it."""
    differences = []
    for subject in subjects:
        for group in groups:
            rows = answer_start_queries(model, layer, task, [t.format(subject) for t in group], "it", adapter).double()
            differences += [rows[i] - rows[j] for i in range(len(rows)) for j in range(i)]
    d = torch.stack(differences)
    return d.T @ d / len(d)


def summary(records: list[dict], key: str) -> dict[str, float]:
    """Share of rephrases and probes above the key's threshold (the memory's top row) and past half-way to the edit."""
    counts: dict[str, list[float]] = {}
    for record in records:
        scores = record["keys"][key]
        top = scores["memory"]
        for part in ("rephrase", "probe"):
            for x in scores[part]:
                counts.setdefault(f"{part}_above", []).append(float(x > top))
                counts.setdefault(f"{part}_past_half", []).append(float(x > (top + 1) / 2))
    return {k: round(sum(v) / len(v), 3) for k, v in counts.items()}


def main() -> None:
    parser = stream_arguments(__doc__, "n", 60, "bench/results/same_subject.json")
    parser.add_argument("--paraphrase-scatter", type=float, nargs="*", default=[], help="weights α of S_p (keys)")
    parser.add_argument(
        "--paraphrase-templates",
        type=Path,
        default=Path(__file__).with_name("question_paraphrases.json"),
        help="JSON list of groups of templates, each group one question in other words",
    )
    parser.add_argument("--paraphrase-subjects", type=int, default=40)
    args = parser.parse_args()
    config = zsre_stream(args.n, args.data_dir)
    benchmark, task, trainer = stream_trainer(config)
    bank, cfg = trainer.memory, trainer.config
    mean, precision = (t.double() for t in bank.statistics(cfg.whiten_ridge, cfg.whiten_edit_rows))
    templates = question_templates()
    model, layer, adapter = trainer.model, trainer.layer, trainer.adapter
    precisions = {}
    if args.paraphrase_scatter:
        groups = json.loads(args.paraphrase_templates.read_text(encoding="utf-8"))
        subjects = memory_subjects(args.data_dir)[: args.paraphrase_subjects]
        scatter = paraphrase_scatter(model, layer, task, adapter, groups, subjects)
        covariance = torch.linalg.inv(precision)
        print("trace covariance / paraphrase scatter", float(covariance.trace() / scatter.trace()), flush=True)
        for alpha in args.paraphrase_scatter:
            precisions[f"para{alpha:g}"] = torch.linalg.inv(covariance + alpha * scatter)
    records = []
    for index, example in enumerate(benchmark.examples):
        single = trainer._batch(example)
        with torch.no_grad():
            first = trainer._forward(single, record=True)
        subject = trainer._subject_read(example, single, trainer._gate_reads())
        name = example.subject or guess_subject(example.text)
        if subject is None or not name:
            continue
        q = first.query[0].double()
        views = trainer.views.queries(model, layer, task, example)[0].double()
        parts = {
            "rephrase": list(example.rephrases),
            "subject": [t.format(name) for t in templates],
            "probe": [t.format(name) for t in PROBES],
        }
        rows = {
            k: answer_start_queries(model, layer, task, v, example.target, adapter).double() for k, v in parts.items()
        }
        opened = {
            k: len(answer_start_queries(model, layer, task, v, example.target, adapter, gated_on=subject))
            for k, v in parts.items()
        }
        keys = {"views": discriminant(q, mean, precision, None, views, cfg.view_scatter).double()}
        along = (rows["subject"] - mean) @ (keys["views"] / (keys["views"] @ (q - mean)))
        unlike = rows["subject"][along < 0.9]  # a contrast as high as the edit likely asks the same thing
        keys["relation"] = discriminant(q, mean, precision, None, views, cfg.view_scatter, contrasts=unlike).double()
        for label, tilde in precisions.items():
            keys[label] = discriminant(q.double(), mean, tilde, None, views, cfg.view_scatter).double()
        record = {"index": index, "text": example.text, "subject": name, "open": opened, "keys": {}}
        for key_name, w in keys.items():
            w = w / (w @ (q - mean))  # the edit scores 1, the memory mean 0
            record["keys"][key_name] = {
                "memory": float(bank.max_score(w[None].float())[0] - w @ mean),
                "subject_used": len(unlike),
            } | {part: ((x - mean) @ w).tolist() for part, x in rows.items()}
        records.append(record)
        print(index, {k: round(v["memory"], 2) for k, v in record["keys"].items()}, flush=True)
    command = f"python bench/same_subject.py --n {args.n} --out {args.out}"
    if args.paraphrase_scatter:
        alphas = " ".join(f"{a:g}" for a in args.paraphrase_scatter)
        command += f" --paraphrase-scatter {alphas} --paraphrase-templates {args.paraphrase_templates}"
        command += f" --paraphrase-subjects {args.paraphrase_subjects}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summaries = {key: summary(records, key) for key in records[0]["keys"]} if records else {}
    print(json.dumps(summaries))
    result = {"command": command, "probes": PROBES, "summary": summaries, "records": records}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
