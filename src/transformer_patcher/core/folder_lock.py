"""One writer per output folder: a run or an edit session holds an OS lock for its whole life.

The lock is ``flock``-based (``filelock``), so the kernel drops it when its holder dies, even by SIGKILL: a crashed
run never leaves a stale lock behind, and ``--resume`` takes over at once. A second writer is refused immediately,
with the holder's pid, rather than waiting or interleaving its writes with the first (or, for a patch-set folder,
saving over the first one's fixes).

A lock file that is a symbolic link or a special file is refused, never followed: writing the holder's pid through
it would overwrite whatever it points at. So is a patch-set folder that is itself a link (see :func:`sibling_lock`).
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from transformer_patcher.core.errors import AdapterFileError, FolderLockedError, PatcherError

LOCK_NAME = ".lock"


@contextmanager
def hold_lock(lock_file: Path, target: Path) -> Iterator[None]:
    """Hold ``lock_file`` (guarding ``target``) or raise FolderLockedError naming the holder."""
    _refuse_unless_plain(lock_file)
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderLockedError(
            f"{target} is in use by another process ({_holder(lock_file)}); wait for it to finish or use another folder"
        ) from None
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        fd = os.open(lock_file, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
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
    do not outlive a save. A ``folder`` that is a symbolic link is refused before anything is written: the lock
    beside the link would not guard the folder it points at, and the link would be swapped out for a folder."""
    folder = Path(folder)
    if folder.is_symlink():
        raise AdapterFileError(
            f"{folder} is a symbolic link to {os.readlink(folder)}; give the patch-set folder itself, not a link"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    return hold_lock(folder.parent / f".{folder.name}{LOCK_NAME}", folder)


def _refuse_unless_plain(lock_file: Path) -> None:
    """Raise PatcherError if ``lock_file`` exists as anything but a regular file (it is not followed)."""
    try:
        mode = os.lstat(lock_file).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise PatcherError(f"the lock file {lock_file} is {kind}; remove it (a lock is never taken through a link)")


def _holder(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd) as handle:
            return handle.read(200).strip() or "holder unknown"
    except OSError:
        return "holder unknown"
