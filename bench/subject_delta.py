"""What a patch at the subject could give: each fact's optimised change added exactly where its subject ends.

Issue 15's patches sit at the last FFN and read the last token, which on CounterFact carries the relation's wording,
not the fact (``bench/key_reads.py``), so a rephrase that ends in other words never fires them. A patch at the
subject instead (an early block's FFN, keyed on the subject's last token, behind the subject gate) would add one
vector there in every text that names the subject, as ROME's and PMET's targets do. This asks, one fact at a time
and on the unedited model, what such a patch gives at best: the fact's PMET target change (``δ_mlp`` + ``δ_attn``,
optimised over prefixed prompts) is added to the z block's output at the subject's last token of the prompt, of its
rephrase and of other questions about the subject (the suite's templates), through a forward hook; nothing is written.

- efficacy / paraphrase: exact greedy answers (teacher-forced), with the change and without;
- subject questions kept: the share of other questions about the subject whose greedy answer (``--new-tokens``)
  the change leaves as it was (the suite's ``subject-raw`` part, asked of this subject);
- ``found``: rephrases that name the subject verbatim (the others are scored without the change).

    python bench/subject_delta.py --data counterfact/counterfact-train.json --start 0 --n 100 \
        --targets /tmp/w/cf-dev-targets --set v_lr=2.0 clamp_norm_factor=1.5 settled_steps=3 target_margin=2.0 \
        v_num_grad_steps=60 --scales 1.0 1.5 2.0 3.0 --out bench/results/subject_delta-counterfact.json

(zsRE: ``--data zsre/zsre_mend_train-1k.json --data-kind zsre --n 40``; ``--site optimised`` adds each delta where
the optimisation added it.) Targets are read from (or written to) ``--targets`` as ``bench/pmet_tune.py`` keeps them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pmet_tune import kept_targets
from transformer_patcher.core.decoding import greedy_continuations
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.data.loaders import find_data_file, load_counterfact, load_zsre
from transformer_patcher.data.suite_data import subject_questions
from transformer_patcher.methods.pmet import EditRequest, PMETHyperParams, compute_targets
from transformer_patcher.methods.pmet.architecture import block_modules, unwrap
from transformer_patcher.methods.pmet.requests import encode, escape_braces
from transformer_patcher.methods.pmet.targets import output_hooks


def subject_template(text: str, subject: str) -> str | None:
    """``text`` with its last mention of ``subject`` as the ``{}`` slot (None when it does not name it)."""
    at = text.rfind(subject)
    if at < 0:
        return None
    return escape_braces(text[:at]) + "{}" + escape_braces(text[at + len(subject) :])


@contextmanager
def added_at(model: Any, shifts: dict[str, torch.Tensor], position: int, scale: float) -> Iterator[None]:
    """Add ``scale`` times each module's shift (module name → vector) to its output at ``position`` of a single
    text (forwards that do not cover the position, as cached decoding steps, are left alone)."""

    def add(change: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if out.shape[1] <= position:
            return out
        out = out.clone()
        out[:, position] += (change * scale).to(out.dtype)
        return out

    with output_hooks(unwrap(model), {name: partial(add, change) for name, change in shifts.items()}):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="counterfact/counterfact-train.json")
    parser.add_argument("--data-kind", choices=("counterfact", "zsre"), default="counterfact")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="PMETHyperParams fields")
    parser.add_argument("--targets", type=Path, required=True, help="folder of targets (bench/pmet_tune.py's)")
    parser.add_argument("--questions", type=int, default=4, help="other questions about each subject")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument(
        "--site", choices=("ffn", "optimised"), default="ffn", help="one vector on the FFN output, or as optimised"
    )
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0], help="multiples of the change to add")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", "generation")
    options = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    hparams = PMETHyperParams(**options)
    data = Path(args.data) if Path(args.data).is_file() else find_data_file(args.data)
    rows = list(load_zsre(data) if args.data_kind == "zsre" else load_counterfact(data))[
        args.start : args.start + args.n
    ]
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    templates = hparams.templates(model, tokenizer)
    targets, _ = kept_targets(
        args.targets,
        data,
        args.start,
        args.n,
        hparams,
        partial(compute_targets, model, tokenizer, requests, hparams, templates, progress=True),
    )
    z_block = block_modules(model, hparams.layers[-1])
    if args.site == "ffn":  # the whole change as one vector on the z block's FFN output: what a patch there adds
        shifts = [{z_block.ffn_out: change} for change in targets.change(fold_attention=True)]
    else:  # each delta where the optimisation added it
        mlp, attention = targets.change(), targets.attention
        shifts = [{z_block.ffn_out: mlp[i], z_block.attention_out: attention[i]} for i in range(len(requests))]
    task = CausalLMTask(tokenizer)
    questions = subject_questions(
        [r["subject"] for r in rows], args.questions, [[r["text"], r["rephrase"]] for r in rows]
    )
    stops = [tokenizer.eos_token_id]
    generate = partial(greedy_continuations, model, stop_ids=stops, max_new_tokens=args.new_tokens, pad_id=stops[0])
    per_fact = []
    for i, row in enumerate(tqdm(rows, desc="facts", unit="fact")):
        record: dict[str, Any] = {"subject": row["subject"]}
        for part, text in (("efficacy", row["text"]), ("paraphrase", row["rephrase"])):
            slot = subject_template(text, row["subject"])
            outcome = {
                "before": score_pairs(model, task, [(text, row["target"])])[0].correct,
                "found": slot is not None,
            }
            for scale in args.scales:
                if slot is None:
                    outcome[f"x{scale}"] = outcome["before"]
                    continue
                position = encode(tokenizer, slot, row["subject"]).lookup
                with added_at(model, shifts[i], position, scale):
                    outcome[f"x{scale}"] = score_pairs(model, task, [(text, row["target"])])[0].correct
            record[part] = outcome
        record["subject_kept"] = {f"x{scale}": [] for scale in args.scales}
        for question in questions[i]:
            position = encode(tokenizer, subject_template(question, row["subject"]), row["subject"]).lookup
            plain = generate([tokenizer(question)["input_ids"]])[0]
            for scale in args.scales:
                with added_at(model, shifts[i], position, scale):
                    moved = generate([tokenizer(question)["input_ids"]])[0]
                record["subject_kept"][f"x{scale}"].append(plain == moved)
        per_fact.append(record)

    def share(part: str, key: str) -> float:
        return sum(r[part][key] for r in per_fact) / len(per_fact)

    def kept(key: str) -> float:
        return sum(sum(r["subject_kept"][key]) for r in per_fact) / sum(len(r["subject_kept"][key]) for r in per_fact)

    summary = {
        "data": data.name,
        "records": [args.start, args.start + args.n],
        "options": options,
        "z_block": hparams.layers[-1],
        "site": args.site,
        "target_probability_median": sorted(targets.probabilities)[len(targets.probabilities) // 2],
        "paraphrase_found": share("paraphrase", "found"),
        "before": {"efficacy": share("efficacy", "before"), "paraphrase": share("paraphrase", "before")},
        **{
            f"x{scale}": {
                "efficacy": share("efficacy", f"x{scale}"),
                "paraphrase": share("paraphrase", f"x{scale}"),
                "subject_kept": kept(f"x{scale}"),
            }
            for scale in args.scales
        },
    }
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**summary, "facts": per_fact}, indent=1) + "\n")


if __name__ == "__main__":
    main()
