"""Atomic writes: a crash (even SIGKILL or a power cut) leaves either the old file or folder or the new one, never a
mix or half of either.

Files go to a temporary sibling that is fsync'd and renamed over the target, then the parent folder is fsync'd so
the rename itself is durable. Folders (adapter folders: weights + config + edit log) are written whole into a
staging sibling and swapped in with one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it; elsewhere the old
folder is moved aside first and restored by the next write if a crash falls between the two renames.
Each target is assumed to have one writer at a time (SME runs hold a lock on their output folder).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_file(tmp: Path, path: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically (parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _commit_file(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _commit_file(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder_atomic(folder: Path, write: Callable[[Path], None]) -> None:
    """Update ``folder`` with what ``write(staging)`` writes, atomically; files of the old folder that ``write`` does
    not produce (a README, notes) are carried over."""
    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging, previous = parent / f".{folder.name}.staging", parent / f".{folder.name}.previous"
    if previous.is_dir() and not folder.exists():  # a crash between the fallback's two renames
        os.rename(previous, folder)
    for leftover in (staging, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    staging.mkdir()
    write(staging)
    if folder.is_dir():
        for item in folder.iterdir():
            if not (staging / item.name).exists():
                copy = shutil.copytree if item.is_dir() else shutil.copy2
                copy(item, staging / item.name)
    for item in staging.rglob("*"):
        fsync_path(item)
    fsync_path(staging)
    if not folder.exists():
        os.rename(staging, folder)
    elif _exchange(staging, folder):
        shutil.rmtree(staging)
    else:
        os.rename(folder, previous)
        os.rename(staging, folder)
        shutil.rmtree(previous)
    fsync_path(parent)
