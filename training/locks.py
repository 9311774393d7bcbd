"""One writer per folder: an exclusive `fcntl.flock` lock on a file inside the folder, held for the whole job.

The operating system releases the lock when its holder exits or is killed, so a crashed run never leaves a stale
lock behind. The holder writes its PID into the lock file, so a second process can name it. On a normal release
the lock file is removed (and so is the folder, when the job created it and left nothing else in it); a file
left by a killed holder is reused by the next run. Locks are advisory: they bind the toolkit's own writers.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager, Iterator

from training.cli import UserError

LOCK_NAME = ".lock"
"""The lock file inside a folder that one job writes."""

READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _holder(fd: int) -> str:
    """The PID written into a lock file by its holder ("unknown" while it has not written it yet)."""
    return os.pread(fd, 32, 0).decode("ascii", "ignore").strip() or "unknown"


def _open_locked(path: Path, what: str) -> int:
    """Open and lock `path` exclusively, retrying when a releasing holder removed it meanwhile; returns the fd."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # a releasing holder removed the folder it had created: make it again
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:
            if e.errno in READ_ONLY:
                raise UserError(f"{path.parent} is read-only ({e.strerror}): make it writable or choose another "
                                "folder") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise UserError(f"{what} is in use by another process (PID {pid}): wait for it to finish, or choose "
                            "another folder") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed this file as it released it: lock the one at `path` now


def _write_pid(fd: int) -> None:
    """Record this process's PID in the lock file."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` (and its parents) if missing; returns the folders this call created, innermost first."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder: choose another path")
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    if not missing:
        return []
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        if not folder.is_dir():
            raise UserError(f"{folder} exists and is not a folder: choose another path") from None
        return []
    except OSError as e:
        if e.errno in READ_ONLY:
            raise UserError(f"cannot create {folder}: {e.strerror} (read-only location): choose another "
                            "folder") from None
        raise
    return missing


@contextmanager
def folder_lock(folder: str | Path, lock_name: str = LOCK_NAME, what: str | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing) for the with-block; a second holder gets a
    one-line UserError naming `what` (default: the folder) and the holder's PID. Yields the folder."""
    folder = Path(folder)
    created = _make_folder(folder)
    path = folder / lock_name
    fd = _open_locked(path, what or str(folder))
    try:
        _write_pid(fd)
        yield folder
    finally:
        try:
            path.unlink(missing_ok=True)  # while still locked: a waiting opener sees the inode change and retries
        finally:
            os.close(fd)
        for made in created:
            try:
                made.rmdir()  # only when the job left it empty
            except OSError:
                break


def output_lock(target: str | Path) -> ContextManager[Path]:
    """Lock an output that is replaced as a whole (a file, or a folder swapped in by rename): the lock file sits
    beside it, `.{name}.lock` in its parent folder."""
    target = Path(target)
    return folder_lock(target.parent, f".{target.name}.lock", what=str(target))
