"""Atomic writes: a crash (even SIGKILL or a power cut) leaves either the old file or folder or the new one, never a
mix or half of either.

Files go to a temporary sibling that is fsync'd and renamed over the target, then the parent folder is fsync'd so
the rename itself is durable. Folders (adapter folders: weights + config + edit log) are written whole into a
staging sibling and swapped in with one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it; elsewhere the old
folder is moved aside to ``.NAME.previous`` first, and a crash between the two renames is undone by
:func:`recover_folder`, which every reader and writer of a patch set calls before it touches the folder.
``TRANSFORMER_PATCHER_FORCE_FALLBACK_SWAP=1`` forces that fallback on Linux too (for the crash tests).
Each target is assumed to have one writer at a time (SME runs hold a lock on their output folder).

Links and special files: a folder replaced here holds regular files and folders only. A symbolic link (the folder
itself or anything in it), a FIFO, socket or device is refused with ``AdapterFileError`` before anything is
written; nothing is ever read through a link into the folder, which would turn it into a copy of whatever it points
at (a secret file, a whole tree, or a loop without end). Readers (:func:`open_regular_file`) do follow links, as a
downloaded adapter's files are links into the Hub cache, but open regular files only: a FIFO would block them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from transformer_patcher.core.errors import AdapterFileError
from transformer_patcher.core.folder_lock import sibling_lock

if TYPE_CHECKING:
    import torch

FORCE_FALLBACK_ENV = "TRANSFORMER_PATCHER_FORCE_FALLBACK_SWAP"
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
    from safetensors.torch import save_file  # here, not above: the readers of this module (``info``) need no torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _removed_on_failure(tmp):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _commit_file(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _removed_on_failure(tmp):
        tmp.write_text(text, encoding="utf-8")
        _commit_file(tmp, path)


@contextmanager
def _removed_on_failure(tmp: Path) -> Iterator[None]:
    """A write that fails (a full disk, a folder in the way) leaves no ``.tmp`` file behind."""
    try:
        yield
    except BaseException:
        if not tmp.is_dir():
            tmp.unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where the OS or filesystem cannot, or where
    ``TRANSFORMER_PATCHER_FORCE_FALLBACK_SWAP=1`` asks for the two-rename fallback."""
    if os.environ.get(FORCE_FALLBACK_ENV) == "1":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _kind(mode: int) -> str:
    kinds = {
        stat.S_IFLNK: "a symbolic link",
        stat.S_IFIFO: "a FIFO",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a device",
        stat.S_IFBLK: "a device",
        stat.S_IFDIR: "a folder",
    }
    return kinds.get(stat.S_IFMT(mode), "not a regular file")


def require_regular_file(path: str | os.PathLike[str]) -> None:
    """Raise AdapterFileError unless ``path`` is a regular file (links followed; FileNotFoundError when missing):
    a FIFO would block its reader forever, a device never end."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as error:  # a link loop, a permission error: not a file this package can read
        raise AdapterFileError(f"{path} cannot be read ({error.strerror}); refusing it") from error
    if not stat.S_ISREG(mode):
        raise AdapterFileError(f"{path} is {_kind(mode)}, not a regular file; refusing to read it")


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (see :func:`require_regular_file`). The open itself
    does not block (``O_NONBLOCK``), and the check is on the opened file, so a FIFO swapped in meanwhile is refused
    too."""
    require_regular_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AdapterFileError(f"{path} is {_kind(mode)}, not a regular file; refusing to read it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_plain_folder(folder: str | os.PathLike[str]) -> None:
    """Refuse ``folder`` if it, or anything in it, is a symbolic link or a special file (see the module doc); a
    missing folder passes. Nothing is followed or opened: entries are read with ``lstat``."""
    folder = Path(folder)
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    if not stat.S_ISDIR(mode):
        raise AdapterFileError(f"{folder} is {_kind(mode)}, not a folder; a patch set is never saved through a link")
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append(Path(entry.path))
                elif not stat.S_ISREG(mode):
                    raise AdapterFileError(
                        f"{entry.path} is {_kind(mode)}; a patch-set folder may hold only regular files and folders "
                        "(links are never followed or copied): move it out of the folder"
                    )


def _sibling(folder: Path, role: str) -> Path:
    return folder.parent / f".{folder.name}.{role}"


def _remove(path: Path) -> None:
    """Delete ``path`` whatever it is, without following a link; nothing when it is missing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def recover_folder(folder: str | os.PathLike[str], locked: bool = False) -> None:
    """Finish what a crash between the fallback swap's two renames left, before anything reads or writes ``folder``.

    ``folder`` missing and ``.NAME.previous`` a folder: the crash came after the old folder was moved aside and before
    the new one came in, so the old one is renamed back. Both there: the new folder is in and ``.previous`` is
    stale, so it is removed. ``locked``: the caller holds the folder's :func:`~.folder_lock.sibling_lock` (a
    writer); otherwise the lock is taken only when there is something to recover, so a reader does not contend with
    an open edit session, nor race a writer that is mid-swap.
    """
    folder = Path(folder)
    previous = _sibling(folder, "previous")
    if not os.path.lexists(previous):
        return
    if not locked:
        with sibling_lock(folder):
            recover_folder(folder, locked=True)
        return
    if not os.path.lexists(folder) and stat.S_ISDIR(os.lstat(previous).st_mode):
        os.rename(previous, folder)
    else:
        _remove(previous)
    fsync_path(folder.parent)


def _carry_over(folder: Path, staging: Path) -> None:
    """Carry the entries of ``folder`` that ``staging`` lacks over by hard link: nothing is copied, so a huge or
    sparse file of the user's costs no disk; links are linked as links, never read through (the folder was checked
    to hold none, this guards a link made meanwhile). Where hard links are refused, files are copied."""
    for item in folder.iterdir():
        if not os.path.lexists(staging / item.name):
            if item.is_dir() and not item.is_symlink():
                shutil.copytree(item, staging / item.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(item, staging / item.name)


def _link_or_copy(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if not path.is_symlink():
            fsync_path(path)


def replace_folder_atomic(folder: Path, write: Callable[[Path], None]) -> None:
    """Update ``folder`` with what ``write(staging)`` writes, atomically; files of the old folder that ``write`` does
    not produce (a README, notes) are carried over. The folder is checked (:func:`check_plain_folder`) before
    anything is written, and no staging folder is left behind when any step fails."""
    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging, previous = _sibling(folder, "staging"), _sibling(folder, "previous")
    recover_folder(folder, locked=True)  # the caller is the folder's one writer
    check_plain_folder(folder)
    _remove(staging)  # what a crash mid-write left
    staging.mkdir()
    exists = folder.is_dir()
    old: Path | None = None  # where the old folder is once the new one is in
    try:
        write(staging)
        if exists:
            _carry_over(folder, staging)
        _fsync_tree(staging)
        if not exists:
            os.rename(staging, folder)
        elif _exchange(staging, folder):
            old = staging
        else:
            os.rename(folder, previous)  # a crash from here to the next rename is undone by recover_folder
            try:
                os.rename(staging, folder)
            except BaseException:
                os.rename(previous, folder)
                raise
            old = previous
    except BaseException:
        _remove(staging)
        raise
    fsync_path(parent)
    if old is not None:
        _remove(old)
