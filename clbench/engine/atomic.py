"""Atomic file writes: write to a temporary file in the same folder, fsync, then ``os.replace``.

A run killed at any moment leaves either the previous complete file or the new complete file,
never a truncated one, so results already written are never lost or corrupted. A kill between
creating the temporary file and the rename leaves ``.<name>.<8 random chars>.tmp`` behind:
``remove_leftovers`` deletes exactly those (the run does it under its folder's lock at start).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

# tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") names: 8 characters of tempfile's alphabet.
TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
CSV_FLOAT_FORMAT = "%.17g"  # full precision: a resumed run's CSVs compare byte for byte


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The file gets the mode an ordinary ``open()`` would give it (0666 minus the umask), not
    mkstemp's private 0600: results are meant to be read by others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        if err.filename is None and err.errno is not None:  # a failed write() names no file: name the target
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed atomic write left directly in ``folder``.

    Only regular files named as ``atomic_path`` names them are touched, never through a symbolic
    link; call it only where no other process writes (under the folder's lock)."""
    removed: list[Path] = []
    if Path(folder).is_symlink():  # never clean up somewhere a link points to
        return removed
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if TEMP_PATTERN.match(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def json_safe(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None: JSON has no NaN (``null`` is
    what strict parsers, browsers and other languages accept)."""
    import numpy as np  # here, not at the top: ``clbench --help`` and ``report --help`` need no numpy

    if isinstance(data, np.generic):
        data = data.item()  # numpy scalars: plain Python values
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    return data


def write_json(path: str | Path, data: Any) -> Path:
    """Strict JSON: NaN and infinities are written as ``null``."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=True, default=str, allow_nan=False)
    return write_text(path, text + "\n")


def write_yaml(path: str | Path, data: Any) -> Path:
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(path: str | Path, frame) -> Path:
    """Write a pandas DataFrame; floats with full precision so a resumed run compares exactly."""
    return write_with(path, lambda tmp: frame.to_csv(tmp, index=False, float_format=CSV_FLOAT_FORMAT))
