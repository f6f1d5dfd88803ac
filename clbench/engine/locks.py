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

``locked_by(folder)`` tells who holds a folder without taking its lock or writing anything (a sweep
listing its cells, also with ``--dry-run``).

Without ``fcntl`` (Windows) the module still imports and degrades to a pid-file check: a folder is
held while the pid written in its lock file is a live process other than this one. That check is
not atomic (two processes starting in the same instant may both take the folder) and a reused pid
of a dead owner reads as held; it is a guard against the common mistakes, not a mutex.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from clbench.engine.config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: the pid-file check of the module docstring
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # what a non-blocking flock of a held file raises
ACQUIRE_TRIES = 5  # a ``locked_by`` probe holds a shared lock for microseconds: retry before refusing
ACQUIRE_PAUSE_S = 0.01

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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (never signals it: ``os.kill(pid, 0)`` would stop it
    on Windows, where signal 0 is not a probe)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _windows_pid_alive(pid: int) -> bool:
    """OpenProcess + GetExitCodeProcess: alive while the exit code is STILL_ACTIVE (259)."""
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259
    finally:
        kernel32.CloseHandle(handle)


def _flock_now(fd: int, kind: int, tries: int = 1) -> bool:
    """A non-blocking ``flock`` of ``kind`` on ``fd``: True if taken, False if another holds it."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in BUSY:
                raise
        if attempt + 1 < tries:
            time.sleep(ACQUIRE_PAUSE_S)
    return False


def _held_elsewhere_by_pid(folder: Path) -> int | None:
    """Without fcntl: the pid in the lock file if it is a live process other than this one."""
    pid = holder_pid(folder)
    return pid if pid is not None and pid != os.getpid() and pid_alive(pid) else None


def _acquire(folder: Path) -> int:
    """Open and lock the lock file without waiting (``flock``, or without fcntl the pid-file
    check); write our pid into it."""
    fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        taken = _flock_now(fd, fcntl.LOCK_EX, ACQUIRE_TRIES) if fcntl else _held_elsewhere_by_pid(folder) is None
    except OSError:
        os.close(fd)
        raise
    if not taken:
        os.close(fd)
        raise _locked(folder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _release(fd: int) -> None:
    """Closing the descriptor releases the flock; without fcntl the pid is cleared first, so a
    later process reusing it is not taken for the owner."""
    try:
        if fcntl is None:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


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
            _release(entry[0])


def check_unlocked(folder: str | Path) -> None:
    """Raise ``FolderLocked`` now if another process holds ``folder``'s lock (creates nothing).

    A cheap early refusal before expensive set-up; ``run_lock`` still decides, atomically."""
    if locked_by(folder) is not None:
        raise _locked(Path(folder))


def locked_by(folder: str | Path) -> int | None:
    """The pid of another process holding ``folder``'s lock (-1 if held but its pid file is
    unreadable), else None; also None when it cannot tell (no lock file, an unreadable folder:
    running there fails later with one line). Read-only: creates, takes and writes nothing, so a
    ``--dry-run`` leaves the folder as it was. With ``flock`` it probes with a shared lock on its
    own descriptor, released at once (``_acquire`` retries briefly, so a run starting in that
    instant is not refused)."""
    folder = Path(folder)
    if is_locked_here(folder):
        return None
    if fcntl is None:
        return _held_elsewhere_by_pid(folder)
    try:
        fd = os.open(lock_path(folder), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        free = _flock_now(fd, fcntl.LOCK_SH)
    except OSError:
        return None
    finally:
        os.close(fd)
    if free:
        return None
    pid = holder_pid(folder)
    return pid if pid is not None else -1


def is_locked_here(folder: str | Path) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return (os.getpid(), str(Path(folder).resolve())) in _held
