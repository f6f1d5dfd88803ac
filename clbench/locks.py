"""One writer per run folder: an advisory ``flock`` on ``<folder>/.lock`` that holds the owner's pid.

Two processes writing one run folder (two ``clbench run`` with the same name, a sweep cell started
twice) would interleave their results. The lock is taken before anything in the folder is written
and refused at once, with one line naming the folder and the pid that holds it. The kernel releases
an ``flock`` when its process dies (also on SIGKILL), so a killed run never leaves a stale lock.

Usage (the runner around a run, the sweep around a cell)::

    with run_lock(folder):        # creates the folder if needed; raises FolderLocked if held
        ...

The lock is re-entrant within one process (a sweep worker may hold its cell's lock while the
runner takes it again); a child process does not inherit it and must take its own.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from clbench.config import ConfigError

LOCK_NAME = ".lock"

# (pid, resolved folder) -> [file descriptor, depth]: the locks this process holds.
_held: dict[tuple[int, str], list[int]] = {}


class FolderLocked(ConfigError):
    """Another process holds the run folder's lock; the message names the folder and its pid."""


def lock_path(folder: str | Path) -> Path:
    return Path(folder) / LOCK_NAME


def holder_pid(folder: str | Path) -> int | None:
    """The pid written in the folder's lock file (None if absent or unreadable)."""
    try:
        return int(lock_path(folder).read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def _locked(folder: Path) -> FolderLocked:
    """The one-line refusal: the folder and the pid holding it."""
    pid = holder_pid(folder)
    owner = f"pid {pid}" if pid is not None else "an unknown pid"
    return FolderLocked(f"{folder}: in use by another clbench process ({owner}); "
                        "wait for it to finish or stop it, then run again")


def _acquire(folder: Path) -> int:
    """Open and ``flock`` the lock file without waiting; write our pid into it."""
    fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise _locked(folder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s lock for the ``with`` block (creating the folder if it is missing).

    Raises ``FolderLocked`` (a ``ConfigError``: one line, exit code 2) if another process holds
    it. The lock file stays behind after release: deleting it would let a third process lock a
    new file while a second still holds the old one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = (os.getpid(), str(folder.resolve()))
    entry = _held.get(key)
    if entry is not None:  # re-entrant: this process already holds it
        entry[1] += 1
    else:
        _held[key] = entry = [_acquire(folder), 1]
    try:
        yield folder
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the descriptor releases the flock


def check_unlocked(folder: str | Path) -> None:
    """Raise ``FolderLocked`` now if another process holds ``folder``'s lock (creates nothing).

    A cheap early refusal before expensive set-up; ``run_lock`` still decides, atomically."""
    folder = Path(folder)
    if is_locked_here(folder) or not lock_path(folder).is_file():
        return
    try:
        fd = os.open(lock_path(folder), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise _locked(folder) from None
    finally:
        os.close(fd)


def is_locked_here(folder: str | Path) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return (os.getpid(), str(Path(folder).resolve())) in _held
