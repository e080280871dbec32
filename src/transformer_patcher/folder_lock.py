"""One writer per output folder: a run or an edit session holds an OS lock for its whole life.

The lock is ``flock``-based (``filelock``), so the kernel drops it when its holder dies, even by SIGKILL: a crashed
run never leaves a stale lock behind, and ``--resume`` takes over at once. A second writer is refused immediately,
with the holder's pid, rather than waiting or interleaving its writes with the first (or, for a patch-set folder,
saving over the first one's fixes).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import FolderLockedError

LOCK_NAME = ".lock"


@contextmanager
def hold_lock(lock_file: Path, target: Path) -> Iterator[None]:
    """Hold ``lock_file`` (guarding ``target``) or raise FolderLockedError naming the holder."""
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderLockedError(
            f"{target} is in use by another process ({_holder(lock_file)}); wait for it to finish or use another folder"
        ) from None
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        lock_file.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        yield
    finally:
        lock.release()


@contextmanager
def folder_lock(folder: str | os.PathLike[str], rank: int = 0) -> Iterator[None]:
    """Hold ``<folder>/.lock`` (one per process ``rank`` of a multi-process run) or raise FolderLockedError.

    A folder this call created and that holds nothing but the lock when released is removed again, so a run that
    fails before writing anything leaves no trace.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (LOCK_NAME if rank == 0 else f"{LOCK_NAME}-{rank}")
    try:
        with hold_lock(path, folder):
            yield
    finally:
        if created and [p.name for p in folder.iterdir()] == [path.name]:
            path.unlink(missing_ok=True)
            folder.rmdir()


def sibling_lock(folder: str | os.PathLike[str]) -> AbstractContextManager[None]:
    """Hold ``.<name>.lock`` beside ``folder``: for folders replaced whole on save (a patch set), whose own files
    do not outlive a save."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return hold_lock(folder.parent / f".{folder.name}{LOCK_NAME}", folder)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "holder unknown"
    except OSError:
        return "holder unknown"
