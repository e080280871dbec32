"""Generalization (GR) and locality of Transformer-Patcher on SmolLM2-135M + zsRE: memory and SiLU margins.

Why: with the official activation margin m_a = 0, an edit on SmolLM2 (a SiLU FFN) fires at a pre-activation of
about 2-5, memory queries sit 12-14 below it (far below the memory margin beta), and the *rephrases* of the edit sit
about 4 below the edit's pre-activation, around 0, where SiLU is nearly silent. The patch then barely fires on the
rephrases and GR is low. This benchmark measures GR against the activation margin m_a (the SiLU margin sweep behind
``ACTIVATION_MARGINS["silu"] = 15`` in ``transformer_patcher.methods.patcher.config``) and against the memory
composition and
the memory margins (beta, gamma). ``--diag`` prints, per edit, the new patches' pre-activations on the edit and on
its rephrase and their maximum over the first 5,000 memory rows, which is where the figures above come from (the
bank grows by each edit's own queries after its built rows, so with ``--rows`` below 5,000 that maximum includes
the edits themselves).

Setup:

- model: SmolLM2-135M (``resolve_model("smollm2-135m")``) wrapped by ``get_patcher_model``, task ``CausalLMTask``;
- edits: zsRE ``zsre/zsre_mend_train-1k.json`` records ``[start : start + n]``, each
  ``EditExample(src, answers[0], rephrases=(rephrase,))``, edited in order with ``edit_id`` = position in the stream;
- locality sets: the same records' ``(loc without "nq question: ", loc_ans)`` pairs, and the first 100 CounterFact
  ``counterfact/counterfact-edit-1k.json`` cases ``(prompt with {} replaced by the subject, ground_truth)``;
- memory (``--memory``, a '+'-joined list of sources, ``--rows`` split evenly between them, concatenated in order):
  ``wiki`` = WikiText-2 ``valid.txt`` cut into 24-word chunks starting at every multiple of 24 below
  ``len(words) - 24`` (so the last, possibly full, chunk is dropped), each as (first word, the other 23 words);
  ``cf`` = ``counterfact/counterfact-train.json``, two pairs per record: (prompt with the subject filled in,
  ground_truth) then (rephrase_prompt, ground_truth); ``qa`` = zsRE records ``[500:]`` as (src, answers[0]).
  Rows are the FFN queries at the task's reads over the pairs, in pair order (``build_memory``), cached as
  safetensors under ``--cache-dir``. Validation memory: 1,000 rows from the last 400 ``wiki`` pairs.
- config: ``EditConfig.quick(**overrides)`` with ``--quick``, else ``EditConfig(**overrides)``.

Metrics (one JSON object per run, printed and appended to ``--out``):

- ``SR`` / ``GR``: the edit / its rephrase is answered right, scored right after that edit;
- ``ER`` / ``GR_end``: the same after all edits; ``GR_tok``: token accuracy on the rephrases after all edits
  (sum of correct tokens / sum of target tokens);
- ``loc`` / ``cf_loc``: fraction of zsRE / CounterFact locality predictions equal to the pre-edit ones;
- ``steps_med``, ``sec_med``: upper median (``sorted(x)[n // 2]``) of optimisation steps and seconds per edit;
  ``neurons``: patch neurons added in total; ``total_s``: wall seconds from the first edit to the end of scoring;
- ``act_margin``, ``memory_beta``, ``memory_gamma``: the margins the editor actually used.

The sweep (``--act-margin`` defaults to the package default, 15 for SiLU; rows quoted as "m_a = 0" in the docs were
run with ``--act-margin 0``, the official value and the package default at the time)::

    python bench/gr_margins.py --quick --n 10 --memory wiki --act-margin 0
    python bench/gr_margins.py --quick --n 10 --memory wiki --act-margin 6
    python bench/gr_margins.py --quick --n 10 --memory wiki --act-margin 10
    python bench/gr_margins.py --quick --n 10 --memory wiki --act-margin 15
    python bench/gr_margins.py --quick --n 10 --memory wiki --act-margin 20
    python bench/gr_margins.py --quick --n 10 --memory wiki --start 10 --act-margin 10
    python bench/gr_margins.py --quick --n 10 --memory wiki --start 10 --act-margin 15
    python bench/gr_margins.py --quick --n 10 --memory wiki --start 10 --act-margin 0
    python bench/gr_margins.py --quick --n 10 --memory cf --rows 5000 --act-margin 0
    python bench/gr_margins.py --quick --n 10 --memory wiki --beta -3 --gamma 3 --act-margin 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from transformer_patcher import get_patcher_model
from transformer_patcher.core.pretrained import resolve_model
from transformer_patcher.core.scoring import Outcome, score_pairs
from transformer_patcher.data import find_data_file
from transformer_patcher.data.benchmarks import generation_memory
from transformer_patcher.methods.patcher import (
    CausalLMTask,
    EditConfig,
    EditExample,
    EditRecord,
    MemoryBank,
    PatchTrainer,
    build_memory,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
WIKI_CHUNK_WORDS = 24
QA_MEMORY_START = 500  # zsRE records from here on are memory for the ``qa`` source (edits come from the first 500)
CF_LOCALITY_CASES = 100
VAL_WIKI_PAIRS = 400
VAL_ROWS = 1_000
DIAG_MEMORY_ROWS = 5_000
LOC_PREFIX = "nq question: "

Pair = tuple[str, str]


# ------------------------------------------------------------------------------------------------------ data
def read_json(name: str, data_dir: Path | None) -> Any:
    return json.loads(find_data_file(name, data_dir).read_text())


def wiki_pairs(data_dir: Path | None) -> list[Pair]:
    """WikiText-2 valid split into 24-word chunks at multiples of 24 below len - 24, as (first word, the rest)."""
    words = find_data_file("wikitext2/valid.txt", data_dir).read_text().split()
    starts = range(0, len(words) - WIKI_CHUNK_WORDS, WIKI_CHUNK_WORDS)
    return [(words[i], " ".join(words[i + 1 : i + WIKI_CHUNK_WORDS])) for i in starts]


def counterfact_pairs(data_dir: Path | None) -> list[Pair]:
    """CounterFact train: (filled prompt, ground truth) then (rephrase prompt, ground truth) per record."""
    pairs: list[Pair] = []
    for record in read_json("counterfact/counterfact-train.json", data_dir):
        pairs.append((record["prompt"].replace("{}", record["subject"]), record["ground_truth"]))
        pairs.append((record["rephrase_prompt"], record["ground_truth"]))
    return pairs


def zsre_memory_pairs(data_dir: Path | None) -> list[Pair]:
    return [(r["src"], r["answers"][0]) for r in read_json("zsre/zsre_mend_train-1k.json", data_dir)[QA_MEMORY_START:]]


MEMORY_SOURCES: dict[str, Callable[[Path | None], list[Pair]]] = {
    "wiki": wiki_pairs,
    "cf": counterfact_pairs,
    "qa": zsre_memory_pairs,
    "shipped": lambda data_dir: generation_memory(data_dir)[0],  # what zsre_benchmark(path) uses
}


def zsre_edits(records: Sequence[dict[str, Any]]) -> list[EditExample]:
    return [EditExample(r["src"], r["answers"][0], rephrases=(r["rephrase"],)) for r in records]


def zsre_locality(records: Sequence[dict[str, Any]]) -> list[Pair]:
    return [(r["loc"].replace(LOC_PREFIX, ""), r["loc_ans"]) for r in records]


def counterfact_locality(data_dir: Path | None) -> list[Pair]:
    cases = read_json("counterfact/counterfact-edit-1k.json", data_dir)[:CF_LOCALITY_CASES]
    return [(c["prompt"].replace("{}", c["subject"]), c["ground_truth"]) for c in cases]


# ---------------------------------------------------------------------------------------------------- setup
def load_model() -> tuple[Any, CausalLMTask, Any]:
    """SmolLM2-135M wrapped for patching, its causal-LM task and the patched layer."""
    path = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_patcher_model(AutoModelForCausalLM.from_pretrained(path).eval())
    task = CausalLMTask.for_model(model, tokenizer)
    return model, task, model.base_model.patch_layer()


def parse_sources(memory: str) -> list[str]:
    parts = memory.split("+")
    unknown = [p for p in parts if p not in MEMORY_SOURCES]
    if unknown:
        raise SystemExit(f"unknown memory source(s) {unknown}; choose from {sorted(MEMORY_SOURCES)}")
    return parts


def memory_banks(model: Any, task: CausalLMTask, layer: Any, args: argparse.Namespace) -> tuple[MemoryBank, MemoryBank]:
    """(training memory: ``args.rows`` split evenly over the sources, in order; validation memory)."""
    sources = parse_sources(args.memory)
    per_source = args.rows // len(sources)

    def bank(pairs: list[Pair], rows: int, tag: str) -> MemoryBank:
        return build_memory(model, layer, task, pairs, rows, cache_dir=args.cache_dir, tag=tag)

    rows = torch.cat([bank(MEMORY_SOURCES[s](args.data_dir), per_source, s).rows() for s in sources])
    val = bank(wiki_pairs(args.data_dir)[-VAL_WIKI_PAIRS:], VAL_ROWS, "wikival")
    return MemoryBank(rows), val


def edit_config(args: argparse.Namespace) -> EditConfig:
    """The editor config: only the options given on the command line override the defaults."""
    given = {
        "memory_beta": args.beta,
        "memory_gamma": args.gamma,
        "act_margin": args.act_margin,
        "memory_loss_weight": args.mlc,
        "act_loss_weight": args.alc,
    }
    overrides = {name: value for name, value in given.items() if value is not None}
    return EditConfig.quick(**overrides) if args.quick else EditConfig(**overrides)


# -------------------------------------------------------------------------------------------------- metrics
def mean(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags)


def upper_median(values: Sequence[float]) -> float:
    return sorted(values)[len(values) // 2]


def agreement(after: Sequence[Outcome], before: Sequence[Outcome]) -> float:
    """Fraction of predictions unchanged by the edits."""
    return sum(a.prediction == b.prediction for a, b in zip(after, before, strict=True)) / len(after)


def print_diagnostics(trainer: PatchTrainer, example: EditExample, edit_id: int) -> None:
    """Pre-activations of this edit's patches on the edit, on its rephrase, and their max over memory rows."""
    model, task, layer = trainer.model, trainer.task, trainer.layer
    mine = [j for j, owner in enumerate(layer.edit_ids().tolist()) if owner == edit_id]
    for name, text in (("edit", example.text), ("reph", example.rephrases[0])):
        batch = task.batch_for(model, [(text, example.target)])
        with torch.no_grad(), layer.capture() as capture:
            model(**batch.model_kwargs())
        pre = capture.frozen_preactivations
        if capture.preactivations is not None:
            pre = torch.cat([pre, capture.preactivations], -1)
        values = task.at_reads(pre, batch)[:, mine]
        tqdm.write(f"   {name} {[[round(v, 2) for v in row] for row in values.tolist()]}", file=sys.stderr)
    keys, bias = layer.patch_frozen_keys["default"][mine], layer.patch_frozen_bias["default"][mine]
    with torch.no_grad():
        top = (trainer.memory.rows()[:DIAG_MEMORY_ROWS] @ keys.T + bias).max(0).values
    tqdm.write(f"   mem max {[round(v, 2) for v in top.tolist()]}", file=sys.stderr)


def run_edits(
    trainer: PatchTrainer, edits: Sequence[EditExample], diag: bool
) -> tuple[list[EditRecord], dict[str, float]]:
    """Edit in order; score each edit and its rephrase right after it. Returns the records and SR / GR."""
    records: list[EditRecord] = []
    success: list[bool] = []
    general: list[bool] = []
    for i, example in enumerate(tqdm(edits, desc="edits", unit="edit", file=sys.stderr)):
        record = trainer.edit(example, edit_id=i)
        records.append(record)
        tqdm.write(
            f"{i} steps={record.steps} s={record.seconds:.1f} ok={record.success} neurons={record.neurons}",
            file=sys.stderr,
        )
        if diag:
            print_diagnostics(trainer, example, i)
        edit, rephrase = score_pairs(trainer.model, trainer.task, [pair(example), pair(example, rephrase=True)])
        success.append(edit.correct)
        general.append(rephrase.correct)
    return records, {"SR": mean(success), "GR": mean(general)}


def pair(example: EditExample, rephrase: bool = False) -> Pair:
    return (example.rephrases[0] if rephrase else example.text, str(example.target))


def final_scores(
    model: Any,
    task: CausalLMTask,
    edits: Sequence[EditExample],
    locality: tuple[list[Pair], list[Pair]],
    before: tuple[list[Outcome], list[Outcome]],
) -> dict[str, float]:
    """ER, GR_end, GR_tok and the two locality agreements after every edit."""
    edited = score_pairs(model, task, [pair(e) for e in edits])
    rephrased = score_pairs(model, task, [pair(e, rephrase=True) for e in edits])
    zsre_after = score_pairs(model, task, locality[0])
    cf_after = score_pairs(model, task, locality[1])
    token_accuracy = sum(o.correct_tokens for o in rephrased) / sum(o.total_tokens for o in rephrased)
    return {
        "GR_end": mean([o.correct for o in rephrased]),
        "GR_tok": round(token_accuracy, 3),
        "ER": mean([o.correct for o in edited]),
        "loc": agreement(zsre_after, before[0]),
        "cf_loc": agreement(cf_after, before[1]),
    }


# ------------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--memory", default="wiki", help="'+'-joined memory sources: wiki, cf, qa (default: wiki)")
    parser.add_argument("--rows", type=int, default=10_000, help="memory rows, split evenly over the sources")
    parser.add_argument("--n", type=int, default=10, help="number of edits")
    parser.add_argument("--start", type=int, default=0, help="first zsRE record to edit")
    parser.add_argument("--quick", action="store_true", help="EditConfig.quick(): stopping checks every 5 steps")
    parser.add_argument(
        "--act-margin",
        type=float,
        default=None,
        help="activation margin m_a (default: the package default for the activation, 15 for SiLU)",
    )
    parser.add_argument("--beta", type=float, help="memory margin beta (default: the package default)")
    parser.add_argument("--gamma", type=float, help="memory margin gamma (default: the package default)")
    parser.add_argument("--mlc", type=float, help="memory loss weight (default: the package default)")
    parser.add_argument("--alc", type=float, help="activation loss weight (default: the package default)")
    parser.add_argument("--diag", action="store_true", help="print patch pre-activations per edit to stderr")
    parser.add_argument(
        "--loc", type=int, default=0, help="also score locality on the NQ questions of zsRE records 600..600+N"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--data-dir", type=Path, help="folder holding zsre/, counterfact/, wikitext2/")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench", help="memory bank cache")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "gr_margins.jsonl", help="JSON lines file to append to"
    )
    args = parser.parse_args(argv)
    if args.n <= 0 or args.rows <= 0:
        parser.error("--n and --rows must be positive")
    return args


def json_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    parse_sources(args.memory)  # fail on a bad --memory before loading the model
    model, task, layer = load_model()
    all_records = read_json("zsre/zsre_mend_train-1k.json", args.data_dir)
    records = all_records[args.start : args.start + args.n]
    memory, val_memory = memory_banks(model, task, layer, args)
    trainer = PatchTrainer(model, task, edit_config(args), memory=memory, val_memory=val_memory)
    edits = zsre_edits(records)
    locality = (zsre_locality(records), counterfact_locality(args.data_dir))
    before = (score_pairs(model, task, locality[0]), score_pairs(model, task, locality[1]))
    wide = zsre_locality(all_records[600 : 600 + args.loc])
    wide_before = score_pairs(model, task, wide) if wide else []

    started = time.time()
    edit_records, during = run_edits(trainer, edits, args.diag)
    after = final_scores(model, task, edits, locality, before)
    result = {
        "args": json_args(args),
        "act_margin": trainer.act_margin,
        "memory_beta": trainer.beta,
        "memory_gamma": trainer.gamma,
        **during,
        **after,
        "steps_med": upper_median([r.steps for r in edit_records]),
        "neurons": sum(r.neurons for r in edit_records),
        "sec_med": round(upper_median([r.seconds for r in edit_records]), 1),
        "total_s": round(time.time() - started),
    }
    if wide:
        wide_after = score_pairs(model, task, wide)
        result["loc_wide"] = sum(a.prediction == b.prediction for a, b in zip(wide_after, wide_before, strict=True))
        result["loc_wide"] /= len(wide)
    line = json.dumps(result)
    print(line, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
