"""clbench.engine.locks: ``locked_by`` reads without taking or rewriting a lock (the sweep's probe used to
take the lock and write its own pid, also in ``--dry-run``), and without ``fcntl`` (Windows) the
module imports and falls back to a pid-file check."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from clbench.engine import locks
from clbench.engine.locks import LOCK_NAME, FolderLocked, check_unlocked, locked_by, run_lock

REPO = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent("""\
    import sys
    from clbench.engine.locks import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
    """)


@pytest.fixture
def holder():
    """Start another process holding a folder's lock until the test ends; yields its pid."""
    started: list[subprocess.Popen] = []

    def hold(folder: Path) -> int:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env={**os.environ, "PYTHONPATH": str(REPO)},
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process.pid

    yield hold
    for process in started:
        process.stdin.close()
        process.wait(10)


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_locked_by_names_the_holder_and_writes_nothing(tmp_path: Path, holder) -> None:
    folder = tmp_path / "cell"
    assert locked_by(folder) is None and not folder.exists()  # nothing created
    pid = holder(folder)
    lock = folder / LOCK_NAME
    before = (lock.read_bytes(), lock.stat().st_mtime_ns)
    assert locked_by(folder) == pid
    with pytest.raises(FolderLocked, match=f"pid {pid}"):
        check_unlocked(folder)
    assert (lock.read_bytes(), lock.stat().st_mtime_ns) == before


def test_locked_by_a_free_folder_leaves_its_lock_file_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "cell"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("4242\n")  # left by a finished run
    assert locked_by(folder) is None
    assert (folder / LOCK_NAME).read_text() == "4242\n"
    with run_lock(folder):
        assert locked_by(folder) is None  # held by this process: not "another"


def test_sweep_dry_run_does_not_rewrite_a_cells_lock(tmp_path: Path, tiny_root: Path, capsys) -> None:
    """The sweep checked each cell by taking its lock, writing its own pid into it."""
    from clbench.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "s", "output_dir": str(tmp_path / "sweeps"),
        "base": {"data_root": str(tiny_root), "synthetic": False, "tasks": 1, "image_size": 32, "weights": "none",
                 "device": "cpu"},
        "grid": {"seed": [0]}}))
    cell = tmp_path / "sweeps" / "s" / "runs" / "padim-sequential-seed0"
    cell.mkdir(parents=True)
    (cell / LOCK_NAME).write_text("4242\n")
    assert main(["sweep", str(spec), "--dry-run", "--executor", "serial"]) == 0
    assert "padim-sequential-seed0" in capsys.readouterr().out
    assert (cell / LOCK_NAME).read_text() == "4242\n"


def test_without_fcntl_a_live_pid_in_the_lock_file_holds_the_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(locks, "fcntl", None)
    folder = tmp_path / "cell"
    folder.mkdir()
    lock = folder / LOCK_NAME
    other = os.getppid()  # alive, and not this process
    lock.write_text(f"{other}\n")
    assert locked_by(folder) == other
    with pytest.raises(FolderLocked, match=f"pid {other}"):
        with run_lock(folder):
            pass
    lock.write_text(f"{_dead_pid()}\n")  # its owner has exited: free
    assert locked_by(folder) is None
    with run_lock(folder):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert lock.read_text() == ""  # released: the pid is cleared


def test_sweep_and_report_import_without_fcntl() -> None:
    code = "import sys; sys.modules['fcntl'] = None\nimport clbench.sweep, clbench.reporting.report, clbench.engine.locks as l\n" \
           "assert l.fcntl is None and l.locked_by('nowhere') is None"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
