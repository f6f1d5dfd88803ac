"""A sweep's progress and state: the per-cell line (headline ACC/FM, ETA from finished cells' times),
the ETA estimator on known inputs, and ``clbench status`` on a partially finished sweep built from
one real tiny cell (the other states are fabricated from copies of its run folder)."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clbench.cli import main
from clbench.sweep import Cell, CellResult, SerialExecutor, run_cell, run_sweep
from clbench.sweep.progress import duration, eta_seconds, headline

BASE = {"tasks": 2, "image_size": 32, "weights": "none", "device": "cpu", "synthetic": False,
        "method_params": {"n_features": 8, "layers": ["layer1"]}}


def write_spec(tmp: Path, data_root: Path, seeds: list[int], name: str = "s") -> Path:
    spec = {"name": name, "output_dir": str(tmp / "sweeps"), "base": {**BASE, "data_root": str(data_root)},
            "grid": {"seed": seeds}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# -- the estimator and the pieces of a line (no runs) ---------------------------------------------
def test_eta_is_mean_finished_time_times_remaining_over_cells_at_a_time() -> None:
    assert eta_seconds([60.0, 120.0], remaining=6, workers=3) == pytest.approx(180.0)  # 90 s x 6 / 3
    assert eta_seconds([100.0], remaining=1, workers=8) == pytest.approx(100.0)  # one cell left runs alone
    assert eta_seconds([30.0, 30.0, 90.0], remaining=4, workers=1) == pytest.approx(200.0)
    assert eta_seconds([], remaining=5, workers=2) is None  # nothing finished yet: unknown
    assert eta_seconds([10.0], remaining=0, workers=2) == 0.0
    assert [duration(s) for s in (0, 45, 750, 7500, None)] == ["0s", "45s", "12m30s", "2h05m", "unknown"]


def test_headline_reads_pixel_auroc_acc_and_fm_safely() -> None:
    summary = {"metrics": {"pixel_auroc": {"acc": 0.46586, "fm": 0.30612}, "image_auroc": {"acc": 0.9, "fm": 0.1}}}
    assert headline(summary) == "pixel_auroc ACC 0.466 FM 0.306"
    assert headline({"metrics": {"pixel_auroc": {"acc": None, "fm": float("nan")}}}) == "pixel_auroc ACC n/a FM n/a"
    assert headline({"metrics": {"image_auroc": {"acc": 0.9}}}) == "" and headline({}) == ""
    assert headline({"metrics": "garbage"}) == ""


def test_each_line_carries_the_eta_from_cells_that_ran(synthetic_root: Path, tmp_path: Path) -> None:
    """Times 10 s and 20 s, then a skipped cell (does not count), then a failure, serial: the ETA
    after each is mean(ran) x remaining."""
    seconds = {"padim-sequential-seed0": ("ran", 10.0), "padim-sequential-seed1": ("ran", 20.0),
               "padim-sequential-seed2": ("skipped", 0.0), "padim-sequential-seed3": ("failed", 1.0)}

    def fake(cell: Cell) -> CellResult:
        status, secs = seconds[cell.name]
        return CellResult(cell.name, status, secs, error="RuntimeError: boom" if status == "failed" else None)

    lines: list[str] = []
    run_sweep(write_spec(tmp_path, synthetic_root, [0, 1, 2, 3]), "serial", cell_fn=fake, echo=lines.append)
    cell_lines = [line for line in lines if line.startswith("[")]
    assert [line.split("| ")[1] for line in cell_lines[:3]] == [
        "1/4 done, ETA 30s",  # 10 s x 3 left
        "2/4 done, ETA 30s",  # mean 15 s x 2 left
        "3/4 done, ETA 15s",  # the skipped cell adds no time: 15 s x 1 left
    ]
    assert re.search(r"\| 4/4 done in \d+s$", cell_lines[3]) and "FAILED  padim-sequential-seed3: RuntimeError: boom" in cell_lines[3]


class LateExecutor(SerialExecutor):
    """Like Ray: knows its cells at a time only once ``map`` has started."""

    workers = None
    cells_at_a_time = None

    def map(self, fn, cells):
        self.cells_at_a_time = 2
        yield from super().map(fn, cells)


def test_the_eta_divides_by_the_cells_the_executor_runs_at_a_time(synthetic_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    run_sweep(write_spec(tmp_path, synthetic_root, [0, 1, 2, 3, 4]), LateExecutor(),
              cell_fn=lambda c: CellResult(c.name, "ran", 60.0), echo=lines.append)
    assert "1/5 done, ETA 2m00s" in lines[1]  # 60 s x 4 left / 2 at a time


# -- a partially finished sweep ------------------------------------------------------------------
@pytest.fixture(scope="module")
def partial_sweep(synthetic_root: Path, tmp_path_factory):
    """seed0 runs for real; seed2 fails; seed3 is never started; seed1 and seed4 are copies of seed0
    cut back to their first step (killed), seed1 then held by another process (running)."""
    tmp = tmp_path_factory.mktemp("status")
    spec = write_spec(tmp, synthetic_root, [0, 1, 2, 3, 4])

    def cell_fn(cell: Cell) -> CellResult:
        if cell.name.endswith("seed0"):
            return run_cell(cell)
        if cell.name.endswith("seed2"):
            return CellResult(cell.name, "failed", 0.5, error="RuntimeError: CUDA out of memory")
        return CellResult(cell.name, "skipped")  # wrote nothing: the others' folders are made below

    lines: list[str] = []
    outcome = run_sweep(spec, "serial", cell_fn=cell_fn, echo=lines.append)
    runs = outcome.sweep_dir / "runs"
    done = runs / "padim-sequential-seed0"
    for seed in (1, 4):
        killed = runs / f"padim-sequential-seed{seed}"
        shutil.rmtree(killed, ignore_errors=True)
        shutil.copytree(done, killed, ignore=shutil.ignore_patterns(".lock"))
        (killed / "summary.json").unlink()
        rows = (killed / "metrics.csv").read_text().splitlines(keepends=True)
        (killed / "metrics.csv").write_text("".join(r for r in rows if not r.startswith("1,")))
    return outcome, lines


def test_a_real_cells_line_has_its_acc_and_fm(partial_sweep) -> None:
    outcome, lines = partial_sweep
    summary = json.loads((outcome.sweep_dir / "runs" / "padim-sequential-seed0" / "summary.json").read_text())
    acc, fm = summary["metrics"]["pixel_auroc"]["acc"], summary["metrics"]["pixel_auroc"]["fm"]
    assert math.isfinite(acc)
    line = next(line for line in lines if "padim-sequential-seed0 (" in line)
    assert f"pixel_auroc ACC {acc:.3f} FM {fm:.3f}  | 1/5 done, ETA " in line


@pytest.mark.slow
def test_status_names_each_state_a_running_cells_step_and_a_failed_cells_error(partial_sweep, capsys) -> None:
    outcome, _ = partial_sweep
    running = outcome.sweep_dir / "runs" / "padim-sequential-seed1"
    tasks = yaml.safe_load((running / "config.yaml").read_text())["tasks"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom clbench.engine.locks import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n", str(running)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["status", str(outcome.sweep_dir)]) == 0
    finally:
        holder.kill()
        holder.wait()
    out = capsys.readouterr().out.splitlines()
    cell_row = re.compile(r"^  (done|running|FAILED|damaged|to run) +([^\s:]+)")
    rows = {cell_row.match(line).group(2): line for line in out[1:-1]}
    assert rows["padim-sequential-seed0"].split()[0] == "done" and "pixel_auroc ACC " in rows["padim-sequential-seed0"]
    assert rows["padim-sequential-seed1"].split()[0] == "running"
    assert rows["padim-sequential-seed1"].endswith(f"pid {holder.pid}, step 1 of 2 done (last: {tasks[0]})")
    assert rows["padim-sequential-seed2"].split()[0] == "FAILED"
    assert re.match(r"\s*FAILED\s+padim-sequential-seed2\s+RuntimeError: CUDA out of memory$", rows["padim-sequential-seed2"])
    assert re.match(r"\s*to run\s+padim-sequential-seed3\s+not started$", rows["padim-sequential-seed3"])
    assert re.match(r"\s*to run\s+padim-sequential-seed4\s+resumes after 1 step\(s\)$", rows["padim-sequential-seed4"])
    assert out[-1] == "5 cells: 1 done, 1 running, 1 failed, 0 damaged, 2 to run"
    # once the holder is gone, the killed cell is one to resume
    assert main(["status", str(outcome.sweep_dir)]) == 0
    again = capsys.readouterr().out
    assert re.search(r"to run\s+padim-sequential-seed1\s+resumes after 1 step\(s\)", again)
    assert again.rstrip().endswith("5 cells: 1 done, 0 running, 1 failed, 0 damaged, 3 to run")
