"""Atomic writes: files and whole adapter folders are replaced in one step, and a crash mid-write leaves the old
version readable (the SIGKILL campaign in test_crash_safety.py exercises the same paths in a real run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformer_patcher.core import atomic
from transformer_patcher.core.atomic import replace_folder_atomic, save_safetensors_atomic, write_text_atomic


def write_files(**files: str):
    def write(staging: Path) -> None:
        for name, text in files.items():
            (staging / name).write_text(text)

    return write


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_folder_is_replaced_whole_and_other_files_are_kept(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    folder = tmp_path / "adapter"
    replace_folder_atomic(folder, write_files(weights="v1", config="v1"))
    (folder / "NOTES.md").write_text("mine")
    replace_folder_atomic(folder, write_files(weights="v2", config="v2"))
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"weights": "v2", "config": "v2", "NOTES.md": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or previous folder left


def test_a_failed_write_leaves_the_old_folder(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    replace_folder_atomic(folder, write_files(weights="v1"))

    def crash(staging: Path) -> None:
        (staging / "weights").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_folder_atomic(folder, crash)
    assert (folder / "weights").read_text() == "v1"
    replace_folder_atomic(folder, write_files(weights="v3"))  # the leftover staging folder is cleared
    assert (folder / "weights").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_crash_between_the_fallback_renames_is_recovered(tmp_path: Path) -> None:
    folder, previous = tmp_path / "adapter", tmp_path / ".adapter.previous"
    replace_folder_atomic(folder, write_files(weights="v1"))
    folder.rename(previous)  # the state a kill between "move old aside" and "move new in" leaves
    replace_folder_atomic(folder, write_files(config="v2"))
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"weights": "v1", "config": "v2"}
    assert not previous.exists()


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        replace_folder_atomic(tmp_path / "adapter", write_files(weights="v1"))


def test_file_writes_replace_and_leave_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    write_text_atomic(path, "ünïcode 1")
    write_text_atomic(path, "ünïcode 2")
    assert path.read_text(encoding="utf-8") == "ünïcode 2"
    tensors = {"rows": torch.arange(6.0).reshape(2, 3).t()}  # non-contiguous is fine
    save_safetensors_atomic(tensors, tmp_path / "bank.safetensors", metadata={"key": "k"})
    assert torch.equal(load_file(tmp_path / "bank.safetensors")["rows"], tensors["rows"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bank.safetensors", "state.json", "sub"]
