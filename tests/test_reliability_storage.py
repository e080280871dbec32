"""Patch-set storage under crashes and hostile folders (issue 17): a SIGKILL between the fallback swap's two renames
loses no edit, links are never followed into a patch set, and a FIFO never hangs a reader."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crash_campaign import CHILD, child_env
from fuzz_files import deadline
from transformer_patcher.cli import main
from transformer_patcher.core import atomic
from transformer_patcher.core.atomic import FORCE_FALLBACK_ENV, recover_folder, replace_folder_atomic
from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.experiments.session import EditSession
from transformer_patcher.tuners.patcher.patch_set import describe_patch_set, read_edit_log, remove_edit_from_files
from workspace import build_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_workspace(tmp_path_factory.mktemp("storage"))


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMER_PATCHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(FORCE_FALLBACK_ENV, raising=False)


def _edit(workspace: dict[str, Path], patches: Path, record: int) -> list[str]:
    row = json.loads(workspace["zsre"].read_text())[record]
    return [
        *("edit", "--model", str(workspace["model"]), "--patches", str(patches), "--memory", "none", "--no-progress"),
        *("--text", row["src"], "--target", row["answers"][0]),
    ]


@pytest.fixture(scope="module")
def saved(workspace: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patch set holding edits 1 and 2, made by the CLI."""
    patches = tmp_path_factory.mktemp("saved") / "patches"
    for record in (0, 1):
        assert main(_edit(workspace, patches, record)) == 0
    return patches


@pytest.fixture
def patches(saved: Path, tmp_path: Path) -> Path:
    """A fresh copy of the saved patch set for one test."""
    copy = tmp_path / "work" / "p"
    shutil.copytree(saved, copy)
    return copy


def _edit_ids(patches: Path, capsys: pytest.CaptureFixture[str]) -> list[int]:
    capsys.readouterr()
    assert main(["info", str(patches), "--json"]) == 0
    return [e["edit_id"] for e in json.loads(capsys.readouterr().out)["edits"]]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def _siblings(patches: Path) -> list[str]:
    """What lies beside the patch set, its lock file aside: a staging or previous folder would be a leftover."""
    return sorted(p.name for p in patches.parent.iterdir() if p.name != f".{patches.name}.lock")


# 1. a crash between the fallback swap's two renames


def test_a_sigkill_between_the_fallback_renames_then_edit_keeps_every_earlier_edit(
    workspace: dict[str, Path], patches: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    killed = subprocess.run(
        [sys.executable, str(CHILD), *_edit(workspace, patches, 2)],
        env=child_env(tmp_path / "cache", "swap-aside:1", fallback_swap=True),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    previous = patches.parent / ".p.previous"
    assert not patches.exists() and previous.is_dir()  # the state the kill left: the old set moved aside

    assert main(_edit(workspace, patches, 3)) == 0  # opens the old set again, not a new one
    assert _edit_ids(patches, capsys) == [1, 2, 3]
    assert main(["undo", str(patches), "1"]) == 0
    assert _edit_ids(patches, capsys) == [2, 3]
    assert [e["edit_id"] for e in read_edit_log(patches)] == [2, 3]
    assert _siblings(patches) == ["p"]


@pytest.mark.parametrize("command", ["info", "undo"])
def test_info_and_undo_recover_a_patch_set_moved_aside(
    patches: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    patches.rename(patches.parent / ".p.previous")  # cp -a p .p.previous && rm -rf p
    if command == "undo":
        assert main(["undo", str(patches), "1"]) == 0
        assert _edit_ids(patches, capsys) == [2]
    else:
        assert _edit_ids(patches, capsys) == [1, 2]
    assert _siblings(patches) == ["p"]


def test_saving_a_session_to_a_folder_a_crash_moved_aside_is_refused(
    workspace: dict[str, Path], saved: Path, tmp_path: Path
) -> None:
    target = tmp_path / "p"
    shutil.copytree(saved, tmp_path / ".p.previous")
    with (
        EditSession.open(str(workspace["model"]), None, memory="none", progress=False) as session,
        pytest.raises(FileExistsError, match="already exists"),
    ):
        session.save(target)
    assert [e["edit_id"] for e in read_edit_log(target)] == [1, 2] and _siblings(target) == ["p"]


def test_a_stale_previous_beside_the_new_folder_is_removed(tmp_path: Path) -> None:
    folder, previous = tmp_path / "adapter", tmp_path / ".adapter.previous"
    folder.mkdir()
    (folder / "weights").write_text("new")
    previous.mkdir()
    (previous / "weights").write_text("old")
    recover_folder(folder)
    assert (folder / "weights").read_text() == "new" and not previous.exists()


def test_the_environment_forces_the_fallback_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "adapter"
    replace_folder_atomic(folder, lambda staging: (staging / "weights").write_text("v1"))
    moved: list[str] = []
    rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (moved.append(Path(b).name), rename(a, b))[1])
    monkeypatch.setenv(FORCE_FALLBACK_ENV, "1")
    replace_folder_atomic(folder, lambda staging: (staging / "weights").write_text("v2"))
    assert moved == [".adapter.previous", "adapter"]
    assert (folder / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_second_rename_restores_the_old_folder_and_leaves_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "adapter"
    replace_folder_atomic(folder, lambda staging: (staging / "weights").write_text("v1"))
    rename = os.rename

    def failing(a: str | Path, b: str | Path) -> None:
        if Path(a).name == ".adapter.staging":
            raise OSError(28, "No space left on device")
        rename(a, b)

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="No space"):
        replace_folder_atomic(folder, lambda staging: (staging / "weights").write_text("v2"))
    assert (folder / "weights").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# 2. links are never followed into a patch set


def _plant(patches: Path, tmp_path: Path, kind: str) -> Path:
    """A link of ``kind`` inside the patch set; returns it."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    tree = tmp_path / "tree"
    (tree / "deep").mkdir(parents=True)
    (tree / "deep" / "file").write_text("x")
    name, target = {"file": ("notes.txt", secret), "folder": ("shared", tree), "loop": ("loop", Path("."))}[kind]
    link = patches / name
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("kind", ["file", "folder", "loop"])
def test_undo_and_edit_refuse_a_link_inside_the_patch_set_and_write_nothing(
    workspace: dict[str, Path], patches: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    link = _plant(patches, tmp_path, kind)
    before = _snapshot(patches)
    capsys.readouterr()
    assert main(["undo", str(patches), "1"]) == 2
    assert f"{link} is a symbolic link" in capsys.readouterr().err
    assert main(_edit(workspace, patches, 2)) == 2
    assert f"{link} is a symbolic link" in capsys.readouterr().err
    assert _snapshot(patches) == before and link.is_symlink()
    assert _siblings(patches) == ["p"]


def test_a_patch_set_path_that_is_a_link_is_refused_before_anything_is_written(
    workspace: dict[str, Path], patches: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = patches.parent / "link"
    link.symlink_to(patches.name)
    before = _snapshot(patches)
    capsys.readouterr()
    assert main(["undo", str(link), "1"]) == 2
    assert f"{link} is a symbolic link to p; give the patch-set folder itself" in capsys.readouterr().err
    assert main(_edit(workspace, link, 2)) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert _snapshot(patches) == before and link.is_symlink()
    assert sorted(p.name for p in patches.parent.iterdir()) == ["link", "p"]  # no lock, staging or previous


def test_a_lock_file_that_is_a_link_is_refused_and_not_written_through(
    workspace: dict[str, Path], patches: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    lock = patches.parent / ".p.lock"
    lock.symlink_to(target)
    capsys.readouterr()
    assert main(["undo", str(patches), "1"]) == 2
    assert f"the lock file {lock} is a symbolic link" in capsys.readouterr().err
    assert main(_edit(workspace, patches, 2)) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert target.read_text() == "keep" and _edit_ids(patches, capsys) == [1, 2]


def test_a_link_made_during_a_save_is_copied_as_a_link_never_read_through(tmp_path: Path) -> None:
    folder, secret = tmp_path / "adapter", tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    replace_folder_atomic(folder, lambda staging: (staging / "weights").write_text("v1"))

    def write(staging: Path) -> None:  # the folder was checked; a link appears before the carry-over
        (staging / "weights").write_text("v2")
        (folder / "notes.txt").symlink_to(secret)

    replace_folder_atomic(folder, write)
    assert (folder / "notes.txt").is_symlink() and os.readlink(folder / "notes.txt") == str(secret)


# 3. FIFOs never hang a reader


def test_an_edit_log_that_is_a_fifo_is_refused_by_info_and_undo(
    patches: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (patches / "edits.jsonl").unlink()
    os.mkfifo(patches / "edits.jsonl")
    before = _snapshot(patches)
    capsys.readouterr()
    with deadline(60):
        assert main(["info", str(patches)]) == 2
        assert "edits.jsonl is a FIFO, not a regular file" in capsys.readouterr().err
        assert main(["undo", str(patches), "1"]) == 2
        assert "edits.jsonl is a FIFO; a patch-set folder may hold only regular files" in capsys.readouterr().err
    assert _snapshot(patches) == before and _siblings(patches) == ["p"]


def test_an_adapter_config_that_is_a_fifo_is_refused(patches: Path) -> None:
    """Through the library: the CLI's own peek at adapter_config.json (``cli._peft_type``) is outside this fix."""
    (patches / "adapter_config.json").unlink()
    os.mkfifo(patches / "adapter_config.json")
    with deadline(60):
        with pytest.raises(AdapterFileError, match=r"adapter_config\.json is a FIFO"):
            describe_patch_set(patches)
        with pytest.raises(AdapterFileError, match=r"adapter_config\.json is a FIFO"):
            remove_edit_from_files(patches, 1)
    assert _siblings(patches) == ["p"]


def test_a_huge_sparse_file_of_the_user_is_carried_over_without_being_written_out(patches: Path) -> None:
    """Files a save does not write are carried into the new folder by hard link: a 1 GiB sparse file costs no disk
    and no time, where a copy would write it out dense."""
    extra = patches / "scratch.bin"
    with open(extra, "wb") as handle:
        handle.truncate(2**30)
    inode = extra.stat().st_ino
    assert remove_edit_from_files(patches, 1) > 0
    carried = (patches / "scratch.bin").stat()
    assert carried.st_size == 2**30 and carried.st_ino == inode and carried.st_blocks * 512 < 2**20
