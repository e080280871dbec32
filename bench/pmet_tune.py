"""How the SmolLM2 PMET preset was chosen: edit a batch of CounterFact or zsRE records (never reported) at several λ.

Targets are computed once for the batch (they do not depend on λ); each λ then gets its own layer loop, applied
through temporary forward hooks (the model is never changed), and ROME-style scores before and after.

    python bench/pmet_tune.py --start 900 --n 16 --set v_lr=2.0 clamp_norm_factor=1.5 --lams 15000 6000 2000 \
        --out bench/results/pmet_tune.jsonl [--trials '{"track": "ffn"}' '{"track": "residual"}']

Each row also says how much of each fact's optimised change the write delivers where the layer loop reads it (the z
layer), as a share of that change (``landed``: median and 10th percentile; 1.0 is the whole change, before
``write_scale``), and how the facts the write missed compare there.

A trial with ``"null_space": true`` writes through AlphaEdit's projection (a fresh one per trial: no earlier keys).
A trial's ``"layers"`` may add or drop edited blocks below the z layer (the targets are the z layer's, so they are
shared); its last block must be the z layer of ``--set``.
``--data-kind zsre`` reads a zsRE file instead (its answers are the targets, as in ``batch run``).
``--perplexity-texts N`` also reads each trial's perplexity change on N WikiText-2 valid passages that follow the key
statistics' (``perplexity_change``): general ability on dev, on text no result reports.
``--misses`` writes, per trial, every fact the write missed: what the model answers instead, and whether that answer
is another fact's target in the batch (one with the same prompt template, i.e. the same relation, or any), and how
many of the missed facts the write lands when it acts only at some of their tokens (``landed_where``: the subject's
last token or all its tokens, with or without the prompt's and the answer's other tokens; ``everywhere`` is the write
itself).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from transformer_patcher.core.pretrained import cache_dir, load_model
from transformer_patcher.core.tasks import CausalLMTask
from transformer_patcher.data.benchmarks import wikitext_texts
from transformer_patcher.data.loaders import find_data_file, load_counterfact, load_zsre
from transformer_patcher.experiments.sme.fact_scores import FactCase, fact_metrics, score_cases
from transformer_patcher.experiments.sme.saved_targets import saved_targets
from transformer_patcher.methods.pmet import (
    EditRequest,
    PMETHyperParams,
    Targets,
    compute_targets,
    refined_deltas,
    second_moments,
)
from transformer_patcher.methods.pmet.algorithm import applied, landed_share, read_at_subject, written_values
from transformer_patcher.methods.pmet.editor import written_solve
from transformer_patcher.methods.pmet.requests import encode, target_ids
from transformer_patcher.methods.pmet.update import LowRankDelta


def kept_targets(
    folder: Path,
    data: Path,
    start: int,
    n: int,
    hparams: PMETHyperParams,
    compute: Callable[[Sequence[int]], Targets],
) -> tuple[Targets, float]:
    """``saved_targets`` under a name for these records and these target settings, so other runs reuse them."""
    folder.mkdir(parents=True, exist_ok=True)
    setting = hashlib.sha256(json.dumps(hparams.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return saved_targets(folder, f"{data.stem}-{start}-{n}-{setting}", n, compute)


def mean_nll(model: Any, tokenizer: Any, texts: Sequence[str]) -> float:
    """The mean next-token NLL over ``texts`` (each up to 128 tokens), one text a forward pass; 0 for none."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)["input_ids"].to(device)
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            total, count = total + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return total / count if count else 0.0


def landed_shares(
    model: Any,
    tokenizer: Any,
    requests: list[EditRequest],
    hparams: PMETHyperParams,
    targets: Targets,
    deltas: dict[str, LowRankDelta],
) -> list[float]:
    """Per fact, the share of its optimised change at the z layer that ``deltas`` add there: the projection of what
    the write moves onto the change, over the change's squared length (``write_scale`` left out)."""
    module, values = written_values(model, tokenizer, requests, hparams.with_options(write_scale=1.0), targets)
    bare = [encode(tokenizer, request.template, request.subject) for request in requests]
    before = read_at_subject(model, tokenizer, bare, module, "output").double().T
    with applied(model, deltas):
        after = read_at_subject(model, tokenizer, bare, module, "output").double().T
    return landed_share(after - before, values - before).tolist()


def share_summary(shares: list[float], missed: list[bool]) -> dict[str, float | None]:
    """Median and 10th percentile of the landed shares, and the median over the facts the write missed and landed."""
    deciles = statistics.quantiles(shares, n=10) if len(shares) > 1 else shares * 9
    hit = [s for s, m in zip(shares, missed, strict=True) if not m]
    miss = [s for s, m in zip(shares, missed, strict=True) if m]
    return {
        "landed_median": statistics.median(shares),
        "landed_p10": deciles[0],
        "landed_median_hit": statistics.median(hit) if hit else None,
        "landed_median_missed": statistics.median(miss) if miss else None,
    }


def missed_facts(
    requests: list[EditRequest], missed: list[int], after: list[dict[str, Any]], before: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The ``missed`` facts (their target is not the greedy answer after the write), and what they answer instead."""
    holders: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        holders.setdefault(request.target.strip(), []).append(i)
    rows = []
    for i in missed:
        request, outcome = requests[i], after[i]
        answer = outcome["edit"].prediction.strip()
        others = [j for j in holders.get(answer, []) if j != i]
        rows.append(
            {
                "fact": i,
                "prompt": request.template.format(request.subject),
                "target": request.target,
                "answer": outcome["edit"].prediction,
                "answer_before": before[i]["edit"].prediction,
                "answer_is_another_target": bool(others),
                "answer_is_same_relation_target": any(requests[j].template == request.template for j in others),
            }
        )
    return rows


def landed_where(
    model: Any, tokenizer: Any, requests: list[EditRequest], missed: list[int], deltas: dict[str, LowRankDelta]
) -> dict[str, int]:
    """Of the ``missed`` facts, how many have every target token greedy (teacher forcing) when the write acts only at
    some of their tokens: the subject's (or its last), the subject's and the prompt's before it, after it, or its last
    token, the whole prompt, the subject's and the answer's, or every token (the miss itself)."""
    names = ("subject", "subject_last", "before_subject", "after_subject", "prompt_end", "prompt", "subject_and_answer")
    counts = dict.fromkeys((*names, "everywhere"), 0)
    for i in missed:
        request = requests[i]
        answer = target_ids(tokenizer, request.target)
        encoded = encode(tokenizer, request.template, request.subject, answer)
        first = encoded.subject_start
        position = torch.arange(len(encoded.ids))
        subject = (position >= first) & (position <= encoded.lookup)
        in_answer = position > encoded.target_positions[0]
        in_prompt = ~in_answer
        masks = {  # the subject's tokens, plus (or only) ...
            "subject": subject,
            "subject_last": position == encoded.lookup,  # only the subject's last token, where the write is aimed
            "before_subject": subject | (in_prompt & (position < first)),
            "after_subject": subject | (in_prompt & (position > encoded.lookup)),
            "prompt_end": subject | (position == encoded.target_positions[0]),  # the token the answer is read at
            "prompt": in_prompt,
            "subject_and_answer": subject | in_answer,
            "everywhere": torch.ones_like(subject),
        }
        ids = torch.tensor([encoded.ids], device=next(model.parameters()).device)
        for name, mask in masks.items():
            with applied(model, deltas, mask.float()), torch.no_grad():
                logits = model(input_ids=ids).logits[0]
            counts[name] += logits[encoded.target_positions].argmax(-1).tolist() == encoded.target_ids
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=900)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="PMETHyperParams fields")
    parser.add_argument("--lams", nargs="+", type=float, default=[15000.0])
    parser.add_argument(
        "--trials", nargs="*", default=["{}"], metavar="JSON", help="option sets tried on the same targets, each λ"
    )
    parser.add_argument(
        "--data",
        default="counterfact/counterfact-edit-1k.json",
        help="CounterFact or zsRE file (a path, or one under the data folder)",
    )
    parser.add_argument("--data-kind", choices=("counterfact", "zsre"), default="counterfact")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--targets", type=Path, default=None, help="folder to keep targets in (reused for the same records and --set)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    parser.add_argument("--misses", type=Path, default=None, help="JSON lines of the missed facts, one per trial")
    parser.add_argument(
        "--perplexity-texts",
        type=int,
        default=0,
        help="also the perplexity change on this many WikiText-2 valid passages after the statistics' (not scored)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # refine rounds say how many facts they missed
    model, tokenizer = load_model("smollm2-135m", "generation", device=args.device)
    options = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    hparams = PMETHyperParams(**options)
    trials = [json.loads(t) for t in args.trials]
    passages = wikitext_texts("valid")
    texts = passages[: hparams.mom2_n_texts]
    held_out = passages[hparams.mom2_n_texts : hparams.mom2_n_texts + args.perplexity_texts]
    if len(held_out) < args.perplexity_texts:
        parser.error(f"only {len(held_out)} WikiText-2 valid passages follow the statistics' {hparams.mom2_n_texts}")
    for trial in trials:
        if trial.get("layers", hparams.layers)[-1] != hparams.layers[-1]:
            parser.error(f"trial {trial} ends at another z layer than --set's {hparams.layers}: its targets differ")
    layers = sorted({*hparams.layers, *(layer for t in trials for layer in t.get("layers", ()))})
    moments = second_moments(model, tokenizer, texts, layers, cache_dir=cache_dir() / "pmet", progress=False)
    data = Path(args.data) if Path(args.data).is_file() else find_data_file(args.data)
    rows = list(load_zsre(data) if args.data_kind == "zsre" else load_counterfact(data))
    rows = rows[args.start : args.start + args.n]
    cases = [FactCase.from_row(r) for r in rows]
    requests = [EditRequest(r["text"], r["subject"], r["target"]) for r in rows]
    task = CausalLMTask(tokenizer)
    before = score_cases(model, task, cases)
    nll_before = mean_nll(model, tokenizer, held_out)
    templates = hparams.templates(model, tokenizer)

    def compute(index: Sequence[int]) -> Targets:
        return compute_targets(model, tokenizer, [requests[i] for i in index], hparams, templates, progress=False)

    if args.targets is None:
        began = time.perf_counter()
        targets = compute(range(len(requests)))
        target_seconds = (time.perf_counter() - began) / len(requests)
    else:
        targets, target_seconds = kept_targets(args.targets, data, args.start, args.n, hparams, compute)
    common = {
        "data": data.name,
        "records": [args.start, args.start + args.n],
        "options": options,
        "device": str(next(model.parameters()).device),
        "target_s_per_request": target_seconds,
    }
    common["target_probabilities"] = [round(p, 3) for p in targets.probabilities]
    with args.out.open("a") as log:
        log.write(json.dumps({**common, "lam": None, **fact_metrics(before, before)}) + "\n")
        for lam, extra in ((lam, t) for lam in args.lams for t in trials):
            trial = hparams.with_options(mom2_update_weight=lam, **extra)
            start = time.perf_counter()
            space = written_solve(trial, moments, next(model.parameters()).device)
            deltas, _ = refined_deltas(model, tokenizer, requests, trial, moments, templates, targets, task, space)
            write_seconds = time.perf_counter() - start  # the layer loop, and any refine round's targets and loop
            with applied(model, deltas):
                after = score_cases(model, task, cases)
                nll_after = mean_nll(model, tokenizer, held_out)
            row = {**common, "lam": lam, "trial": extra, "write_s_per_request": write_seconds / len(requests)}
            if held_out:
                row["perplexity_change"] = math.exp(nll_after - nll_before) - 1
            row.update(fact_metrics(after, before))
            shares = landed_shares(model, tokenizer, requests, trial, targets, deltas)
            flags = [not case["edit"].correct for case in after]
            missed = [i for i, flag in enumerate(flags) if flag]
            row.update(share_summary(shares, flags))
            log.write(json.dumps(row) + "\n")
            log.flush()  # one whole line at a time: other runs may append to the same file
            if args.misses is not None:
                with args.misses.open("a") as misses:
                    entry = {"records": common["records"], "lam": lam, "trial": extra}
                    entry["landed_where"] = landed_where(model, tokenizer, requests, missed, deltas)
                    print(json.dumps(entry), flush=True)
                    misses.write(json.dumps({**entry, "missed": missed_facts(requests, missed, after, before)}) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "target_probabilities"}), flush=True)


if __name__ == "__main__":
    main()
