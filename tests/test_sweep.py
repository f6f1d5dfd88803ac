"""Sweeps on the built-in synthetic data: cell expansion and names, validation before anything
runs, skip/resume on re-run, a failing cell among good ones, the process pool, Ray, the report.

Kept light at import time (no torch): process-pool workers import this module to unpickle
``crash_on_seed1``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from clbench.engine.config import ConfigError
from clbench.sweep import (Cell, CellResult, LocalExecutor, RayExecutor, add_sweep_parser, available_cores, expand,
                           is_complete, load_spec, run_sweep, spec_from_mapping)

REPO = Path(__file__).resolve().parents[1]
# Tiny cells: 2 tasks at 64 px, random-init ResNet18 layer1, 8 PaDiM features (~3 s each, half of it plots).
BASE = {"tasks": 2, "image_size": 64, "weights": "none", "device": "cpu", "synthetic": False,
        "method_params": {"n_features": 8, "layers": ["layer1"]}}


def write_spec(path: Path, data_root: Path, grid, name: str = "s", **base) -> Path:
    spec = {"name": name, "output_dir": str(path.parent / "sweeps"),
            "base": {**BASE, "data_root": str(data_root), **base}, "grid": grid}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def quiet(_: str) -> None:
    pass


def sweep_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clbench")
    add_sweep_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


# -- expansion and validation (no runs) --------------------------------------------------------
def test_cells_are_the_product_with_unique_deterministic_names(tmp_path: Path) -> None:
    data = {"name": "x", "output_dir": str(tmp_path), "base": {"strategy": "replay", "method_params.n_features": 8},
            "grid": {"method": ["padim", "stfpm"], "strategy_params.buffer_size": [0, 20, 100], "seed": [0, 1],
                     "task_order": ["given"]}}
    cells = expand(spec_from_mapping(data), check=False)
    names = [c.name for c in cells]
    assert len(cells) == 2 * 3 * 2 and len(set(names)) == len(names)
    assert names == [c.name for c in expand(spec_from_mapping(data), check=False)]
    assert names[:3] == ["padim-replay-buffer_size0-seed0", "padim-replay-buffer_size0-seed1",
                         "padim-replay-buffer_size20-seed0"]
    cell = cells[names.index("stfpm-replay-buffer_size100-seed1")]
    assert cell.params == {"method": "stfpm", "strategy_params.buffer_size": 100, "seed": 1, "task_order": "given"}
    assert cell.config["strategy_params"] == {"buffer_size": 100}  # dotted keys -> nested mappings
    assert cell.config["method_params"] == {"n_features": 8}
    assert cell.run_dir == tmp_path.resolve() / "x" / "runs" / cell.name

    # a new grid value adds cells without renaming the existing ones
    data["grid"]["task_order"] = ["given", "shuffle"]
    more = [c.name for c in expand(spec_from_mapping(data), check=False)]
    assert len(more) == 24 and set(names) <= set(more) and "padim-replay-buffer_size20-shuffle-seed1" in more

    # a list of grids is the union of their products; a run listed twice is one cell
    data["grid"] = [{"method": ["padim"], "strategy": ["sequential", "joint"], "seed": [0]},
                    {"method": ["padim"], "strategy": ["sequential"], "seed": [0, 1]},
                    {"method": ["padim"], "method_params.layers": [["layer1", "layer2"]], "seed": [0]}]
    data["base"] = {}
    assert [c.name for c in expand(spec_from_mapping(data), check=False)] == [
        "padim-sequential-seed0", "padim-joint-seed0", "padim-sequential-seed1",
        "padim-sequential-layers_layer1+layer2-seed0"]


def test_per_method_settings_apply_to_that_methods_cells_and_the_grid_wins(tmp_path: Path) -> None:
    data = {"name": "x", "output_dir": str(tmp_path), "base": {"image_size": 64},
            "per_method": {"stfpm": {"image_size": 96, "method_params.epochs": 3, "strategy_params.buffer_size": 7},
                           "padim": {"method_params.n_features": 8}},
            "grid": [{"method": ["padim", "stfpm"], "strategy": ["replay"], "seed": [0]},
                     {"method": ["stfpm"], "strategy": ["replay"], "strategy_params.buffer_size": [20], "seed": [0]}]}
    cells = {c.name: c for c in expand(spec_from_mapping(data), check=True)}
    assert list(cells) == ["padim-replay-seed0", "stfpm-replay-seed0", "stfpm-replay-buffer_size20-seed0"]
    assert cells["padim-replay-seed0"].config["image_size"] == 64
    assert cells["padim-replay-seed0"].config["method_params"] == {"n_features": 8}
    assert cells["stfpm-replay-seed0"].config["image_size"] == 96
    assert cells["stfpm-replay-seed0"].config["method_params"] == {"epochs": 3}
    assert cells["stfpm-replay-seed0"].config["strategy_params"] == {"buffer_size": 7}
    assert cells["stfpm-replay-buffer_size20-seed0"].config["strategy_params"] == {"buffer_size": 20}  # grid wins
    with pytest.raises(ConfigError, match="per_method.stfpm: 'method' cannot be set"):
        spec_from_mapping({**data, "per_method": {"stfpm": {"method": "padim"}}})
    with pytest.raises(ConfigError, match="'per_method' must map method names"):
        spec_from_mapping({**data, "per_method": ["stfpm"]})
    with pytest.raises(ConfigError, match="unknown key 'imag_size'"):
        expand(spec_from_mapping({**data, "per_method": {"stfpm": {"imag_size": 3}}}), check=False)


def test_example_config_expands() -> None:
    cells = expand(load_spec(REPO / "configs" / "sweep_example.yaml"), check=False)
    names = [c.name for c in cells]
    assert len(names) == 20 and len(set(names)) == 20
    assert "padim-replay-buffer_size20-seed1" in names and "stfpm-joint-seed0" in names


@pytest.mark.parametrize("grid, message", [
    ({"seed": [0], "method_params.n_featurs": [8]}, "unknown key 'n_featurs' for method 'padim'"),
    ({"sed": [0, 1]}, "unknown key 'sed' \\(known: method, "),
    ({"strategy_param.buffer_size": [0]}, "unknown key 'strategy_param' in 'strategy_param.buffer_size'"),
    ({"seed.x": [0]}, "'seed' is not a mapping, cannot set 'seed.x'"),
    ({"strategy": ["sequential"], "strategy_params.buffer_size": [20]},
     "unknown key 'buffer_size' for strategy 'sequential'"),
    ({"method": ["padim", "padimm"]}, "cell padimm-sequential-seed0: unknown method 'padimm'"),
    ({"image_size": [64, 16]}, "image_size=16 is not an integer >= 32"),
    ({"seed": 0}, "'seed' must be a non-empty list"),
    ([{"seed": [0]}, {"seed": [1], "name": ["x"]}], "'name' is set by the sweep"),
])
def test_a_bad_key_stops_the_sweep_before_anything_runs(synthetic_root: Path, tmp_path: Path, grid, message) -> None:
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, grid)
    with pytest.raises(ConfigError, match=message) as err:
        run_sweep(spec, "serial", echo=quiet)
    assert "\n" not in str(err.value) and str(spec) in str(err.value)
    assert not (tmp_path / "sweeps").exists()


def test_dry_run_lists_cells_and_writes_nothing(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, {"seed": [0, 1]})
    assert sweep_cli(["sweep", str(spec), "--dry-run", "--executor", "serial"]) == 0
    out = capsys.readouterr().out
    assert "2 cells" in out and "run      padim-sequential-seed1" in out
    assert not (tmp_path / "sweeps").exists()


def test_ray_missing_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'clbench\[ray\]'"):
        RayExecutor()


def test_cells_with_different_tasks_on_one_synthetic_root_are_prepared_before_the_workers(tmp_path: Path) -> None:
    """Preparation was once per data_root: the 1-task cell generated one category and the 2-task
    cell's second category was left to its worker (parallel workers generating into one folder)."""
    root = tmp_path / "generated"
    spec = write_spec(tmp_path / "spec.yaml", root, {"tasks": [1, 2]}, synthetic=True, image_size=32)
    present: list[list[str]] = []

    def record(cell: Cell) -> CellResult:
        present.append(sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir()))
        return CellResult(cell.name, "ran")

    run_sweep(spec, "serial", cell_fn=record, echo=quiet)
    assert len(present) == 2 and all(len(names) == 2 for names in present)


# -- real sweeps -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(synthetic_root: Path, tmp_path_factory):
    """2 strategies x 2 seeds, serial, run once for this module."""
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(root / "spec.yaml", synthetic_root, {"strategy": ["sequential", "joint"], "seed": [0, 1]})
    lines: list[str] = []
    outcome = run_sweep(spec, "serial", echo=lines.append)
    return spec, outcome, lines


@pytest.mark.slow
def test_serial_sweep_runs_then_skips_then_resumes_only_the_killed_cell(finished_sweep) -> None:
    spec, outcome, lines = finished_sweep
    assert [outcome.results[c.name].status for c in outcome.cells] == ["ran"] * 4
    assert [c.name for c in outcome.cells] == ["padim-sequential-seed0", "padim-sequential-seed1",
                                               "padim-joint-seed0", "padim-joint-seed1"]
    assert all(is_complete(c.run_dir) for c in outcome.cells)
    saved = yaml.safe_load((outcome.sweep_dir / "sweep.yaml").read_text())
    assert [c["name"] for c in saved["cells"]] == [c.name for c in outcome.cells]
    assert saved["cells"][2]["params"] == {"strategy": "joint", "seed": 0} and saved["base"]["tasks"] == 2
    status = json.loads((outcome.sweep_dir / "status.json").read_text())["cells"]
    assert {s["status"] for s in status.values()} == {"complete"}
    assert "step 1" in (outcome.sweep_dir / "logs" / "padim-sequential-seed0.log").read_text()

    def stamps() -> dict[str, int]:
        return {c.name: (c.run_dir / "metrics.csv").stat().st_mtime_ns for c in outcome.cells}

    before = stamps()
    again = run_sweep(spec, "serial", echo=quiet)
    assert {r.status for r in again.results.values()} == {"skipped"} and stamps() == before

    victim = outcome.cells[1]
    reference = (victim.run_dir / "metrics.csv").read_bytes()
    (victim.run_dir / "summary.json").unlink()  # killed before the end: no summary, no checkpoint yet
    (victim.run_dir / "checkpoint.pt").unlink()
    third = run_sweep(spec, "serial", echo=quiet)
    assert {n: r.status for n, r in third.results.items()} == {
        c.name: ("resumed" if c is victim else "skipped") for c in outcome.cells}
    after = stamps()
    assert after[victim.name] != before[victim.name]
    assert {n: t for n, t in after.items() if n != victim.name} == {n: t for n, t in before.items() if n != victim.name}
    assert is_complete(victim.run_dir) and (victim.run_dir / "metrics.csv").read_bytes() == reference


@pytest.mark.slow
def test_a_finished_cell_that_no_longer_matches_the_spec_is_reported(finished_sweep, tmp_path: Path) -> None:
    spec, outcome, _ = finished_sweep
    data = yaml.safe_load(spec.read_text())
    data["base"]["val_fraction"] = 0.2
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    result = run_sweep(changed, "serial", echo=quiet, dry_run=True)
    assert {r.status for r in result.results.values()} == {"failed"}
    assert "val_fraction: was 0.1, the spec says 0.2" in result.results["padim-joint-seed0"].error


@pytest.mark.slow
def test_report_of_a_real_sweep(finished_sweep) -> None:
    import numpy as np
    import pandas as pd

    from clbench.reporting.report import build_report

    _, outcome, _ = finished_sweep
    report = build_report(outcome.sweep_dir)
    out = outcome.sweep_dir / "report"
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.strategy) == ["sequential", "joint"] and list(summary.n_seeds) == [2, 2]
    for strategy in ("sequential", "joint"):
        cells = [json.loads((c.run_dir / "summary.json").read_text()) for c in outcome.cells
                 if c.config["strategy"] == strategy]
        row = summary[summary.strategy == strategy].iloc[0]
        for metric in ("pixel_auroc", "image_auroc", "pixel_aupro"):
            for stat in ("acc", "bwt", "fm") if strategy == "sequential" else ("acc",):
                values = [c["metrics"][metric][stat] for c in cells]
                assert row[f"{metric}_{stat}_mean"] == pytest.approx(np.mean(values))
                assert row[f"{metric}_{stat}_std"] == pytest.approx(np.std(values, ddof=1))
        assert row.memory_mb_mean > 0 and row.peak_rss_mb_mean > row.memory_mb_mean
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == sum(len(pd.read_csv(c.run_dir / "metrics.csv")) for c in outcome.cells)
    assert set(runs.buffer_size) == {0} and set(runs.pretrained) == {False} and runs.complete.all()
    for name in ("summary.md", "summary.html", "cells.csv", "plots/acc_vs_replay_pixel_auroc.png",
                 "plots/fm_vs_replay_pixel_auroc.png", "plots/memory_vs_replay.png",
                 "plots/heatmap_pixel_auroc_padim-sequential.png", "plots/heatmap_pixel_auroc_padim-joint.png"):
        assert (out / name).is_file(), name
    assert "| padim  | sequential |      0 |     2 |" in report.markdown


@pytest.mark.slow
def test_process_pool_runs_cells_in_parallel_and_reports_a_failing_cell(synthetic_root: Path, tmp_path: Path,
                                                                         capsys) -> None:
    first = sorted(p.name for p in synthetic_root.iterdir() if (p / "train").is_dir())[0]
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, {"tasks": [[first], [first, "nope"]]})
    assert sweep_cli(["sweep", str(spec), "--executor", "local", "--workers", "2"]) == 1  # a cell failed
    out = capsys.readouterr().out
    bad, good = f"padim-sequential-tasks_{first}+nope-seed0", f"padim-sequential-tasks_{first}-seed0"
    assert f"FAILED  {bad}: ValueError: tasks: unknown category 'nope'" in out
    assert "1 of 2 cells complete, 1 failed" in out
    sweep_dir = tmp_path / "sweeps" / "s"
    assert is_complete(sweep_dir / "runs" / good)
    env = json.loads((sweep_dir / "runs" / good / "env.json").read_text())
    assert env["torch_threads"] == max(1, available_cores() // 2)  # cores split between the 2 workers
    assert "Traceback" in (sweep_dir / "logs" / f"{bad}.log").read_text()
    status = json.loads((sweep_dir / "status.json").read_text())["cells"]
    assert status[bad]["status"] == "failed" and status[good]["status"] == "complete"


def crash_on_seed1(cell: Cell) -> CellResult:
    if cell.name.endswith("seed1"):
        os._exit(3)  # a worker killed mid-cell (e.g. by the OOM killer)
    return CellResult(cell.name, "ran")


@pytest.mark.slow
def test_a_dying_worker_fails_only_its_own_cell(tmp_path: Path) -> None:
    cells = [Cell(f"c-seed{i}", {}, {}, str(tmp_path)) for i in range(3)]
    results = {r.name: r for r in LocalExecutor(2).map(crash_on_seed1, cells)}
    assert {n: r.status for n, r in results.items()} == {"c-seed0": "ran", "c-seed1": "failed", "c-seed2": "ran"}
    assert "worker process died" in results["c-seed1"].error


@pytest.mark.slow
def test_ray_executor(synthetic_root: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, {"seed": [0, 1]}, tasks=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run_sweep(spec, "ray", workers=2, echo=quiet)
    finally:
        ray.shutdown()
    assert {r.status for r in outcome.results.values()} == {"ran"} and len(outcome.results) == 2
    for cell in outcome.cells:
        assert is_complete(cell.run_dir)
        assert json.loads((cell.run_dir / "env.json").read_text())["torch_threads"] == 1
