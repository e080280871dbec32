"""One writer per output folder: a second run is refused with the holder's pid; a killed holder leaves no stale lock."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from transformer_patcher.cli import main
from transformer_patcher.core.errors import FolderLockedError
from transformer_patcher.core.folder_lock import folder_lock

HOLD = (
    "import sys, time; from transformer_patcher.core import folder_lock\n"
    "with getattr(folder_lock, sys.argv[2])(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n"
)


def hold_in_another_process(folder: Path, lock: str = "folder_lock") -> subprocess.Popen:
    command = [sys.executable, "-c", HOLD, str(folder), lock]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    holder = hold_in_another_process(tmp_path / "run")
    try:
        with (
            pytest.raises(FolderLockedError, match=rf"in use by another process \(pid {holder.pid} on "),
            folder_lock(tmp_path / "run"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = hold_in_another_process(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    with folder_lock(tmp_path / "run"):  # the kernel dropped the flock with the process
        assert (tmp_path / "run" / ".lock").is_file()


def test_lock_is_per_rank_and_released_on_exit(tmp_path: Path) -> None:
    with (
        folder_lock(tmp_path / "run"),
        folder_lock(tmp_path / "run", rank=1),  # another rank of the same run: its own lock
        pytest.raises(FolderLockedError),
        folder_lock(tmp_path / "run"),
    ):
        pass
    with folder_lock(tmp_path / "run"):  # released: taken again at once
        pass


def test_a_folder_created_for_the_lock_alone_is_removed(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "run"):
        pass
    assert not (tmp_path / "run").exists()


def test_a_folder_that_existed_is_kept(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with folder_lock(tmp_path / "run"):
        (tmp_path / "run" / "results.json").write_text("{}")
    assert (tmp_path / "run").is_dir()


def test_edit_and_undo_refuse_a_patch_set_another_session_holds(tmp_path: Path, capsys) -> None:
    patches, model = tmp_path / "patches", tmp_path / "model"
    tiny = GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16, n_positions=8)
    GPT2LMHeadModel(tiny).save_pretrained(model)  # a model that resolves; the lock refuses before it is loaded
    holder = hold_in_another_process(patches, "sibling_lock")
    try:
        edit = ["edit", "--model", str(model), "--patches", str(patches), "--text", "w9 w10", "--target", "w11"]
        assert main(edit) == 2
        assert f"{patches} is in use by another process (pid {holder.pid}" in capsys.readouterr().err
        assert main(["undo", str(patches), "1"]) == 2
        assert "in use by another process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert not patches.exists()  # refused before anything was written
