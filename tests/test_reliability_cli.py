"""Issue 17, items 6 and 7: every bad command line is one ``error:`` line with exit status 2 that leaves nothing
behind (no lock, no ``.tmp``, no staging folder), and text read from files cannot act on the terminal or forge
lines and table rows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transformer_patcher.cli import main
from transformer_patcher.cli.output import md_row, one_line
from workspace import build_workspace

HUGE = str(2**70)  # 1180591620717411303424: no int64 holds it
# What a terminal acts on: C0 controls but the line break, DEL, C1 controls, Unicode line breaks, bidi controls.
CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT-2 workspace plus a saved patch set of one fix (``patches``)."""
    ws = build_workspace(tmp_path_factory.mktemp("reliability"))
    patches = ws["root"] / "patches"
    text = json.loads(ws["zsre"].read_text())[0]["src"]
    edit = ["edit", "--model", str(ws["model"]), "--patches", str(patches), "--memory", "none", "--no-progress"]
    assert main([*edit, "--schedule", "quick", "--text", text, "--target", "w100"]) == 0
    return ws | {"patches": patches}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMER_PATCHER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _listing(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], folder: Path, *expected: str) -> str:
    """Run ``argv``: exit status 2, one error line naming ``expected``, and ``folder`` exactly as it was."""
    before = _listing(folder)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("transformer-patcher: error: ") and err.count("\n") == 1, err
    assert all(text in err for text in expected), err
    assert "Traceback" not in err and not CONTROLS.search(captured.out + err)
    assert _listing(folder) == before  # no lock, no .tmp, no staging folder, no half-made output
    return err


def _copy_patches(workspace: dict[str, Path], destination: Path) -> Path:
    shutil.copytree(workspace["patches"], destination)
    return destination


# ------------------------------------------------------------------------------------ item 6: counts and ids
_EDIT = ["edit", "--model", "m", "--patches", "p", "--text", "a", "--target", "b"]
_SME = ["sme", "run", "--model", "m", "--out", "o"]
_BATCH = ["batch", "run", "--model", "m", "--out", "o"]
_EVAL = ["eval", "--model", "m", "--patches", "p"]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        ([*_EDIT, "--memory-rows", "0"], "--memory-rows"),
        ([*_EDIT, "--memory-rows", "-5"], "--memory-rows"),
        ([*_EDIT, "--memory-rows", HUGE], "--memory-rows"),
        ([*_EDIT, "--question-rows", "-1"], "--question-rows"),
        ([*_SME, "--memory-rows", "0"], "--memory-rows"),
        ([*_SME, "--question-rows", "-1"], "--question-rows"),
        ([*_SME, "--validation-rows", "0"], "--validation-rows"),
        ([*_SME, "--batch-size", "0"], "--batch-size"),
        ([*_SME, "--max-examples", "-3"], "--max-examples"),
        ([*_SME, "--folds", "0"], "--folds"),
        ([*_SME, "--eval-every", "0"], "--eval-every"),
        ([*_SME, "--neighbours", "-1"], "--neighbours"),
        ([*_BATCH, "--cases", "0"], "--cases"),
        ([*_BATCH, "--batch-sizes", "1", "0"], "--batch-sizes"),
        ([*_BATCH, "--memory-rows", "-5"], "--memory-rows"),
        ([*_EVAL, "--batch-size", "0"], "--batch-size"),
        ([*_EVAL, "--batch-size", "-1"], "--batch-size"),
        ([*_EVAL, "--neighbours", "-2"], "--neighbours"),
        (["eval", "--model", "m", "--data", "zsre", "--max-examples", "0"], "--max-examples"),
        (["eval", "--model", "m", "--data", "zsre", "--batch-size", "x"], "--batch-size"),
        (["undo", "p", "0"], "edit_id"),
        (["undo", "p", "-1"], "edit_id"),
        (["undo", "p", HUGE], "edit_id"),
        (["undo", "p", str(2**63)], "edit_id"),
    ],
)
def test_counts_and_ids_out_of_range_are_refused_by_the_parser(argv, option, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _refused(argv, capsys, tmp_path, f"argument {option}: expected ")


@pytest.mark.parametrize(
    "argv",
    [
        [*_EDIT, "--memory", "zsre"],
        [*_SME, "--data", "zsre"],
        [*_BATCH, "--data", "counterfact"],
        ["eval", "--model", "m", "--data", "zsre"],
    ],
)
def test_a_missing_data_dir_is_refused_not_replaced(argv: list[str], capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _refused([*argv, "--data-dir", "no-such-folder"], capsys, tmp_path, "--data-dir", "'no-such-folder'")


def test_a_missing_data_dir_given_to_the_library_does_not_fall_back(tmp_path: Path) -> None:
    from transformer_patcher.data.benchmarks import generation_memory
    from transformer_patcher.data.loaders import DataDirError, find_data_file

    with pytest.raises(DataDirError, match="no-such-folder"):
        find_data_file("wikitext2/valid.txt", tmp_path / "no-such-folder")
    with pytest.raises(DataDirError):  # not the embedded sample, as a missing file in a real folder gives
        generation_memory(tmp_path / "no-such-folder")


@pytest.mark.parametrize("command", ["edit", "sme", "batch"])
@pytest.mark.parametrize("model", ["absent", "config-only"])
def test_a_model_that_cannot_load_is_refused_before_any_lock(workspace, command, model, capsys, tmp_path) -> None:
    folder = tmp_path / model
    if model == "config-only":  # a folder with a config.json but no weights: the config alone passes AutoConfig
        folder.mkdir()
        shutil.copy(workspace["model"] / "config.json", folder)
    out = tmp_path / "out"
    out.mkdir()  # an existing output folder: a lock taken in it would stay behind
    data = ["--data", str(workspace["zsre"]), "--data-kind", "zsre", "--out", str(out), "--no-progress"]
    argv = {
        "edit": ["edit", "--model", str(folder), "--patches", str(out / "p"), "--text", "a", "--target", "w1"],
        "sme": ["sme", "run", "--model", str(folder), *data, "--suite", "none"],
        "batch": ["batch", "run", "--model", str(folder), *data, "--cases", "2", "--batch-sizes", "1"],
    }[command]
    _refused(argv, capsys, tmp_path, f"cannot load the model {str(folder)!r}")


def test_evaluate_benchmark_refuses_a_batch_size_below_one() -> None:
    from transformer_patcher.experiments.sme.accuracy import evaluate_benchmark

    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_benchmark("m", "zsre", batch_size=0)


def test_a_fever_eval_with_an_empty_edit_set_is_refused(workspace, capsys, tmp_path: Path) -> None:
    """paper_test holds one claim, so the edit stream (half of it) is empty: nothing to divide by."""
    fever = tmp_path / "data" / "fever"
    fever.mkdir(parents=True)
    claims = [{"claim": f"w{70 + i} w{80 + i}", "label": ("SUPPORTS", "REFUTES")[i % 2]} for i in range(4)]
    (fever / "paper_dev.jsonl").write_text("".join(json.dumps(c) + "\n" for c in claims[:3]))
    (fever / "paper_test.jsonl").write_text(json.dumps(claims[3]) + "\n")
    argv = ["eval", "--model", str(workspace["model"]), "--data", "fever", "--data-dir", str(tmp_path / "data")]
    _refused([*argv, "--no-progress"], capsys, tmp_path, "fever: the benchmark has no edit examples")


def test_eval_out_on_an_existing_folder_is_refused_before_any_work(workspace, capsys, tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    argv = ["eval", "--model", str(workspace["model"]), "--patches", str(workspace["patches"]), "--suite", "none"]
    _refused([*argv, "--out", str(tmp_path / "results")], capsys, tmp_path, "argument --out:", "is a folder")
    (tmp_path / "file").write_text("")
    _refused([*argv, "--out", str(tmp_path / "file" / "x.json")], capsys, tmp_path, "is a file, not a folder")


def test_undo_of_the_largest_int64_id_is_a_clear_error(workspace, capsys, tmp_path: Path) -> None:
    patches = _copy_patches(workspace, tmp_path / "patches")
    weights = (patches / "adapter_model.safetensors").read_bytes()
    assert main(["undo", str(patches), str(2**63 - 1)]) == 2
    err = capsys.readouterr().err
    assert f"no patches for edit id {2**63 - 1}" in err and err.count("\n") == 1
    assert (patches / "adapter_model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    ("option", "make", "message"),
    [
        ("--file", lambda path: path.mkdir(), "argument --file: 'given' is a folder"),
        ("--file", lambda path: None, "argument --file: 'given' is not a file"),
        ("--patches", lambda path: path.write_text("x"), "argument --patches: 'given' is a file, not a folder"),
    ],
)
def test_edit_refuses_a_wrong_kind_of_path_before_loading(option, make, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make(tmp_path / "given")
    given = ["--patches", "p", "--file", "given"] if option == "--file" else ["--patches", "given", "--text", "a"]
    _refused(["edit", "--model", "m", *given, "--target", "b"], capsys, tmp_path, message)


def test_edit_refuses_patches_under_a_file_before_loading(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    argv = ["edit", "--model", "m", "--patches", "file/sub", "--text", "a", "--target", "b"]
    _refused(argv, capsys, tmp_path, "argument --patches: 'file/sub': 'file' is a file, not a folder")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda entry: entry.pop("text"), "line 1: field 'text' is missing"),
        (lambda entry: entry.pop("target"), "line 1: field 'target' is missing"),
        (lambda entry: entry.update(text=["a"]), "line 1: field 'text' is a list, not text"),
    ],
)
@pytest.mark.parametrize("command", ["edit", "eval"])
def test_an_edit_log_line_without_its_fields_names_file_line_and_field(
    workspace, command, change, message, capsys, tmp_path: Path
) -> None:
    patches = _copy_patches(workspace, tmp_path / "patches")
    log = patches / "edits.jsonl"
    entry = json.loads(log.read_text())
    change(entry)
    log.write_text(json.dumps(entry) + "\n")
    common = ["--model", str(workspace["model"]), "--patches", str(patches), "--no-progress"]
    extra = ["--memory", "none", "--text", "w70 w71", "--target", "w80"] if command == "edit" else ["--suite", "none"]
    _refused([command, *common, *extra], capsys, tmp_path, f"{log}: {message}")


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("transformer-patcher")
    for argv in (
        ["edit", "--model", str(tmp_path / "absent"), "--patches", "p", "--text", "a", "--target", "b"],
        ["undo", "p", HUGE],
    ):
        done = subprocess.run([str(script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("transformer-patcher: error: ") and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- item 7: untrusted text shown
def test_one_line_shows_control_characters_instead_of_obeying_them() -> None:
    assert one_line("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert one_line("\x9b31m\x07\x00\x7f") == "\\x9b31m\\x07\\x00\\x7f"
    assert one_line("x\r\ny\nz\rw") == "x⏎y⏎z⏎w"
    assert one_line("\u202eevil\u2028") == "\\u202eevil\\u2028"
    assert one_line("plain, ünïcode ✓") == "plain, ünïcode ✓"
    assert (
        md_row(["a|b\x1b]0;title\x07", "q\n| 9 | forged |"]) == "| a\\|b\\x1b]0;title\\x07 | q⏎\\| 9 \\| forged \\| |"
    )


EVIL = "\x1b[2J\x1b]0;pwned\x07 w70 | forged |\n| 9 | 9 | x | y |\r\x9b31m\u202e"


def _assert_safe(out: str, rows: int) -> None:
    assert not CONTROLS.search(out), repr(out)
    assert sum(line.startswith("| ") for line in out.splitlines()) == rows, out  # no forged table row


def test_info_shows_untrusted_text_escaped(workspace, capsys, tmp_path: Path) -> None:
    patches = _copy_patches(workspace, tmp_path / "p\x1b[2J\nforged")
    log = patches / "edits.jsonl"
    log.write_text(json.dumps(json.loads(log.read_text()) | {"text": EVIL, "target": EVIL}) + "\n")
    config = patches / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": EVIL}))
    capsys.readouterr()
    assert main(["info", str(patches)]) == 0
    out = capsys.readouterr().out
    _assert_safe(out, rows=2)  # the header and the one edit
    assert "patch set   " + str(tmp_path) + "/p\\x1b[2J⏎forged\n" in out
    assert "\nbase model  \\x1b[2J\\x1b]0;pwned\\x07 w70 | forged |⏎| 9 |" in out


def test_edit_and_eval_show_untrusted_text_escaped(workspace, capsys, tmp_path: Path) -> None:
    patches = tmp_path / "patches"
    common = ["--model", str(workspace["model"]), "--patches", str(patches), "--no-progress"]
    capsys.readouterr()
    assert main(["edit", *common, "--memory", "none", "--schedule", "quick", "--text", EVIL, "--target", "w100"]) == 0
    _assert_safe(capsys.readouterr().out, rows=2)
    assert main(["eval", *common, "--suite", "none"]) == 0
    out = capsys.readouterr().out
    _assert_safe(out, rows=2 + 3)  # the fixes' table and the parts' (edits, easyedit-rewrite)
    assert "\\x1b[2J\\x1b]0;pwned\\x07 w70 \\| forged \\|⏎\\| 9" in out


def test_error_lines_show_untrusted_text_escaped(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["sme", "run", "--model", "m", "--data", "x\x1b[2J\n.json", "--data-kind", "zsre", "--out", "o"]
    _refused(argv, capsys, tmp_path, "dataset file not found: x\\x1b[2J⏎.json")
