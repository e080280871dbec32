"""Lifelong editing: one long stream per case, measured with the evaluation suite as it goes (issue 15).

Cases (``--cases``; each is one ``sme run``, its folder under ``--runs``):

- ``zsre-raw`` / ``zsre-chat``: SmolLM2-135M-Instruct, all 1,000 records of ``zsre_mend_train-1k.json`` as one
  stream, asked raw and through the chat template; the small suite every 250 edits; ungated, without key views
  (``UNGATED``: the default they ran with, before the subject gate became it; so are ``counterfact`` and
  ``gemma-zsre``);
- ``counterfact``: SmolLM2, the 1,000 cases of ``counterfact-edit-1k.json`` (efficacy = SR, paraphrase = GR,
  neighbourhood = the benchmark's locality); the small suite every 250 edits; ``counterfact-gate4``: the same with
  the subject gate at block 4, its patches still above rule 7's contrasts (``--set gate_layer=4 --set
  gated_contrasts=true``);
- ``zsre-raw-gate4`` / ``zsre-chat-gate4``: ``zsre-raw`` / ``zsre-chat`` with the subject gate at block 4 and 16
  key views (``GATED``), the settings the zsRE dev stream chose, comparing plain cosines (``PLAIN_GATE``, before the
  gate's frame);
- ``gemma-zsre``: Gemma-3-270M (``make gemma``), the first 200 zsRE records, the same defaults;
  ``gemma-zsre-gated``: the same behind the subject gate at ``gate_depth`` 0.15 (block 3 of 18, where SmolLM2's block
  4 is) in its frame, otherwise ``GATED``; ``gemma-zsre-default``: the same 200 with today's default (``WHITEN``,
  rules 16-17), nothing tuned on Gemma;
- ``zsre-raw-default`` / ``zsre-chat-default``: the same 1,000-record streams with today's default for causal LMs
  (``DEFAULT``: the subject gate at ``gate_depth`` 0.15 in its frame, 16 key views), the small suite every 100 edits;
- ``zsre-raw-weak`` / ``zsre-chat-weak``: the first 400 raw / 200 chat records of those streams with rules 14-15
  (``weak_lead`` 2, ``gated_answer_gate`` 0), the default since, beside the two curves above;
  ``zsre-raw-weak-1k`` / ``zsre-chat-weak-1k``: the whole 1,000-record streams with those rules; ``zsre-raw-rows-1k`` /
  ``zsre-chat-rows-1k``: the same with rule 16 (``gated_edit_rows``); ``zsre-raw-whiten-1k``: the raw one with rule 17
  (``whiten_edit_rows`` False), the small suite every 250 edits; ``counterfact-default``: the CounterFact stream
  with that default (``WHITEN``), the small suite every 100 edits;
- ``zsre-raw-subject-1k`` / ``zsre-chat-subject-1k``: the two 1,000-record zsRE streams with rules 18-19 (``SUBJECT``:
  the gate also reads the subject named alone, and the first answer token's views include subject-first rewordings),
  the small suite every 250 edits; ``gemma-zsre-subject``: the first 200 on Gemma-3-270M with the same, nothing tuned on
  Gemma; ``counterfact-relation``: the CounterFact stream with rule 20 too (``RELATION``: the views word the edit's
  relation as CounterFact-train does), the small suite every 250 edits;
- ``fever``: MiniLM-L6 fine-tuned on ``paper_dev`` by ``examples/fever/run.py``, one stream over FEVER's whole edit
  half (ER, TrainR, TestR);
- ``zsre-raw-faithful``: the faithful mode (the paper's algorithm) on the first 100 records of ``zsre-raw``'s stream.

The full suite (500 questions per format, 2 neighbours per edit, 50k tokens of perplexity) costs about 5 minutes
per evaluation at 1,000 edits on one core, so the long streams use the small one (100 questions per format, 1
neighbour per edit, 8k tokens). Each record holds what the issue asks for: ``case, model, format, edits, SR, ER, GR,
locality_unrelated, locality_neighbour, free_generation, perplexity_change, command`` (the two locality figures and
free generation are the worst of the raw and chat parts; each is also given per format under ``suite``), plus
EasyEdit's token-level ``rel``/``gen``/``loc`` and the curve at every evaluation, also drawn to
``docs/img/lifelong-CASE.png``. ``--report`` rebuilds the records and plots from finished runs.

    python bench/lifelong.py --cases zsre-raw zsre-chat --out bench/results/lifelong.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformer_patcher.experiments.plots import metrics_curve
from transformer_patcher.experiments.sme.experiment import SUITE_CURVES, ExperimentConfig, run_experiment

ZSRE = "zsre/zsre_mend_train-1k.json"
PLOTS = Path(__file__).resolve().parents[1] / "docs" / "img"
SUITE_PARTS = ("unrelated", "neighbours", "subject", "generation")
# The gate at block 4 and 16 key views, as chosen on the zsRE dev stream, run before gated patches' later answer tokens
# dropped the running-text contexts and took the views (gated_contexts, gated_views).
GATED = {"gate_layer": 4, "key_views": 16, "gated_contexts": True, "gated_views": False}
# The streams run before the gate became the default: ungated, no key views; and the gated ones before its frame.
UNGATED = {"gate_depth": None, "key_views": 0}
PLAIN_GATE = {"gate_frame": False}
# Today's default for causal LMs, spelled out so the record keeps its meaning if the default moves again.
DEFAULT = {"gate_depth": 0.15, "key_views": 16, "gate_frame": True}
# ... and rules 14-15 (weak reads get patches; a gated later answer token fires from its threshold), the default since
WEAK = {**DEFAULT, "weak_lead": 2.0, "gated_answer_gate": 0.0}
# ... and rule 16 (a gated patch stays below only the earlier edits' rows its gate opens on)
ROWS = {**WEAK, "gated_edit_rows": True}
# Every case ran before rule 17, with the edits' rows counted in the keys' statistics, but the one that says otherwise
COUNTED = {"whiten_edit_rows": True}
# ... rule 17 (keys whitened by the built memory's statistics, not the edits' rows too), the default since
WHITEN = {**ROWS, "whiten_edit_rows": False}
# ... rules 18-19 (the gate also reads the subject named alone; subject-first views of the first answer token)
SUBJECT = {**WHITEN, "bare_subject": True, "subject_first_views": True}
# ... and rule 20 (the views also word the edit's relation as CounterFact-train does)
RELATION = {**SUBJECT, "relation_views": True}
# Every case ran without the rules that came after it: before rules 18-19, and before rule 20
BEFORE_SUBJECT = {"bare_subject": False, "subject_first_views": False, "relation_views": False}


@dataclass(frozen=True)
class Case:
    model: str
    data: str
    prompt_format: str = "raw"
    max_examples: int | None = None
    schedule: str = "default"
    eval_every: int = 100
    options: dict[str, Any] = field(default_factory=dict)
    edit: dict[str, Any] = field(default_factory=dict)  # EditConfig overrides (``sme run --set``)


CASES = {
    "zsre-raw": Case("smollm2-135m", ZSRE, eval_every=250, options={"suite": "small"}, edit=UNGATED),
    "zsre-chat": Case("smollm2-135m", ZSRE, "chat", eval_every=250, options={"suite": "small"}, edit=UNGATED),
    "counterfact": Case("smollm2-135m", "counterfact", eval_every=250, options={"suite": "small"}, edit=UNGATED),
    "counterfact-gate4": Case(
        "smollm2-135m",
        "counterfact",
        eval_every=250,
        options={"suite": "small"},
        # before gated patches dropped the contrasts and contexts, and before the frame
        edit={"gate_layer": 4, "gated_contrasts": True, "gated_contexts": True, **PLAIN_GATE},
    ),
    "zsre-raw-gate4": Case(
        "smollm2-135m", ZSRE, eval_every=250, options={"suite": "small"}, edit={**GATED, **PLAIN_GATE}
    ),
    "zsre-chat-gate4": Case(
        "smollm2-135m", ZSRE, "chat", eval_every=250, options={"suite": "small"}, edit={**GATED, **PLAIN_GATE}
    ),
    "gemma-zsre": Case("gemma3-270m", ZSRE, max_examples=200, options={"suite": "small"}, edit=UNGATED),
    "gemma-zsre-gated": Case(
        "gemma3-270m",
        ZSRE,
        max_examples=200,
        options={"suite": "small"},
        edit={**GATED, "gate_layer": None, "gate_depth": 0.15},
    ),
    # today's default (rules 16-17) on Gemma, no per-model tuning
    "gemma-zsre-default": Case("gemma3-270m", ZSRE, max_examples=200, options={"suite": "small"}, edit=WHITEN),
    "fever": Case("minilm-l6", "fever", options={"suite": "none"}),  # run by examples/fever/run.py (see fever_run)
    "zsre-raw-default": Case("smollm2-135m", ZSRE, options={"suite": "small"}, edit=DEFAULT),
    "zsre-chat-default": Case("smollm2-135m", ZSRE, "chat", options={"suite": "small"}, edit=DEFAULT),
    # the first records of the same streams with rules 14-15, beside the curves of the two cases above
    "zsre-raw-weak": Case("smollm2-135m", ZSRE, max_examples=400, options={"suite": "small"}, edit=WEAK),
    "zsre-chat-weak": Case("smollm2-135m", ZSRE, "chat", max_examples=200, options={"suite": "small"}, edit=WEAK),
    "zsre-raw-weak-1k": Case("smollm2-135m", ZSRE, options={"suite": "small"}, edit=WEAK),
    "zsre-chat-weak-1k": Case("smollm2-135m", ZSRE, "chat", options={"suite": "small"}, edit=WEAK),
    "zsre-raw-rows-1k": Case("smollm2-135m", ZSRE, options={"suite": "small"}, edit=ROWS),
    "zsre-chat-rows-1k": Case("smollm2-135m", ZSRE, "chat", options={"suite": "small"}, edit=ROWS),
    "zsre-raw-whiten-1k": Case("smollm2-135m", ZSRE, eval_every=250, options={"suite": "small"}, edit=WHITEN),
    "zsre-chat-whiten-1k": Case("smollm2-135m", ZSRE, "chat", eval_every=250, options={"suite": "small"}, edit=WHITEN),
    # today's default (rules 16-17) on the CounterFact stream, the small suite every 100 edits
    "counterfact-default": Case("smollm2-135m", "counterfact", options={"suite": "small"}, edit=WHITEN),
    # today's default (rules 18-19) on the two zsRE streams and on Gemma, the small suite every 250 / 100 edits
    "zsre-raw-subject-1k": Case("smollm2-135m", ZSRE, eval_every=250, options={"suite": "small"}, edit=SUBJECT),
    "zsre-chat-subject-1k": Case(
        "smollm2-135m", ZSRE, "chat", eval_every=250, options={"suite": "small"}, edit=SUBJECT
    ),
    "gemma-zsre-subject": Case("gemma3-270m", ZSRE, max_examples=200, options={"suite": "small"}, edit=SUBJECT),
    # rule 20 on the CounterFact stream, the small suite every 250 edits
    "counterfact-relation": Case(
        "smollm2-135m", "counterfact", eval_every=250, options={"suite": "small"}, edit=RELATION
    ),
    "zsre-raw-faithful": Case("smollm2-135m", ZSRE, max_examples=100, schedule="faithful", options={"suite": "small"}),
}


def config_for(case: Case, data_dir: Path) -> ExperimentConfig:
    data = str(data_dir / case.data) if case.data == ZSRE else case.data
    return ExperimentConfig(
        model=case.model,
        data=data,
        data_kind="zsre" if case.data == ZSRE else None,
        max_examples=case.max_examples,
        schedule=case.schedule,
        prompt_format=case.prompt_format,
        eval_every=case.eval_every,
        data_dir=str(data_dir),
        suite=case.options.get("suite", "full"),
        edit_options={**COUNTED, **BEFORE_SUBJECT, **case.edit},
    )


def command_for(config: ExperimentConfig, out: Path) -> str:
    """The ``transformer-patcher sme run`` command that runs ``config`` (what a reader re-runs)."""
    args = ["transformer-patcher", "sme", "run", "--model", config.model, "--data", config.data]
    if config.data_kind:
        args += ["--data-kind", config.data_kind]
    if config.max_examples:
        args += ["--max-examples", str(config.max_examples)]
    if config.schedule != "default":
        args += ["--schedule", config.schedule]
    if config.prompt_format != "raw":
        args += ["--prompt-format", config.prompt_format]
    args += ["--eval-every", str(config.eval_every), "--suite", config.suite, "--data-dir", str(config.data_dir)]
    for key, value in config.edit_options.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join([*args, "--out", str(out)])


def fever_args(out: Path, data_dir: Path) -> list[str]:
    """The arguments of ``examples/fever/run.py`` for the FEVER case (classifier, then one T-Patcher stream)."""
    args = ["--editors", "patcher", "--folds", "1", "--max-examples", "100000", "--data-dir", str(data_dir)]
    return [*args, "--out", str(out), "--threads", "1", "--no-progress"]


def fever_run(out: Path, data_dir: Path) -> dict[str, Any]:
    """FEVER needs its classifier first: ``examples/fever/run.py`` fine-tunes MiniLM-L6 on ``paper_dev`` (the paper's
    f_0), then streams the whole edit half once with T-Patcher."""
    script = Path(__file__).resolve().parents[1] / "examples" / "fever" / "run.py"
    resume = ["--resume"] if (out / "classifier").is_dir() else []
    subprocess.run([sys.executable, str(script), *fever_args(out, data_dir), *resume], check=True)
    return json.loads((out / "patcher" / "results.json").read_text())


def stopped_results(out: Path) -> dict[str, Any] | None:
    """A stopped run's results as far as its checkpoint goes: the last evaluation as the summary (``stopped_at``)."""
    checkpoint = out / "checkpoints" / "fold-0.json"
    if not checkpoint.is_file():
        return None
    state = json.loads(checkpoint.read_text())["state"]
    evaluations = state["result"]["evaluations"] if "result" in state else state["evaluations"]
    if not evaluations:
        return None
    last = evaluations[-1]
    needed = [r for r in state["records"] if r["needed"]][: last["edits"]]
    seconds = sorted(r["seconds"] for r in needed)
    summary = {**last["metrics"], "edits": last["edits"], "stopped_at": last["edits"]}
    summary["seconds_per_edit"] = sum(seconds) / len(seconds) if seconds else None
    return {"summary": summary, "folds": [{"evaluations": evaluations}]}


def record(name: str, case: Case, results: dict[str, Any], command: str, seconds: float) -> dict[str, Any]:
    """One record of ``lifelong.json`` from a run's ``results.json``."""
    summary = results["summary"]
    worst = lambda part, measure: min(  # noqa: E731
        (summary[f"{part}-{fmt}.{measure}"] for fmt in ("raw", "chat") if f"{part}-{fmt}.{measure}" in summary),
        default=None,
    )
    curve = [
        {"edits": e["edits"], **{k: v for k, v in e["metrics"].items() if not k.endswith(".n")}}
        for e in results["folds"][0]["evaluations"]
    ]
    return {
        "case": name,
        "model": case.model,
        "format": case.prompt_format,
        "schedule": case.schedule,
        "edits": summary["edits"],
        "stopped_at": summary.get("stopped_at"),  # a stream stopped for CPU time: its last evaluation
        "SR": summary["SR"],
        "ER": summary.get("ER"),
        "GR": summary.get("GR"),
        "locality_unrelated": worst("unrelated", "exact"),
        "locality_neighbour": worst("neighbours", "exact"),
        "locality_subject": worst("subject", "exact"),  # other questions about the edits' subjects (newer runs)
        "free_generation": worst("generation", "token"),
        "perplexity_change": summary.get("perplexity.change"),
        "locality": summary.get("locality"),
        "TrainR": summary.get("TrainR"),
        "TestR": summary.get("TestR"),
        "easyedit": {
            "rel": summary.get("easyedit-rewrite.token"),
            "gen": summary.get("easyedit-rephrase.token"),
            "loc": summary.get("easyedit-locality.token"),
        },
        "suite": {k: v for k, v in summary.items() if k.split("-")[0] in SUITE_PARTS and not k.endswith(".n")},
        "seconds_per_edit": summary.get("seconds_per_edit"),
        "run_seconds": round(seconds, 1),
        "curve": curve,
        "command": command,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--runs", type=Path, default=Path("runs/lifelong"), help="one sme run folder per case")
    parser.add_argument("--out", type=Path, default=Path("bench/results/lifelong.json"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rebuild records and plots from finished runs")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        case = CASES[name]
        config = config_for(case, args.data_dir)
        out = args.runs / name
        started = time.perf_counter()
        done = out / "patcher" / "results.json" if name == "fever" else out / "results.json"
        if name == "fever":
            command = shlex.join(["python", "examples/fever/run.py", *fever_args(out, args.data_dir)])
        else:
            command = command_for(config, out)
        if args.report:
            results = json.loads(done.read_text()) if done.is_file() else stopped_results(out)
            if results is None:
                continue
            earlier = json.loads(args.out.read_text())["records"] if args.out.is_file() else []
            seconds = next((r["run_seconds"] for r in earlier if r["case"] == name), 0.0)
        elif name == "fever":
            results = fever_run(out, args.data_dir)
            seconds = time.perf_counter() - started
        else:
            results = run_experiment(config, out, resume=(out / "config.json").is_file(), progress=not args.no_progress)
            seconds = time.perf_counter() - started
        row = record(name, case, results, command, seconds)
        if len(row["curve"]) > 1:  # a curve needs two evaluations (FEVER has only the final one)
            PLOTS.mkdir(parents=True, exist_ok=True)
            metrics = ("SR", "GR", "ER", "TestR", *SUITE_CURVES)
            metrics_curve(results, PLOTS / f"lifelong-{name}.png", metrics, title=f"{name}: {case.model}, one stream")
        args.runs.mkdir(parents=True, exist_ok=True)
        with open(args.runs / "lifelong.lock", "w") as lock:  # runs of other cases may write beside this one
            fcntl.flock(lock, fcntl.LOCK_EX)
            stored = json.loads(args.out.read_text()) if args.out.is_file() else {"records": []}
            stored["records"] = [r for r in stored["records"] if r["case"] != name] + [row]
            stored["records"].sort(key=lambda r: list(CASES).index(r["case"]))
            args.out.write_text(json.dumps(stored, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "suite")}))


if __name__ == "__main__":
    main()
