"""The sweep report for any strategy: cells grouped by strategy and its telling params
(``replay(buffer_size=4)``, ``ewc(ewc_lambda=1000)``), the memory spent on continual learning
(``cl_memory_mb``) from memory.csv, and the main plot against it, on real engine runs."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from clbench.reporting.cells import strategy_label
from clbench.reporting.report import build_report
from helpers import engine_run

PNG = b"\x89PNG\r\n\x1a\n"
CELLS = {  # run name -> (strategy, strategy_params)
    "stfpm-sequential-seed0": ("sequential", {}),
    "stfpm-replay-buffer_size4-seed0": ("replay", {"buffer_size": 4}),
    "stfpm-ewc-seed0": ("ewc", {"ewc_lambda": 1000}),
}


@pytest.fixture(scope="module")
def sweep(synthetic_root: Path, tmp_path_factory) -> Path:
    """Three short STFPM runs (2 tasks, 1 epoch) in a sweep folder's runs/ (no sweep.yaml: the report
    finds every runs/* folder)."""
    sweep_dir = tmp_path_factory.mktemp("strategies") / "sweep"
    for name, (strategy, params) in CELLS.items():
        engine_run("stfpm", strategy, params, synthetic_root, sweep_dir / "runs", name=name, plots=False)
    return sweep_dir


def test_labels_name_the_strategy_and_its_non_default_params() -> None:
    assert strategy_label("sequential", {}) == "sequential"
    assert strategy_label("ewc", {"ewc_lambda": 100.0, "decay_factor": 1.0}) == "ewc"  # the declared defaults
    assert strategy_label("ewc", {"ewc_lambda": 1000, "decay_factor": 1.0}) == "ewc(ewc_lambda=1000)"
    assert strategy_label("ewc", {"ewc_lambda": 100.0, "decay_factor": 1.0}, {"ewc_lambda"}) == "ewc(ewc_lambda=100.0)"
    # a buffer size is the memory axis: named even at its default; the default policy is not
    assert strategy_label("replay", {"buffer_size": 100, "policy": "balanced"}) == "replay(buffer_size=100)"
    assert strategy_label("replay", {"buffer_size": 20, "policy": "reservoir"}) == "replay(buffer_size=20, policy=reservoir)"
    assert strategy_label("replay+ewc", {"buffer_size": 4, "policy": "balanced", "ewc_lambda": 2.0,
                                         "decay_factor": 1.0}) == "replay+ewc(buffer_size=4, ewc_lambda=2.0)"
    # a strategy this clbench does not know: every param as written
    assert strategy_label("nope", {"b": 2, "a": 1}) == "nope(a=1, b=2)"


@pytest.mark.slow
def test_report_groups_any_strategy_and_counts_cl_memory(sweep: Path) -> None:
    report = build_report(sweep)
    summary = pd.read_csv(sweep / "report" / "summary.csv")
    assert sorted(summary.strategy_label) == ["ewc(ewc_lambda=1000)", "replay(buffer_size=4)", "sequential"]
    cells = pd.read_csv(sweep / "report" / "cells.csv").set_index("cell")
    for name in CELLS:
        memory = pd.read_csv(sweep / "runs" / name / "memory.csv")
        final = memory[memory.step == memory.step.max()]
        expected = final[final.component.isin(["replay_buffer", "strategy_state"])]["bytes"].sum() / 1e6
        assert cells.loc[name, "cl_memory_mb"] == pytest.approx(expected, rel=1e-12)
        row = summary[summary.strategy_label == cells.loc[name, "strategy_label"]].iloc[0]
        assert row.cl_memory_mb_mean == pytest.approx(expected, rel=1e-12)
    # the runs really differ in what they keep: nothing, a buffer, EWC's importance and anchor
    assert cells.loc["stfpm-sequential-seed0", "cl_memory_mb"] == 0
    assert cells.loc["stfpm-replay-buffer_size4-seed0", "cl_memory_mb"] > 0
    assert cells.loc["stfpm-ewc-seed0", "cl_memory_mb"] > cells.loc["stfpm-replay-buffer_size4-seed0", "cl_memory_mb"]
    # tables: the strategy column is the label once a strategy is not sequential / joint / replay
    header = next(line for line in report.markdown.splitlines() if line.startswith("| method"))
    assert header.split("|")[2].strip() == "strategy" and "buffer" not in header and "CL memory MB" in header
    assert "| ewc(ewc_lambda=1000)  |" in report.markdown and "| replay(buffer_size=4) |" in report.markdown
    replay_mb = cells.loc["stfpm-replay-buffer_size4-seed0", "cl_memory_mb"]
    assert f" {replay_mb:.3f} |\n" in report.markdown  # a small buffer is not rounded to 0.0
    plots = {p.name for p in report.files if p.suffix == ".png"}
    assert {"acc_fm_vs_cl_memory_pixel_auroc.png", "acc_vs_replay_pixel_auroc.png",
            "heatmap_pixel_auroc_stfpm-ewc-ewc_lambda1000.png", "heatmap_pixel_auroc_stfpm-replay-buffer4.png",
            "heatmap_pixel_auroc_stfpm-sequential.png"} <= plots
    main = sweep / "report" / "plots" / "acc_fm_vs_cl_memory_pixel_auroc.png"
    assert main.read_bytes()[:8] == PNG and main.stat().st_size > 10_000
    assert report.markdown.index("acc_fm_vs_cl_memory") < report.markdown.index("acc_vs_replay")  # the main plot first


def test_the_cl_memory_plot_legend_is_a_colour_per_method_and_a_marker_per_strategy() -> None:
    from clbench.reporting.sweep_plots import _cl_memory_legend

    summary = pd.DataFrame([{"method": m, "strategy": s} for m in ("cfa", "stfpm")
                            for s in ("sequential", "replay", "ewc", "latent_replay", "joint")])
    handles = _cl_memory_legend(summary, ["method"])
    assert [h.get_label() for h in handles] == ["cfa", "stfpm", "ewc", "latent_replay", "replay",
                                                "sequential (lower bound)", "joint (upper bound)"]
    assert len({h.get_color() for h in handles[:2]}) == 2 and len({h.get_marker() for h in handles[2:]}) == 5


def test_a_strategy_parameter_of_the_grid_is_in_the_label_not_a_column(tmp_path: Path) -> None:
    from clbench.reporting.cells import _entries

    spec = {"grid": [{"strategy": ["ewc"], "strategy_params.ewc_lambda": [1, 10], "method_params.k": [1, 2]},
                     {"strategy": ["replay"], "strategy_params.buffer_size": [4]}],
            "cells": [{"name": "a", "config": {}}]}
    _, extras = _entries(tmp_path, spec)
    assert extras == ["method_params.k"]
    assert strategy_label("ewc", {"ewc_lambda": 10}, {"ewc_lambda"}) == "ewc(ewc_lambda=10)"


@pytest.mark.slow
def test_the_report_draws_one_probe_panel_per_strategy_from_stored_maps(sweep: Path, tmp_path: Path) -> None:
    """Sweep cells draw no plots; the report draws the first task's probe-map panel of one cell per
    method and strategy setting from the maps each cell stored, and embeds it in the HTML page."""
    report = build_report(sweep, out_dir=tmp_path / "report")
    drawn = sorted(p.relative_to(tmp_path / "report").as_posix() for p in report.files if "/maps/" in p.as_posix())
    first_task = sorted(pd.read_csv(sweep / "runs" / "stfpm-sequential-seed0" / "metrics.csv").eval_task)[0]
    assert drawn == sorted(f"plots/maps/{cell}/maps_{first_task}.png" for cell in CELLS)
    page = (tmp_path / "report" / "summary.html").read_text()
    assert page.count("<details") >= len(CELLS) and 'src="data:image/png;base64,' in page
    assert not list((sweep / "runs").glob("*/plots/maps_*.png"))  # nothing written into the runs
