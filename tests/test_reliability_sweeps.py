"""Issue 11, sweeps and reports: workers die with a killed sweep (W04a), a cell locked by another
live process is skipped as running elsewhere (W04, F09), a damaged or foreign cell is named and left
out of the report (W07), and the attacker / careless-user cases beyond the list.

Kept light at import time (no torch): process-pool workers import this module to unpickle
``sleepy_cell``."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import yaml

from clbench.sweep import Cell, CellResult, add_sweep_parser, expand, run_cell, run_sweep, spec_from_mapping

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BASE = {"tasks": 2, "image_size": 32, "weights": "none", "device": "cpu", "synthetic": False,
        "method_params": {"n_features": 8, "layers": ["layer1"]}}


def quiet(_: str) -> None:
    pass


def write_spec(path: Path, data_root: Path, grid, name: str = "s", **base) -> Path:
    spec = {"name": name, "output_dir": str(path.parent / "sweeps"),
            "base": {**BASE, "data_root": str(data_root), **base}, "grid": grid}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clbench")
    add_sweep_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        if sys.platform.startswith("linux"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    from helpers import write_category

    root = tmp_path / "data"
    write_category(root, "alpha", size=32)
    write_category(root, "beta", size=32, seed=1)
    return root


# -- W04a: workers die with their parent -------------------------------------------------------
def sleepy_cell(cell: Cell) -> CellResult:
    """A cell that says it started (its pid in a file) and then runs for a long time."""
    pid_file = Path(cell.sweep_dir) / f"{cell.name}.pid"
    pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
    os.replace(pid_file.with_suffix(".tmp"), pid_file)  # whole, or not there: the test reads it at once
    time.sleep(120)
    return CellResult(cell.name, "ran")


KILL_SCRIPT = textwrap.dedent("""\
    import sys
    sys.path.insert(0, {tests!r})
    from test_reliability_sweeps import sleepy_cell
    from clbench.sweep import Cell, LocalExecutor
    if __name__ == "__main__":
        cells = [Cell("c-seed0", {{}}, {{}}, {folder!r})]
        for result in LocalExecutor(1).map(sleepy_cell, cells):
            print(result)
    """)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_W04a_pool_workers_die_when_the_sweep_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "sweep_parent.py"
    script.write_text(KILL_SCRIPT.format(tests=str(TESTS), folder=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pid_file = tmp_path / "c-seed0.pid"
    try:
        assert wait_for(pid_file.exists, 60), parent.stderr.read().decode() if parent.poll() is not None else "no worker"
        worker = int(pid_file.read_text())
        assert pid_alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_for(lambda: not pid_alive(worker), 5), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if pid_file.exists() and pid_alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


# -- W04, F09: a cell locked by another live process is skipped, never started twice ------------
HOLD_SCRIPT = textwrap.dedent("""\
    import sys, time
    from clbench.engine.locks import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """)


class HeldLock:
    """Another process (as an orphaned worker or a second sweep would) holding a run folder's lock."""

    def __init__(self, folder: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(folder)], env=env,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "locked"
        self.pid = self.process.pid

    def release(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def hold_lock():
    held: list[HeldLock] = []
    yield lambda folder: held.append(HeldLock(folder)) or held[-1]
    for h in held:
        h.release()


@pytest.mark.slow
def test_W04_a_cell_running_elsewhere_is_skipped_not_started_twice(data_root: Path, tmp_path: Path, hold_lock,
                                                                   capsys) -> None:
    spec = write_spec(tmp_path / "spec.yaml", data_root, {"seed": [0, 1]})
    busy = tmp_path / "sweeps" / "s" / "runs" / "padim-sequential-seed0"
    other = hold_lock(busy)
    before = sorted(p.name for p in busy.iterdir())

    assert sweep_cli(["sweep", str(spec), "--executor", "serial", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"busy     padim-sequential-seed0: running elsewhere (pid {other.pid})" in out

    assert sweep_cli(["sweep", str(spec), "--executor", "serial"]) == 0  # skipped, not failed
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert "1 to run, 1 running elsewhere" in first
    assert f"SKIPPED  padim-sequential-seed0: running elsewhere (pid {other.pid})" in out
    assert "1 of 2 cells complete, 0 failed, 1 running elsewhere (skipped)" in out
    assert sorted(p.name for p in busy.iterdir()) == before  # nothing written into the other's cell
    assert not (tmp_path / "sweeps" / "s" / "logs" / "padim-sequential-seed0.log").exists()
    status = json.loads((tmp_path / "sweeps" / "s" / "status.json").read_text())["cells"]
    assert status["padim-sequential-seed0"]["status"] == "running elsewhere"
    assert status["padim-sequential-seed1"]["status"] == "complete"

    other.release()  # the other process died (killed): the lock is gone, the cell runs
    assert sweep_cli(["sweep", str(spec), "--executor", "serial"]) == 0
    out = capsys.readouterr().out
    assert "running elsewhere" not in out and "2 of 2 cells complete" in out


def test_F09_a_cell_locked_after_the_sweep_started_comes_back_busy(tmp_path: Path, hold_lock) -> None:
    """The race the pre-check cannot see: another process takes the folder between the sweep's
    check and the cell's start. The worker's own lock refuses it; nothing is written."""
    cell = Cell("padim-sequential-seed0", {}, {"method": "padim"}, str(tmp_path / "sw"))
    other = hold_lock(cell.run_dir)
    result = run_cell(cell)
    assert (result.status, result.error, result.failed) == ("busy", f"running elsewhere (pid {other.pid})", False)
    assert sorted(p.name for p in cell.run_dir.iterdir()) == [".lock"]
    assert not cell.log_path.exists()


# -- W07: a damaged or foreign complete cell is named and left out of the report -----------------
@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    """A finished 2-seed sweep (real run folders, 2 tasks at 32 px), made once for this module."""
    from helpers import write_category

    root = tmp_path_factory.mktemp("sweep")
    write_category(root / "data", "alpha", size=32)
    write_category(root / "data", "beta", size=32, seed=1)
    spec = write_spec(root / "spec.yaml", root / "data", {"seed": [0, 1]})
    outcome = run_sweep(spec, "serial", echo=quiet)
    assert {r.status for r in outcome.results.values()} == {"ran"}
    return outcome.sweep_dir


@pytest.fixture
def sweep_copy(real_sweep: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(real_sweep, copy)
    sweep = yaml.safe_load((copy / "sweep.yaml").read_text())  # keep the copy self-contained
    (copy / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return copy


def report_cli(argv: list[str]) -> int:
    from clbench.cli import main

    return main(["report", *argv])


def _cut_mid_row(run: Path) -> None:
    data = (run / "metrics.csv").read_bytes()
    (run / "metrics.csv").write_bytes(data[:-7])


def _cut_last_rows(run: Path) -> None:
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(lines[:-3]))


def _drop_metric(run: Path) -> None:
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(l for l in lines if ",pixel_aupro," not in l))


def _edit_value(run: Path) -> None:
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    lines[1] = lines[1].rsplit(",", 1)[0] + ",abc\n"
    (run / "metrics.csv").write_text("".join(lines))


def _other_runs_metrics(run: Path) -> None:
    import shutil

    shutil.copy(run.parent / "padim-sequential-seed1" / "metrics.csv", run / "metrics.csv")


def _older_format(run: Path) -> None:
    (run / "metrics.csv").write_text("step,task,score\n0,alpha,0.5\n1,beta,0.6\n")


DAMAGE = [
    ("truncated mid-row", _cut_mid_row, "metrics.csv ends in the middle of a row (truncated)"),
    ("truncated at a row", _cut_last_rows, "metrics.csv step 1, "),
    ("a metric missing", _drop_metric, "metrics.csv lacks metric 'pixel_aupro'"),
    ("an edited value", _edit_value, "metrics.csv line 2: value 'abc' is not a number"),
    ("another run's rows", _other_runs_metrics, "metrics.csv disagrees with summary.json ("),
    ("empty", lambda run: (run / "metrics.csv").write_bytes(b""), "metrics.csv is empty"),
    ("binary garbage", lambda run: (run / "metrics.csv").write_bytes(b"\x00\xff\xfe garbage\n\x89PNG\n"),
     "metrics.csv "),
    ("deleted", lambda run: (run / "metrics.csv").unlink(), "metrics.csv is missing"),
    ("another format", _older_format, "metrics.csv has no column 'trained_task' (a different clbench format?)"),
    ("memory.csv truncated", lambda run: (run / "memory.csv").write_text("step,trained_task,component,bytes\n"),
     "memory.csv has no rows, summary.json says 2 step(s)"),
    ("summary.json garbage", lambda run: (run / "summary.json").write_text("{not json"),
     "summary.json is unreadable or not a JSON object"),
    ("summary.json of another format", lambda run: (run / "summary.json").write_text('{"complete": true, "acc": 0.9}'),
     "summary.json is not in the format this clbench reads"),
]


@pytest.mark.parametrize("damage, expected", [pytest.param(d, e, id=i) for i, d, e in DAMAGE])
def test_W07_each_kind_of_damage_is_found(sweep_copy: Path, damage, expected) -> None:
    from clbench.reporting.cells import load_cells

    damage(sweep_copy / "runs" / "padim-sequential-seed0")
    cells = {c.name: c for c in load_cells(sweep_copy)[0]}
    bad, good = cells["padim-sequential-seed0"], cells["padim-sequential-seed1"]
    assert (bad.status, good.status) == ("damaged", "complete")
    assert bad.note.startswith(expected) and "\n" not in bad.note


def test_W07_a_truncated_metrics_csv_is_named_and_left_out_of_the_report(sweep_copy: Path, capsys) -> None:
    import pandas as pd

    _cut_mid_row(sweep_copy / "runs" / "padim-sequential-seed0")
    assert report_cli([str(sweep_copy)]) == 0  # the other cell still makes a report
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == ("warning: padim-sequential-seed0: metrics.csv ends in the middle of a row (truncated); "
                        "left out of the aggregates")
    assert lines[-1].endswith("; 1 damaged cell(s) left out (see the warnings above)") and captured.err == ""
    report = sweep_copy / "report"
    cells = pd.read_csv(report / "cells.csv").set_index("cell")
    assert cells.loc["padim-sequential-seed0", "status"] == "damaged"
    assert set(pd.read_csv(report / "runs.csv")["cell"]) == {"padim-sequential-seed1"}
    summary = pd.read_csv(report / "summary.csv")
    assert list(summary["n_seeds"]) == [1] and list(summary["seeds"].astype(str)) == ["1"]
    assert "padim-sequential-seed0: damaged — metrics.csv ends in the middle" in (report / "summary.md").read_text()


def test_W07_an_intact_sweep_reports_without_warnings(sweep_copy: Path, capsys) -> None:
    assert report_cli([str(sweep_copy)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "2 of 2 cells complete" in out


def test_W07_cells_of_another_clbench_version_are_said_and_kept(sweep_copy: Path, capsys) -> None:
    import pandas as pd

    from clbench import __version__

    env_path = sweep_copy / "runs" / "padim-sequential-seed0" / "env.json"
    env = json.loads(env_path.read_text())
    env["packages"]["clbench"] = "0.0.9"
    env_path.write_text(json.dumps(env))
    assert report_cli([str(sweep_copy)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"warning: 1 cell(s) written by clbench 0.0.9, this is {__version__}: "
                                   "padim-sequential-seed0; included, but compare their numbers with care")
    cells = pd.read_csv(sweep_copy / "report" / "cells.csv").set_index("cell")
    assert cells.loc["padim-sequential-seed0", "clbench_version"] == "0.0.9"
    assert list(pd.read_csv(sweep_copy / "report" / "summary.csv")["n_seeds"]) == [2]


def test_W07_a_sweep_of_a_newer_format_is_one_line(sweep_copy: Path, capsys) -> None:
    data = yaml.safe_load((sweep_copy / "sweep.yaml").read_text())
    assert data["format"] == 1 and data["clbench_version"]
    data["format"] = 99
    (sweep_copy / "sweep.yaml").write_text(yaml.safe_dump(data))
    assert report_cli([str(sweep_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clbench: error: {sweep_copy / 'sweep.yaml'}: written by a newer clbench")
    assert err.count("\n") == 1 and not (sweep_copy / "report").exists()


# -- beyond the list: sweeps -------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    from clbench.cli import main

    return main(argv)


def one_error_line(err: str) -> str:
    assert err.startswith("clbench: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_beyond_a_spec_of_10000_cells_is_refused_before_it_is_expanded(tmp_path: Path, capsys, monkeypatch) -> None:
    import clbench.sweep.spec as sweep

    grid = {"seed": list(range(10)), "image_size": list(range(32, 42)), "val_fraction": [0.1 + i / 100 for i in range(10)],
            "method_params.n_features": list(range(1, 11))}
    spec = write_spec(tmp_path / "big.yaml", tmp_path / "data", grid)
    monkeypatch.setattr(sweep, "cell_name", lambda *a: pytest.fail("cells were built"))
    assert cli(["sweep", str(spec), "--dry-run"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "the grid expands to 10000 cells (10 x 10 x 10 x 10), more than the limit of 1000" in err
    assert "--max-cells 10000" in err
    assert cli(["sweep", str(spec), "--max-cells", "0"]) == 2
    assert "--max-cells must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_beyond_a_large_spec_runs_with_max_cells_and_its_dry_run_is_quick(tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path / "big.yaml", tmp_path / "data", {"seed": list(range(1200))})
    start = time.perf_counter()
    assert cli(["sweep", str(spec), "--dry-run", "--max-cells", "1200", "--executor", "serial"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sweep s: 1200 cells") and len(out) == 1201
    assert time.perf_counter() - start < 30  # ~1 s; generous for a loaded machine


def test_beyond_duplicate_and_colliding_cells(tmp_path: Path) -> None:
    def names(grid) -> list[str]:
        data = {"name": "x", "output_dir": str(tmp_path), "grid": grid}
        return [c.name for c in expand(spec_from_mapping(data), check=False)]

    assert names({"seed": [0, 0, 1]}) == ["padim-sequential-seed0", "padim-sequential-seed1"]  # a repeated value: once
    same = names({"tasks": [["a b"], ["a_b"]]})  # equal after sanitising: the second gets a digest
    assert same[0] == "padim-sequential-tasks_a_b-seed0" and same[1].startswith("padim-sequential-tasks_a_b-seed0-")
    case = names({"tasks": [["Alpha"], ["alpha"]]})  # one folder on macOS / Windows
    assert len({n.casefold() for n in case}) == 2


def test_beyond_a_grid_key_that_is_not_a_run_key_is_one_line(tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "data", {"sed": [0, 1]})
    assert cli(["sweep", str(spec)]) == 2
    assert "unknown key 'sed'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "sweeps").exists()


def test_beyond_ray_missing_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "data", {"seed": [0]})
    assert cli(["sweep", str(spec), "--executor", "ray"]) == 2
    assert "Ray is not installed (pip install 'clbench[ray]')" in one_error_line(capsys.readouterr().err)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_beyond_a_full_disk_before_the_sweep_starts_is_one_line(data_root: Path, tmp_path: Path, capsys,
                                                                monkeypatch) -> None:
    from clbench.engine import atomic

    spec = write_spec(tmp_path / "spec.yaml", data_root, {"seed": [0]})
    monkeypatch.setattr(atomic, "write_with", no_space)
    assert cli(["sweep", str(spec), "--executor", "serial"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.endswith("sweeps/s: cannot write the sweep folder (No space left on device)")


def test_beyond_a_full_disk_during_a_sweep_stops_starting_cells(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    import clbench.sweep.run as sweep

    started: list[str] = []

    def full_disk_cell(cell: Cell) -> CellResult:
        started.append(cell.name)
        return CellResult(cell.name, "failed", error="OSError: [Errno 28] No space left on device", errno=errno.ENOSPC)

    spec = write_spec(tmp_path / "spec.yaml", data_root, {"seed": [0, 1, 2]})
    lines: list[str] = []
    real_status = sweep._write_status
    writes = []

    def status_then_full(*args) -> None:  # the first status.json is written, later ones hit the full disk
        writes.append(1)
        if len(writes) > 1:
            no_space()
        real_status(*args)

    monkeypatch.setattr(sweep, "_write_status", status_then_full)
    outcome = run_sweep(spec, "serial", echo=lines.append, cell_fn=full_disk_cell)
    assert started == ["padim-sequential-seed0"]
    assert [l for l in lines if l.startswith("warning")] == [
        f"warning: cannot write {outcome.sweep_dir / 'status.json'} (No space left on device); "
        "the cells' run folders still record their state"]
    assert any(l.startswith("stopping: the disk is full") for l in lines)
    assert lines[-1] == "sweep s: 0 of 3 cells complete, 1 failed, 2 not started"
    status = json.loads((outcome.sweep_dir / "status.json").read_text())["cells"]
    assert {s["status"] for s in status.values()} == {"pending"}  # the last status that could be written


def test_beyond_a_sweep_never_writes_into_a_folder_it_did_not_create(tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "data", {"seed": [0]}, name="docs")
    docs = tmp_path / "sweeps" / "docs"
    docs.mkdir(parents=True)
    (docs / "thesis.tex").write_text("mine")
    (docs / "status.json").write_text('{"mine": true}')
    assert cli(["sweep", str(spec), "--executor", "serial"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.endswith("docs: exists and is not a clbench sweep folder (no sweep.yaml); choose another 'name' or --output")
    assert sorted(p.name for p in docs.iterdir()) == ["status.json", "thesis.tex"]
    assert (docs / "status.json").read_text() == '{"mine": true}'
    (tmp_path / "sweeps" / "afile").write_text("x")
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "data", {"seed": [0]}, name="afile")
    assert cli(["sweep", str(spec), "--dry-run"]) == 2
    assert "afile: is a file" in one_error_line(capsys.readouterr().err)


# -- beyond the list: reports ------------------------------------------------------------------
def test_beyond_report_over_what_is_not_a_sweep(tmp_path: Path, real_sweep: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    run = real_sweep / "runs" / "padim-sequential-seed0"
    for target, expected in ((tmp_path / "empty", "not a sweep folder (no sweep.yaml and no run folders"),
                             (tmp_path / "file", "is a file, not a sweep folder"),
                             (tmp_path / "missing", "sweep folder not found"),
                             (run, f"this is a run folder, not a sweep (its plots: clbench plot {run})")):
        assert report_cli([str(target)]) == 2
        assert expected in one_error_line(capsys.readouterr().err)
    assert not (run / "report").exists()


@pytest.mark.slow
def test_beyond_report_output_that_is_a_file_or_someone_elses_folder(sweep_copy: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "out.txt"
    target.write_text("mine")
    assert report_cli([str(sweep_copy), "--output", str(target)]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("out.txt: is a file, not a folder; give the report another --output")
    home = tmp_path / "home"
    home.mkdir()
    (home / "summary.md").write_text("my notes")
    assert report_cli([str(sweep_copy), "--output", str(home)]) == 2
    assert "home: exists and is not a clbench report folder" in one_error_line(capsys.readouterr().err)
    assert (home / "summary.md").read_text() == "my notes" and sorted(p.name for p in home.iterdir()) == ["summary.md"]
    assert report_cli([str(sweep_copy), "--output", str(tmp_path / "new")]) == 0  # a new folder: fine, and again
    assert report_cli([str(sweep_copy), "--output", str(tmp_path / "new")]) == 0


def test_beyond_report_on_a_full_disk_is_one_line(sweep_copy: Path, capsys, monkeypatch) -> None:
    from clbench.engine import atomic

    monkeypatch.setattr(atomic, "write_with", no_space)
    assert report_cli([str(sweep_copy)]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("report: cannot write the report (No space left on device)")


def test_beyond_report_never_reads_outside_the_sweep(sweep_copy: Path, tmp_path: Path) -> None:
    import shutil

    import pandas as pd

    from clbench.reporting.report import build_report

    secret = tmp_path / "elsewhere" / "private-run"
    shutil.copytree(sweep_copy / "runs" / "padim-sequential-seed1", secret)
    data = yaml.safe_load((sweep_copy / "sweep.yaml").read_text())
    data["cells"][1]["run_dir"] = "../elsewhere/private-run"
    data["cells"].append("not a mapping")
    (sweep_copy / "sweep.yaml").write_text(yaml.safe_dump(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_report(sweep_copy)
    said = [str(w.message) for w in caught]
    assert ("padim-sequential-seed1: sweep.yaml: run_dir '../elsewhere/private-run' is outside the sweep folder; "
            "left out of the aggregates") in said
    assert "cell #3: sweep.yaml: this entry has no name; left out of the aggregates" in said
    status = {c.name: (c.status, c.note) for c in report.cells}
    assert status["padim-sequential-seed1"][0] == "damaged" and status["cell #3"][0] == "damaged"
    assert set(pd.read_csv(report.out_dir / "runs.csv")["cell"]) == {"padim-sequential-seed0"}


@pytest.mark.slow
def test_beyond_report_survives_hand_edited_files(sweep_copy: Path) -> None:
    from clbench.reporting.report import build_report

    (sweep_copy / "status.json").write_text("[1, 2]")
    run = sweep_copy / "runs" / "padim-sequential-seed1"
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["seed"], config["strategy_params"] = "one", ["not", "a", "mapping"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "env.json").write_text("[]")
    with pytest.warns(UserWarning, match="1 cell\\(s\\) written by an unknown clbench version \\(no readable env.json\\)"):
        report = build_report(sweep_copy)
    assert [c.status for c in report.cells] == ["complete", "complete"]
    summary = json.loads((sweep_copy / "runs" / "padim-sequential-seed0" / "summary.json").read_text())
    summary["metrics"]["pixel_auroc"]["fm"] = None  # strict JSON's NaN
    (sweep_copy / "runs" / "padim-sequential-seed0" / "summary.json").write_text(json.dumps(summary))
    with pytest.warns(UserWarning, match="unknown clbench version"):
        assert len(build_report(sweep_copy).summary) >= 1


def test_beyond_plot_of_a_damaged_run_folder(sweep_copy: Path, capsys) -> None:
    run = sweep_copy / "runs" / "padim-sequential-seed0"
    (run / "config.yaml").write_text(": [")
    (run / "env.json").write_text("{bad")
    assert cli(["plot", str(run)]) == 0  # titles show '?'
    lines = capsys.readouterr().err.splitlines()  # each warning is one 'warning: ...' line
    named = {line.split(": unreadable")[0].rsplit("/", 1)[-1] for line in lines if line.startswith("warning: ")}
    assert named >= {"config.yaml", "env.json"}
    (run / "metrics.csv").write_text("a,b\n1,2\n")
    assert cli(["plot", str(run)]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("metrics.csv: no column 'step' (not a clbench metrics.csv)")
    (run / "metrics.csv").write_bytes(b"\x00\xff\xfe")
    assert cli(["plot", str(run)]) == 2
    assert "metrics.csv: unreadable (" in one_error_line(capsys.readouterr().err)


def test_beyond_a_task_named_NA_is_a_name_and_an_empty_value_a_nan(tmp_path: Path) -> None:
    import math

    from clbench.reporting.cells import METRICS_COLUMNS, _read_table

    path = tmp_path / "metrics.csv"
    path.write_text("step,trained_task,eval_task,metric,value\n0,NA,NA,pixel_auroc,\n0,NA,null,pixel_auroc,0.5\n")
    frame = _read_table(path, METRICS_COLUMNS)
    assert list(frame["eval_task"]) == ["NA", "null"] and math.isnan(frame["value"][0]) and frame["value"][1] == 0.5
