"""What a subject gate would do to a T-Patcher patch set (issue 15): scored with and without it, nothing retrained.

The gate: each patch also holds its edit's subject read, the residual stream after an early block at the subject's
last token of the edit's prompt. At every position it is open where the running maximum, over the positions read so
far, of the cosine between that block's output and the patch's subject read passes ``--thresholds``; a closed patch
adds nothing. A text's first token is left out on both sides: every text's first token reads alike (the attention
sink), so a subject read there names none and its patch stays ungated. A rephrase names the edit's subject, a
CounterFact neighbour asks the same relation of another subject (``bench/key_reads.py``: the subject read retrieves
its own fact among 200 at 0.99, the last FFN's query at 0.19).

This loads a saved patch set twice, as it is and with the package's gate (``PatcherConfig.gate_layer``) and the
subject reads filled in, and scores, for the base model, the patch set and the patch
set behind the gate at each threshold (teacher-forced, ``score_pairs``): the edits, their rephrases, every evaluation
set of the data, and ``--neighbours`` near neighbours per edit (first-token agreement with the base model). It also
reports how often a text opens its own edit's patches and any patch at all. Dev streams only: zsRE's first 100
records (the sme runner keeps 40 of them), and CounterFact-train records 9000–9199, past the records the default
10,000 memory rows hold:

    transformer-patcher sme run --model smollm2-135m --data zsre --data-dir ../shared/data --max-examples 100 \\
        --suite none --out runs/zsre-dev-100
    python bench/subject_gate.py --run runs/zsre-dev-100 --data zsre --data-dir ../shared/data --max-examples 100 \\
        --block 4 --thresholds 0.7 0.8 0.9 --out bench/results/subject_gate.json
    mkdir -p /tmp/w
    python -c "import json; d = json.load(open('../shared/data/counterfact/counterfact-train.json')); \\
        json.dump(d[9000:9200], open('/tmp/w/cf-dev-9000.json', 'w'))"
    transformer-patcher sme run --model smollm2-135m --data /tmp/w/cf-dev-9000.json --data-kind counterfact \\
        --data-dir ../shared/data --suite none --out runs/cf-dev-9000
    python bench/subject_gate.py --run runs/cf-dev-9000 --data /tmp/w/cf-dev-9000.json --data-kind counterfact \\
        --block 4 --thresholds 0.7 0.8 0.9 --out bench/results/subject_gate.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from key_reads import reads, subject_token
from transformer_patcher.core.pretrained import load_model
from transformer_patcher.core.scoring import score_pairs
from transformer_patcher.core.tasks import task_for_model
from transformer_patcher.data.benchmarks import Benchmark
from transformer_patcher.experiments.sme.experiment import ExperimentConfig, load_benchmark
from transformer_patcher.tuners.patcher.config import PatcherConfig
from transformer_patcher.tuners.patcher.layer import PatcherLayer
from transformer_patcher.tuners.patcher.model import PatcherModel, get_patcher_model
from transformer_patcher.tuners.patcher.patch_set import read_edit_log


def subject_reads(model: nn.Module, tokenizer: Any, block: int, log: list[dict], ids: list[int]) -> torch.Tensor:
    """Per patch (by its edit id), block ``block``'s output at its edit's subject's last token (``key_reads``); zero
    without a subject or when that token is the text's first, which names none: the patch stays ungated."""
    by_id = {int(entry["edit_id"]): entry for entry in log}
    found: dict[int, torch.Tensor] = {}
    for edit_id in sorted(set(ids)):
        text, subject = by_id[edit_id]["text"], by_id[edit_id].get("subject")
        if subject and subject_token(tokenizer, text, subject) not in (None, 0):
            found[edit_id] = reads(model, tokenizer, text, subject, [block])[
                f"residual after block {block}, subject's last token"
            ]
    width = next(iter(found.values())).numel()
    return torch.stack([found.get(i, torch.zeros(width)) for i in ids])


def score(model: nn.Module, task: Any, sets: dict[str, list], batch_size: int, base: dict | None) -> dict[str, Any]:
    """Exact match per set and, against ``base``'s predictions, agreement (what locality means for a neighbour)."""
    row: dict[str, Any] = {}
    for name, pairs in sets.items():
        outcomes = score_pairs(model, task, pairs, batch_size)
        row[name] = round(sum(o.correct for o in outcomes) / len(outcomes), 4)
        row[f"{name}.predictions"] = [o.prediction for o in outcomes]
        if base is not None:
            same = [a == b for a, b in zip(row[f"{name}.predictions"], base[f"{name}.predictions"], strict=True)]
            row[f"{name}.agreement"] = round(sum(same) / len(same), 4)
    return row


def gate_maxima(model: nn.Module, tokenizer: Any, layer: PatcherLayer, texts: list[str]) -> torch.Tensor:
    """Per text (read alone, raw), the running maximum cosine with every patch's subject read at its last token:
    shape (texts, patches). A patch is open there when it passes the threshold."""
    gate, subjects = layer.gate_reads(), layer.patch_frozen_subjects[layer.active_adapters[0]]
    rows = []
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
            rows.append(gate.running(subjects, "bench", layer.gate_frame())[0, -1].clone())
    return torch.stack(rows)


def open_rates(maxima: torch.Tensor, own: list[list[int]] | None, thresholds: list[float]) -> dict[str, Any]:
    """How often a text opens its own edit's patches (``own``: patch columns per text) and any patch at all."""
    out: dict[str, Any] = {}
    if own is not None:
        mine = torch.stack([maxima[i, cols].max() for i, cols in enumerate(own)])
        out["own_max_cos_median"] = round(mine.median().item(), 3)
        out["own_open"] = {str(t): round((mine >= t).float().mean().item(), 3) for t in thresholds}
    out["any_open"] = {str(t): round((maxima >= t).any(1).float().mean().item(), 3) for t in thresholds}
    return out


def changed(row: dict[str, Any], base: dict[str, Any], sets: dict[str, list]) -> dict[str, list]:
    """The locality prompts whose prediction differs from the base model's (at most 10, for reading)."""
    if "locality" not in sets:
        return {}
    pairs = zip(sets["locality"], row["locality.predictions"], base["locality.predictions"], strict=True)
    return {"locality.changed": [[text, b, a] for (text, _), a, b in pairs if a != b][:10]}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name a finished sme run and its data (shared with ``rephrase_reach.py``)."""
    parser.add_argument("--run", type=Path, required=True, help="an sme run folder with its patch set")
    parser.add_argument("--data", required=True, help="the run's data file")
    parser.add_argument("--data-kind", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-examples", type=int, default=None, help="as the run was given")
    parser.add_argument("--model", default="smollm2-135m")


def record_result(result: dict[str, Any], out: Path) -> None:
    """Print ``result`` with the command that produced it and append it to the JSON list in ``out``."""
    result["command"] = "python " + shlex.join(sys.argv)
    print(json.dumps(result))
    saved = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*saved, result], indent=1) + "\n")


def run_benchmark(args: argparse.Namespace) -> tuple[Path, Benchmark]:
    """The run's patch-set folder and its benchmark, loaded as the run loaded it."""
    patches = next(p.parent for p in sorted(args.run.rglob("adapter_config.json")))
    config = ExperimentConfig(
        model=args.model,
        data=args.data,
        data_kind=args.data_kind,
        data_dir=args.data_dir,
        max_examples=args.max_examples,
        suite="none",
    )
    return patches, load_benchmark(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--block", type=int, default=4, help="the block whose output the gate reads")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8])
    parser.add_argument("--neighbours", type=int, default=5, help="near neighbours per edit (0: none)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    patches, benchmark = run_benchmark(args)
    sets = {"edit": [(e.text, e.target) for e in benchmark.examples]}
    sets["rephrase"] = [(t, e.target) for e in benchmark.examples for t in e.rephrases]
    sets |= benchmark.eval_sets
    if args.neighbours:  # first-token agreement: the dummy target is one token, read where the answer starts
        sets["neighbours"] = [(q, "x") for found in benchmark.neighbours(args.neighbours) for q in found]
    base, tokenizer = load_model(args.model, "generation")
    task = task_for_model(base, tokenizer, prompt_format=benchmark.prompt_format)
    before = score(base, task, sets, args.batch_size, None)
    patched = PatcherModel.from_pretrained(base, patches)
    rows: list[dict[str, Any]] = [{"model": "patched", **score(patched, task, sets, args.batch_size, before)}]
    layer = next(m for m in patched.modules() if isinstance(m, PatcherLayer))
    ids = layer.edit_ids().tolist()
    keys = subject_reads(base, tokenizer, args.block, read_edit_log(patches), ids)
    saved = patched.peft_config["default"]
    gated = get_patcher_model(
        load_model(args.model, "generation")[0],
        PatcherConfig(
            patch_activation=saved.patch_activation, target_modules=saved.target_modules, gate_layer=args.block
        ),
    ).eval()
    gated_layer = gated.base_model.patch_layer()
    gated_layer.restore_committed({**layer.committed(), "patch_frozen_subjects": keys})
    ungated = int((keys.norm(dim=1) == 0).sum())
    print(f"{ungated} of {len(ids)} patches ungated (subject missing or read at the first token)")
    inner = gated.get_base_model()
    columns: dict[str, list[int]] = {}
    for entry in read_edit_log(patches):
        columns[entry["text"]] = [j for j, i in enumerate(ids) if i == entry["edit_id"]]
    examples = [e for e in benchmark.examples if columns.get(e.text)]
    gates: dict[str, Any] = {
        "rephrase": open_rates(
            gate_maxima(inner, tokenizer, gated_layer, [t for e in examples for t in e.rephrases]),
            [columns[e.text] for e in examples for _ in e.rephrases],
            args.thresholds,
        )
    }
    for name, pairs in benchmark.eval_sets.items():
        mine = None  # CounterFact: record i's locality prompt asks its relation of another subject
        if benchmark.locality_is_neighbourhood and name == "locality":
            mine = [columns.get(e.text, []) for e in benchmark.examples]
        keep = [i for i in range(len(pairs)) if mine is None or mine[i]]
        maxima = gate_maxima(inner, tokenizer, gated_layer, [pairs[i][0] for i in keep])
        gates[name] = open_rates(maxima, None if mine is None else [mine[i] for i in keep], args.thresholds)
    print(gates)
    for threshold in args.thresholds:
        gated_layer.patch_config["default"].gate_threshold = threshold
        rows.append({"model": f"gated {threshold}", **score(gated, task, sets, args.batch_size, before)})
    rows = [{"model": "base", **before}, *rows]
    for row in rows:
        row.update(changed(row, before, sets))
        print({k: v for k, v in row.items() if not k.endswith("predictions")})
    for row in rows:
        for key in [k for k in row if k.endswith("predictions")]:
            del row[key]
    result = {
        "run": str(args.run),
        "data": args.data,
        "block": args.block,
        "sizes": {k: len(v) for k, v in sets.items()},
        "ungated_patches": ungated,
        "patches": len(ids),
        "gates": gates,
        "rows": rows,
        "command": "python " + shlex.join(sys.argv),
    }
    saved = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*saved, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
