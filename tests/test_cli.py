"""The ``transformer-patcher`` command line end to end on a tiny GPT-2 saved to disk, with tiny data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformer_patcher.cli import main
from transformer_patcher.data.neighbours import neighbours_of
from transformer_patcher.tuners.edit_log import read_edit_log
from workspace import build_workspace

HEAVY = ("torch", "transformers", "peft", "datasets", "evaluate")  # what --help, --version and info never import


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny GPT-2 + tokenizer, a zsRE-format edit file and a data folder with memory sources."""
    return build_workspace(tmp_path_factory.mktemp("cli"))


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMER_PATCHER_CACHE", str(tmp_path / "cache"))


def _sme_args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        *("sme", "run", "--model", str(ws["model"]), "--data", str(ws["zsre"]), "--data-kind", "zsre"),
        *("--data-dir", str(ws["data"]), "--memory-rows", "300", "--schedule", "quick", "--out", str(out)),
        *("--no-progress", "--suite", "none"),
        *extra,
    ]


def test_sme_run_writes_results_patches_and_plots(workspace: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_sme_args(workspace, out, "--folds", "2", "--eval-every", "1")) == 0
    printed = capsys.readouterr().out
    assert "| T-Patcher |" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert [fold["fold"] for fold in results["folds"]] == [0, 1]
    assert sum(len(fold["records"]) for fold in results["folds"]) == 8
    summary = results["summary"]
    assert summary["edits"] >= 4  # the tiny model gets almost every random answer wrong
    assert summary["SR"] == 1.0 and summary["ER"] == 1.0
    assert summary["locality"] >= 0.75
    assert "| T-Patcher |" in (out / "results.md").read_text()
    for fold in (0, 1):
        patches = out / "patches" / f"fold-{fold}"
        info = json.loads(_run_json(["info", str(patches), "--json"], capsys))
        fold_records = results["folds"][fold]["records"]
        assert info["num_patches"] == sum(r["neurons"] for r in fold_records)
        needed = [r for r in fold_records if r["needed"]]
        assert [e["edit_id"] for e in info["edits"]] == [r["edit_id"] for r in needed if r["neurons"]]
        assert all(e["text"] and e["target"] for e in info["edits"])  # the edit log says what each patch fixes
        assert (out / "heatmaps" / f"fold-{fold}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("metrics.png", "latency.png"):
        assert (out / name).stat().st_size > 1000


def test_resume_skips_finished_folds_and_refuses_to_overwrite(workspace, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_sme_args(workspace, out)) == 0
    first = json.loads((out / "results.json").read_text())
    assert main(_sme_args(workspace, out)) == 2  # the folder already holds a run
    assert "--resume" in capsys.readouterr().err
    assert main(_sme_args(workspace, out, "--resume")) == 0
    assert json.loads((out / "results.json").read_text())["folds"] == first["folds"]
    assert main(_sme_args(workspace, out, "--resume", "--seed", "7")) == 2  # another configuration
    assert "another configuration" in capsys.readouterr().err


def _run_json(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_edit_info_eval_undo_round_trip(workspace: dict[str, Path], tmp_path: Path, capsys) -> None:
    patches = tmp_path / "patches"
    records = json.loads(workspace["zsre"].read_text())
    common = ["--model", str(workspace["model"]), "--patches", str(patches), "--data-dir", str(workspace["data"])]
    common += ["--memory-rows", "300", "--schedule", "quick", "--no-progress"]
    first, second = records[0], records[1]
    assert main(["edit", *common, "--text", first["src"], "--target", first["answers"][0]]) == 0
    requests = tmp_path / "edits.jsonl"
    requests.write_text(json.dumps({"text": second["src"], "target": second["answers"][0]}) + "\n")
    capsys.readouterr()
    assert main(["edit", *common, "--file", str(requests)]) == 0  # a second session extends the folder
    said = capsys.readouterr().out  # which memory, its rows, and the earlier edit it now holds
    assert "memory: zsre from CounterFact-train facts and WikiText-2 in the data folder, raw format" in said
    assert "with 1 earlier edit)" in said

    info = json.loads(_run_json(["info", str(patches), "--json"], capsys))
    assert [e["edit_id"] for e in info["edits"]] == [1, 2]
    assert [e["text"] for e in info["edits"]] == [first["src"], second["src"]]
    assert info["base_model"] and info["num_patches"] >= 2

    evaluation = tmp_path / "eval.json"
    data = ["--data", str(workspace["zsre"]), "--data-kind", "zsre", "--data-dir", str(workspace["data"])]
    patched_args = ["--patches", str(patches), "--out", str(evaluation)]
    assert main(["eval", "--model", str(workspace["model"]), *data, "--max-examples", "2", *patched_args]) == 0
    base, patched = json.loads(evaluation.read_text())
    assert base["model"] == "base" and patched["model"] == "patched"
    assert patched["edit"] == 1.0 and base["edit"] < 1.0
    assert patched["locality_agreement"] == 1.0

    weights = (patches / "adapter_model.safetensors").read_bytes()
    assert main(["undo", str(patches), "99"]) == 2  # unknown id: an error, nothing written
    assert (patches / "adapter_model.safetensors").read_bytes() == weights
    assert main(["undo", str(patches), "1"]) == 0
    info = json.loads(_run_json(["info", str(patches), "--json"], capsys))
    assert [e["edit_id"] for e in info["edits"]] == [2]


PMET_TINY = tuple(
    arg
    for option in ("layers=[0]", "mom2_update_weight=1", "v_num_grad_steps=40", "v_lr=5", "clamp_norm_factor=4")
    for arg in ("--pmet-set", option)
)


def _subject_last(workspace: dict[str, Path], tmp_path: Path) -> Path:
    """The zsRE file with each question's last word as its subject: in a 2-block GPT-2 the write must sit where the
    answer is read, as no later block could carry it there."""
    records = json.loads(workspace["zsre"].read_text())
    path = tmp_path / "zsre-subject-last.json"
    path.write_text(json.dumps([{**r, "subject": r["src"].split()[-1]} for r in records]))
    return path


def test_sme_run_with_pmet_saves_a_weight_delta(workspace: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    data = ("--data", str(_subject_last(workspace, tmp_path)))
    assert main([*_sme_args(workspace, out, "--editor", "memit", *PMET_TINY), *data]) == 0
    assert "| MEMIT (ablation) |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    needed = [r for r in results["folds"][0]["records"] if r["needed"]]
    assert results["editor"] == "MEMIT (ablation)" and len(needed) >= 4
    assert results["summary"]["SR"] >= 0.5  # a 2-block random GPT-2 is a hard case for a closed-form write
    delta = out / "patches" / "fold-0"
    config = json.loads((delta / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELTA" and config["method"] == "memit"
    # one rank-1 write per needed edit, plus one per refine round that wrote a missed fact again (2 rounds at most)
    assert len(needed) <= config["rank"] <= 3 * len(needed)
    info = json.loads(_run_json(["info", str(delta), "--json"], capsys))
    assert info["rank"] == config["rank"] and [e["edit_id"] for e in info["edits"]] == [r["edit_id"] for r in needed]
    assert main(["undo", str(delta), str(needed[0]["edit_id"])]) == 2
    assert "weight delta" in capsys.readouterr().err


def test_batch_run_scores_pmet_batches_and_resumes(workspace: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "batch"
    argv = ["batch", "run", "--model", str(workspace["model"]), "--data", str(_subject_last(workspace, tmp_path))]
    argv += ["--data-kind", "zsre", "--data-dir", str(workspace["data"]), "--cases", "4", "--batch-sizes", "1", "4"]
    argv += ["--editor", "pmet", "memit", *PMET_TINY, "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["editor"], r["batch_size"]): r for r in results["rows"]}
    assert set(rows) == {("unedited", 0), ("PMET", 1), ("PMET", 4), ("MEMIT (ablation)", 1), ("MEMIT (ablation)", 4)}
    assert rows[("PMET", 1)]["batches"] == 4 and rows[("PMET", 4)]["batches"] == 1
    assert {r["mode"] for r in results["rows"][1:]} == {"independent"}
    assert rows[("MEMIT (ablation)", 4)]["efficacy_acc"] > rows[("unedited", 0)]["efficacy_acc"]
    assert "efficacy_score" not in rows[("PMET", 1)]  # zsRE has no true answer to compare probabilities with
    written = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert main(argv) == 0  # everything is done: nothing is recomputed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == written
    assert main([*argv[:-3], "--cases", "3", "--batch-sizes", "1", "--out", str(out), "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_plot_regenerates_from_results(workspace, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_sme_args(workspace, out, "--eval-every", "1")) == 0
    (out / "metrics.png").unlink()
    listed = _run_json(["plot", str(out)], capsys)
    assert str(out / "metrics.png") in listed and (out / "metrics.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sme", "run", "--model", "m", "--data", "nope", "--out", "o"], "not a benchmark name"),
        (["sme", "run", "--model", "m", "--set", "lr", "--out", "o"], "KEY=VALUE"),
        (["sme", "run", "--model", "m", "--set", "lr=-1", "--out", "o"], "lr must be > 0"),
        (["sme", "run", "--model", "m", "--ft-set", "kl_batch=0", "--out", "o"], "kl_batch must be >= 1"),
        (["sme", "run", "--model", "m", "--folds", "0", "--out", "o"], "--folds: expected a positive integer"),
        (["info", "/nonexistent/patches"], "not a patch-set folder"),
        (["plot", "/nonexistent/run"], "results.json"),
        (["sme", "run", "--model", "m", "--data", "missing.json", "--data-kind", "zsre", "--out", "o"], "missing.json"),
        (["sme", "run", "--model", "m", "--prompt-format", "Q: {txt}", "--out", "o"], "not usable"),
        (["sme", "run", "--model", "m", "--prompt-format", "no slot", "--out", "o"], "exactly one {text} slot"),
        (["sme", "run", "--model", "m", "--data", "fever", "--prompt-format", "chat", "--out", "o"], "classifier"),
        (["sme", "run", "--model", "m", "--locality-file", "absent.jsonl", "--out", "o"], "absent.jsonl"),
        (["batch", "run", "--model", "m", "--prompt-format", "chat", "--out", "o"], "patcher editor only"),
        (["eval", "--model", "m"], "--patches DIR"),
        (["eval", "--model", "m", "--patches", "p", "--prompt-format", "chat"], "apply with --data"),
        (["edit", "--model", "m", "--patches", "p", "--file", __file__, "--subject", "x"], "not both"),
        (["edit", "--model", "m", "--patches", "p", "--text", "a", "--target", "b", "--set", "nope=1"], "KEY=VALUE"),
        (["edit", "--model", "m", "--patches", "p", "--text", "a", "--target", "b", "--set", "key_gap=-1"], "key_gap"),
    ],
)
def test_bad_input_is_one_clear_line(argv: list[str], message: str, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_folds_run_in_parallel_under_accelerate(workspace: dict[str, Path], tmp_path: Path) -> None:
    """Two CPU processes split two folds; the main process assembles the same kind of results file."""
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMER_PATCHER_CACHE": str(tmp_path / "cache")}
    command = [*launcher, "-m", "transformer_patcher.cli", *_sme_args(workspace, out, "--folds", "2")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [fold["fold"] for fold in results["folds"]] == [0, 1]
    assert results["summary"]["SR"] == 1.0
    assert done.stdout.count("| T-Patcher |") == 1  # only the main process reports


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(workspace, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = _sme_args(workspace, out)
    first = subprocess.Popen([sys.executable, "-m", "transformer_patcher", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").is_file() or not (out / ".lock").read_text().startswith("pid"):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        assert main([*args, "--resume"]) == 2
        assert first.poll() is None  # the refusal came while the first run held the folder
        assert f"in use by another process (pid {first.pid} on" in capsys.readouterr().err
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((out / "results.json").read_text())["summary"]["edits"] > 0  # the first run was not disturbed


def test_sme_run_reports_the_suite_and_resume_reuses_its_reference(workspace, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = [*_sme_args(workspace, out, "--eval-every", "2", "--max-examples", "4"), "--suite", "small"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Evaluation suite, T-Patcher" in printed and "| unrelated-raw |" in printed
    results = json.loads((out / "results.json").read_text())
    metrics = results["folds"][0]["evaluations"][-1]["metrics"]
    for key in ("unrelated-raw.exact", "neighbours-raw.token", "generation-raw.exact", "perplexity.change"):
        assert key in metrics and key in results["summary"]
    assert "easyedit-rewrite.token" in metrics and "easyedit-locality.token" in metrics
    assert "chat" not in " ".join(metrics)  # the tiny tokenizer has no chat template: raw parts only
    assert "## Evaluation suite" in (out / "results.md").read_text()
    assert (out / "locality.png").stat().st_size > 1000
    reference = out / "checkpoints" / "suite-reference.safetensors"
    saved = reference.read_bytes()
    (out / "folds" / "fold-0.json").unlink()  # pretend the fold was interrupted: resume runs it again
    assert main([*args, "--resume"]) == 0
    assert reference.read_bytes() == saved  # the reference was read back, not recomputed
    again = json.loads((out / "results.json").read_text())["folds"][0]["evaluations"][-1]["metrics"]
    assert {k: v for k, v in again.items() if "." in k} == {k: v for k, v in metrics.items() if "." in k}


def test_eval_scores_a_patch_sets_own_fixes_side_by_side(workspace, tmp_path: Path, capsys) -> None:
    patches = tmp_path / "patches"
    records = json.loads(workspace["zsre"].read_text())
    common = ["--model", str(workspace["model"]), "--patches", str(patches), "--no-progress"]
    edit = ["edit", *common, "--data-dir", str(workspace["data"]), "--memory-rows", "300", "--schedule", "quick"]
    requests = tmp_path / "edits.jsonl"
    lines = [{"text": r["src"], "target": r["answers"][0], "subject": r["subject"]} for r in records[:2]]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main([*edit, "--file", str(requests), "--append-eos"]) == 0
    log = [json.loads(line) for line in (patches / "edits.jsonl").read_text().splitlines()]
    assert [e["prompt_format"] for e in log] == [{"template": "raw", "append_eos": True}] * 2
    assert [e["subject"] for e in log] == [r["subject"] for r in records[:2]]
    capsys.readouterr()

    report = tmp_path / "report.json"
    assert main(["eval", *common, "--suite", "small", "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| edit id | format |" in printed and "| edits |" in printed and "perplexity   base" in printed
    result = json.loads(report.read_text())
    assert [e["fixed"] for e in result["edits"]] == [True, True]
    assert [e["format"] for e in result["edits"]] == ["raw+eos"] * 2
    assert all(e["patched"] == e["target"] for e in result["edits"])  # the fix is written and then generation stops
    assert result["patched"]["edits"]["exact"] == 1.0 and result["base"]["edits"]["exact"] == 0.0
    assert result["base"]["unrelated-raw"] == {"exact": 1.0, "token": 1.0, "n": 100}
    assert 0.0 <= result["patched"]["unrelated-raw"]["exact"] <= 1.0
    assert result["patched"]["neighbours-raw"]["n"] == 2  # one template-filled neighbour per fix (small suite)
    changed = round((1 - result["patched"]["neighbours-raw"]["exact"]) * 2)
    assert len(result["leaks"]) == changed  # each neighbour whose answer changed, with both answers
    asked = {q for r in records[:2] for q in neighbours_of(r["src"], r["subject"], 1)}
    assert all(leak["question"] in asked and leak["base"] != leak["patched"] for leak in result["leaks"])


def test_eval_of_a_patch_set_without_an_edit_log_says_so(workspace, tmp_path: Path, capsys) -> None:
    patches = tmp_path / "patches"
    records = json.loads(workspace["zsre"].read_text())
    common = ["--model", str(workspace["model"]), "--patches", str(patches), "--no-progress"]
    assert main(["edit", *common, "--memory", "none", "--text", records[0]["src"], "--target", "w100"]) == 0
    (patches / "edits.jsonl").unlink()
    assert main(["eval", *common, "--suite", "none"]) == 2
    assert "has no edit log (edits.jsonl)" in capsys.readouterr().err


def test_chat_on_a_tokenizer_without_a_template_changes_nothing(workspace, tmp_path: Path, capsys) -> None:
    patches = tmp_path / "patches"
    args = ["edit", "--model", str(workspace["model"]), "--patches", str(patches), "--memory", "none"]
    assert main([*args, "--text", "w70 w71", "--target", "w80", "--prompt-format", "chat", "--no-progress"]) == 2
    assert "needs a chat template" in capsys.readouterr().err
    assert not patches.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("locality-file", '{"text": "w70 w71"}\n{"question": "w72"}\n', "line 2: field 'text' is missing"),
        ("neighbour-file", '{"text": "w70", "neighbours": ["w71", 3]}\n', "line 1: field 'neighbours' item 1"),
        ("neighbour-file", '{"text": "w70"}\n', "line 1: field 'neighbours' is missing"),
    ],
)
def test_a_bad_suite_file_names_the_file_and_record(workspace, tmp_path: Path, capsys, name, content, message) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "run"
    assert main([*_sme_args(workspace, out), f"--{name}", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err
    assert not out.exists()  # refused before anything was written


def test_a_session_keeps_new_patches_silent_on_earlier_fixes_in_their_own_format(workspace, tmp_path: Path) -> None:
    from transformer_patcher.core.prompts import PromptFormat
    from transformer_patcher.experiments.session import EditSession

    patches = tmp_path / "patches"
    opened = dict(model=str(workspace["model"]), folder=patches, memory="none", schedule="quick", progress=False)
    with EditSession.open(**opened) as session:  # raw: the answer has 2 tokens, so 2 reads
        assert session.edit("w70 w71 w72", "w90 w91").needed
        session.save()
    ended = PromptFormat("raw", append_eos=True)
    with EditSession.open(**opened, prompt_format=ended) as session:  # memory is None: nothing to keep silent on
        assert session.trainer.memory is None
    with EditSession.open(**{**opened, "memory": "zsre"}, data_dir=workspace["data"], prompt_format=ended) as session:
        assert session.trainer.memory.n_appended == 2  # the earlier fix's 2 raw reads, not 3 with an EOS read
        assert session.edit("w73 w74 w75", "w92", subject="w74").needed
        session.save()
    log = [json.loads(line) for line in (patches / "edits.jsonl").read_text().splitlines()]
    assert [e["prompt_format"] for e in log] == [PromptFormat().to_dict(), ended.to_dict()]
    assert "subject" not in log[0] and log[1]["subject"] == "w74"


def test_cli_schedule_names_are_the_editing_modes() -> None:
    """The CLI keeps its own list (it imports no torch at start-up); it must name exactly the modes the runs accept."""
    from transformer_patcher.cli import SCHEDULES
    from transformer_patcher.experiments.sme.experiment import SCHEDULES as RUN_SCHEDULES
    from transformer_patcher.methods.patcher import EditConfig

    assert SCHEDULES == RUN_SCHEDULES
    for name in SCHEDULES:
        EditConfig.mode(name)


def test_version_names_the_installed_version_or_the_packages_own(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    import transformer_patcher
    from transformer_patcher import cli

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"transformer-patcher {importlib.metadata.version('transformer-patcher')}\n"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli, "version", not_installed)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"transformer-patcher {transformer_patcher.__version__}\n"


def test_counts_and_table_cells_are_written_for_people() -> None:
    from transformer_patcher.cli.output import md_row
    from transformer_patcher.core.wording import count

    assert [count(1, "neuron"), count(0, "neuron"), count(1, "patch", "patches"), count(3, "patch", "patches")] == [
        "1 neuron",
        "0 neurons",
        "1 patch",
        "3 patches",
    ]
    assert md_row(["a\nb", "c|d", "e\r\nf", 0.5, True]) == "| a⏎b | c\\|d | e⏎f | 0.500 | True |"


def _plural(n: int, noun: str, plural: str) -> str:
    return f"{n} {noun if n == 1 else plural}"


def test_an_edit_the_model_already_answers_adds_and_saves_nothing(workspace, tmp_path: Path, capsys) -> None:
    patches = tmp_path / "patches"
    text = json.loads(workspace["zsre"].read_text())[0]["src"]
    edit = ["edit", "--model", str(workspace["model"]), "--patches", str(patches), "--memory", "none"]
    edit += ["--text", text, "--target", "w100", "--no-progress"]
    capsys.readouterr()
    assert main(edit) == 0
    first = capsys.readouterr().out
    n = json.loads(_run_json(["info", str(patches), "--json"], capsys))["num_patches"]
    assert f"saved {_plural(n, 'patch', 'patches')} ({n} new) to {patches}/" in first
    written = {path.name: path.stat().st_mtime_ns for path in patches.iterdir()}

    assert main(edit) == 0  # the patched model now answers it
    again = capsys.readouterr().out
    row = next(line for line in again.splitlines() if line.endswith(f" | {text} |"))
    assert row.startswith("| - | True | False | 0 | 0 |")  # its id is not used up: the next fix takes it
    assert f"- the model already answers {text!r} with 'w100': nothing added" in again
    assert "nothing to save: no edit was needed" in again and "saved" not in again
    assert {path.name: path.stat().st_mtime_ns for path in patches.iterdir()} == written  # the folder is untouched

    assert f"patches     {_plural(n, 'neuron', 'neurons')} on " in _run_json(["info", str(patches)], capsys)
    assert _run_json(["undo", str(patches), "1"], capsys) == (
        f"removed edit 1 ({_plural(n, 'neuron', 'neurons')}) from {patches}/\n"
    )


def test_edit_settings_shape_a_new_patch_set_and_are_refused_on_one_made_without(workspace, tmp_path, capsys) -> None:
    patches = tmp_path / "patches"
    first, second = (record["src"] for record in json.loads(workspace["zsre"].read_text())[:2])
    edit = ["edit", "--model", str(workspace["model"]), "--patches", str(patches), "--memory", "none", "--no-progress"]
    assert main([*edit, "--text", first, "--target", "w100", "--set", "gate_threshold=0.9"]) == 0
    assert json.loads((patches / "adapter_config.json").read_text())["gate_threshold"] == 0.9
    written = {path.name: path.stat().st_mtime_ns for path in patches.iterdir()}
    capsys.readouterr()

    assert main([*edit, "--text", second, "--target", "w101", "--set", "gate_threshold=0.8"]) == 2
    assert "made with gate_threshold=0.9; these settings shape a new patch set only" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in patches.iterdir()} == written  # nothing changed

    assert main([*edit, "--text", second, "--target", "w101", "--set", "gate_threshold=0.9"]) == 0  # what it holds
    assert [entry["target"] for entry in read_edit_log(patches)] == ["w100", "w101"]


def test_info_keeps_each_edit_on_one_table_row(workspace, tmp_path: Path, capsys) -> None:
    """Text with line breaks or ``|`` (a template's "Question: ...\\nAnswer:") must not break the markdown table."""
    patches = tmp_path / "patches"
    text = json.loads(workspace["zsre"].read_text())[0]["src"]
    edit = ["edit", "--model", str(workspace["model"]), "--patches", str(patches), "--memory", "none"]
    assert main([*edit, "--text", text, "--target", "w100", "--no-progress"]) == 0
    log = patches / "edits.jsonl"
    entry = json.loads(log.read_text()) | {"text": "Q: a | b\nA:", "target": "one\r\ntwo"}
    log.write_text(json.dumps(entry) + "\n")
    rows = [line for line in _run_json(["info", str(patches)], capsys).splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1 and rows[0].endswith("| Q: a \\| b⏎A: | one⏎two |")


@pytest.mark.parametrize(
    "argv",
    [
        ["--patches", "p", "--no-progress"],
        ["--no-progress", "--patches", "p"],
        ["--data", "zsre", "--no-progress"],
        ["--no-progress", "--data", "zsre", "--patches", "p"],
    ],
)
def test_eval_takes_no_progress_in_both_forms_and_any_order(argv: list[str], monkeypatch, capsys) -> None:
    """``eval`` gained ``--no-progress`` with the patch-set form; an install from before rejects it."""
    from transformer_patcher.experiments.sme import accuracy, patch_set_eval

    asked = []

    def benchmark(*args: object, progress: bool, **options: object) -> list[dict]:
        asked.append(progress)
        return [{"model": "base", "edit": 0.5}]

    def patch_set(*args: object, progress: bool) -> patch_set_eval.PatchSetReport:
        asked.append(progress)
        return patch_set_eval.PatchSetReport(base={}, patched={})

    monkeypatch.setattr(accuracy, "evaluate_benchmark", benchmark)
    monkeypatch.setattr(patch_set_eval, "evaluate_patch_set", patch_set)
    assert main(["eval", "--model", "m", *argv]) == 0
    assert asked == [False]


def test_no_progress_also_silences_the_bars_of_transformers(workspace, tmp_path: Path, capsys) -> None:
    from transformers.utils import logging as hf_logging

    patches = tmp_path / "patches"
    common = ["--model", str(workspace["model"]), "--patches", str(patches)]
    text = json.loads(workspace["zsre"].read_text())[0]["src"]
    assert main(["edit", *common, "--memory", "none", "--text", text, "--target", "w100", "--no-progress"]) == 0
    assert main(["eval", *common, "--suite", "none", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert hf_logging.is_progress_bar_enabled()  # restored for whatever runs next in this process


# ------------------------------------------------------------------ a light start: --help, --version, info
@pytest.fixture(scope="module")
def saved_patches(workspace: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patch set of two fixes with an edit log, made by ``edit``."""
    patches = tmp_path_factory.mktemp("saved") / "patches"
    records = json.loads(workspace["zsre"].read_text())[:2]
    requests = patches.parent / "edits.jsonl"
    requests.write_text("".join(json.dumps({"text": r["src"], "target": r["answers"][0]}) + "\n" for r in records))
    edit = ["edit", "--model", str(workspace["model"]), "--patches", str(patches), "--memory", "none"]
    assert main([*edit, "--schedule", "quick", "--file", str(requests), "--no-progress"]) == 0
    return patches


def _fresh(argv: list[str], module: str | None = None) -> tuple[int, str, list[str]]:
    """Run the CLI on ``argv`` in a fresh interpreter (its ``main``, or ``python -m module``): the exit status,
    stdout, and which of the heavy modules it had imported when it exited."""
    script = (
        "import atexit, json, runpy, sys\n"
        f"atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))\n"
        f"sys.argv[1:] = {argv!r}\n"
    )
    if module is None:
        script += "from transformer_patcher.cli import main\nsys.exit(main())\n"
    else:
        script += f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    return done.returncode, done.stdout, json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["--help"], None),
        (["--version"], None),
        (["sme", "--help"], None),
        (["info", "--help"], None),
        (["--version"], "transformer_patcher"),
        (["--help"], "transformer_patcher.cli"),
    ],
)
def test_help_and_version_import_no_torch(argv: list[str], module: str | None) -> None:
    status, out, heavy = _fresh(argv, module)
    assert status == 0 and out.startswith(("usage: transformer-patcher", "transformer-patcher 0.")), out
    assert heavy == []


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_info_imports_no_torch_and_prints_what_the_library_reads(saved_patches: Path, flags, capsys, monkeypatch):
    status, out, heavy = _fresh(["info", str(saved_patches), *flags])
    assert status == 0 and heavy == []
    from transformer_patcher.cli import info

    monkeypatch.setattr(info, "describe_patch_folder", lambda folder: None)  # the library's reader only
    capsys.readouterr()
    assert main(["info", str(saved_patches), *flags]) == 0
    assert out == capsys.readouterr().out
    assert "| 1 |" in out or '"edit_id": 1' in out


def test_the_torch_free_reader_gives_what_describe_patch_set_gives(saved_patches: Path, tmp_path: Path) -> None:
    from transformer_patcher.cli.patch_folder import describe_patch_folder
    from transformer_patcher.tuners.patcher.patch_set import describe_patch_set

    expected = describe_patch_set(saved_patches).to_dict()
    assert describe_patch_folder(saved_patches) == expected
    assert [e["edit_id"] for e in expected["edits"]] == [1, 2] and expected["edits"][0]["text"]
    assert describe_patch_folder(tmp_path / "absent") is None  # the library's reader says what is wrong


def test_the_torch_free_reader_holds_the_librarys_constants(saved_patches: Path) -> None:
    """What ``cli.patch_folder`` writes down about the files is what the library writes and accepts."""
    from dataclasses import fields

    from safetensors import safe_open
    from transformers.activations import ACT2FN

    from transformer_patcher.cli import patch_folder
    from transformer_patcher.tuners.bounds import file_size_limit
    from transformer_patcher.tuners.patcher.config import PatcherConfig

    config = json.loads((saved_patches / patch_folder.CONFIG_NAME).read_text())
    assert set(config) == set(patch_folder.CONFIG_FIELDS) == {f.name for f in fields(PatcherConfig)}
    defaults = {f.name: f.default for f in fields(PatcherConfig)}
    assert {name: defaults[name] for name in patch_folder.CONFIG_DEFAULTS} == patch_folder.CONFIG_DEFAULTS
    with safe_open(saved_patches / patch_folder.WEIGHTS_NAME, "pt") as weights:
        names = list(weights.keys())
    assert all(name.startswith(patch_folder.PEFT_KEY_PREFIX) for name in names)
    assert {name.rpartition(".")[2] for name in names} == set(patch_folder.PATCH_TENSOR_NAMES)
    assert set(ACT2FN) >= patch_folder.ACTIVATIONS
    for dtype in patch_folder.PATCH_DTYPES:
        PatcherConfig(patch_dtype=dtype)
    assert file_size_limit(0, 0, 0) >= patch_folder.MAX_HEADER_BYTES + 8  # the size argument in patch_folder


def test_the_torch_free_reader_never_accepts_what_the_library_refuses(tmp_path: Path) -> None:
    """Fuzzed adapter files, configs and edit logs: whatever ``describe_patch_folder`` accepts, the library accepts
    and describes the same way; anything else it leaves to the library (None)."""
    from collections import Counter

    from hypothesis import given
    from hypothesis import strategies as st

    from fuzz_files import (
        CONFIG,
        JSON_VALUES,
        WEIGHTS,
        Mutation,
        declared_size_mutations,
        json_mutations,
        patcher_setup,
        safetensors_mutations,
        write_mutation,
    )
    from fuzzing import fuzz_settings
    from transformer_patcher import PatcherError
    from transformer_patcher.cli.patch_folder import describe_patch_folder
    from transformer_patcher.tuners.edit_log import EDIT_LOG
    from transformer_patcher.tuners.patcher.patch_set import describe_patch_set

    setup = patcher_setup(str(tmp_path / "setup"))
    log = [{"edit_id": i, "text": f"w{70 + i}", "target": f"w{80 + i}", "success": True} for i in (1, 2, 3, 4)]
    (setup.folder / EDIT_LOG).write_text("".join(json.dumps(entry) + "\n" for entry in log))
    original = describe_patch_set(setup.folder).to_dict()
    assert describe_patch_folder(setup.folder) == original

    def log_line(entry: int, key: str, value: object) -> Mutation:
        entries = [dict(e) for e in log]
        entries[entry][key] = value
        return Mutation(f"edit log {key}", "".join(json.dumps(e) + "\n" for e in entries).encode())

    plausible = st.sampled_from([1, 0, -1, True, None, 1.0, "w70", "", ["x"], {"a": 1}, 2**63])
    log_mutations = st.builds(
        log_line, st.integers(0, 3), st.sampled_from(["edit_id", "text", "target"]), JSON_VALUES | plausible
    ) | st.binary(max_size=40).map(lambda data: Mutation("edit log bytes", data))
    files = st.one_of(
        st.tuples(st.just(WEIGHTS), safetensors_mutations(setup.weights) | declared_size_mutations(setup.weights)),
        st.tuples(st.just(CONFIG), json_mutations(setup.config, plausible | st.sampled_from(["relu", "float16"]))),
        st.tuples(st.just(EDIT_LOG), log_mutations),
    )
    tally: Counter = Counter()

    @fuzz_settings(150)
    @given(case=files)
    def check(case: tuple[str, Mutation]) -> None:
        name, mutation = case
        folder = setup.copy(str(tmp_path / f"case-{sum(tally.values())}"))
        write_mutation(folder / name, mutation)
        fast = describe_patch_folder(folder)
        try:
            library: object = describe_patch_set(folder).to_dict()
        except (PatcherError, ValueError, OSError, KeyError) as error:
            library = error
        if fast is not None:
            assert library == fast, (mutation.kind, library)
        tally[(name, "read here" if fast is not None else "left to the library")] += 1

    check()
    assert sum(tally.values()) >= 140, tally
    assert tally[(EDIT_LOG, "read here")] and tally[(WEIGHTS, "left to the library")], tally


REGISTERED = (
    "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
    "assert {'PATCHER', 'DELTA'} <= set(PEFT_TYPE_TO_CONFIG_MAPPING) & set(PEFT_TYPE_TO_TUNER_MAPPING)\n"
    "assert not [f for f in sys.meta_path if type(f).__name__ == '_PeftRegistration']  # the hook is gone\n"
)


@pytest.mark.parametrize(
    "script",
    [
        "import sys, transformer_patcher\n"
        f"assert not set({HEAVY!r}) & set(sys.modules), sorted(set({HEAVY!r}) & set(sys.modules))\n"
        "import peft\n",
        "import sys, peft\nimport transformer_patcher\n",
        "import sys, transformer_patcher as tp\n"
        "assert tp.PatcherConfig.__name__ == 'PatcherConfig' and tp.DELTA == 'DELTA'\n"
        "assert set(tp.__all__) == set(tp._EXPORTS) and tp.__version__ == '0.1.0'\n"
        "values = [getattr(tp, name) for name in tp.__all__]\n"
        "assert all(isinstance(v, str) or v.__module__.startswith('transformer_patcher.') for v in values)\n",
        # peft comes half-way through
        "import sys\nfrom transformer_patcher.tuners.patcher.config import PatcherConfig\n",
        "import sys\nfrom transformer_patcher import Patcher\n",
    ],
    ids=["package-then-peft", "peft-then-package", "attribute", "submodule", "Patcher"],
)
def test_the_peft_types_are_registered_whichever_is_imported_first(script: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script + REGISTERED], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_plain_peft_and_transformers_load_a_patch_set_after_a_light_import(workspace, saved_patches: Path) -> None:
    """``import transformer_patcher`` (no peft yet), then stock loaders: the types were registered on the way."""
    script = (
        "import sys, transformer_patcher\n"
        "assert 'peft' not in sys.modules\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model, patches = {str(workspace['model'])!r}, {str(saved_patches)!r}\n"
        "loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), patches)\n"
        "assert type(loaded.peft_config['default']).__name__ == 'PatcherConfig'\n"
        "base = AutoModelForCausalLM.from_pretrained(model)\n"
        "base.load_adapter(patches)\n"
        "assert type(base.peft_config['default']).__name__ == 'PatcherConfig'\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sme_run_patches_the_block_layer_names(workspace: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_sme_args(workspace, out, "--layer", "0", "--max-examples", "2")) == 0
    config = json.loads((out / "patches" / "fold-0" / "adapter_config.json").read_text())
    assert config["layer_index"] == 0 and ".h.0." in config["target_modules"][0]
    assert json.loads((out / "results.json").read_text())["config"]["layer_index"] == 0


def test_a_layer_the_model_lacks_is_one_clear_line_and_writes_nothing(workspace, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_sme_args(workspace, out, "--layer", "9")) == 2
    err = capsys.readouterr().err
    assert "layer_index=9 is out of range" in err and "Traceback" not in err
    assert not out.exists()
