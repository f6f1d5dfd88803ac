"""The sweep report on hand-made run folders (replay sizes, bounds, incomplete and failed cells):
aggregates equal mean/std of the cells' summary.json values, tables, plots, the CLI."""
from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from clbench.metrics.forgetting import summarize, summarize_joint
from clbench.reporting.report import add_report_parser, build_report
from clbench.reporting.tables import markdown_table

TASKS = ["alpha", "beta", "gamma"]
METRICS = ("pixel_auroc", "image_auroc", "pixel_aupro", "pixel_ap")
PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir: Path, *, method: str, strategy: str, seed: int, buffer_size: int | None = None,
             tasks: list[str] = TASKS, steps_done: int | None = None, method_state: int = 2_000_000,
             n_features: int = 100) -> None:
    """A run folder as the runner writes it; values depend on (method, strategy, buffer, seed)."""
    rng = np.random.default_rng(zlib.crc32(repr((method, strategy, buffer_size, seed, n_features)).encode()))
    joint = strategy == "joint"
    n_steps = 1 if joint else len(tasks)
    done = n_steps if steps_done is None else steps_done
    run_dir.mkdir(parents=True)
    params = {} if buffer_size is None else {"buffer_size": buffer_size, "policy": "balanced"}
    config = {"method": method, "method_params": {"backbone": "resnet18", "n_features": n_features}, "strategy": strategy,
              "strategy_params": params, "tasks": tasks, "task_order": "given", "seed": seed,
              "backbone": "resnet18", "name": run_dir.name}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "env.json").write_text(json.dumps({"weights": {"pretrained": False, "source": "none"}}))
    metric_rows, memory_rows, summary = [], [], {"complete": True, "steps": n_steps, "tasks": tasks, "metrics": {}}
    for metric in METRICS:
        R = rng.uniform(0.5, 1.0, size=(n_steps, len(tasks)))
        for step in range(done):
            label = "joint" if joint else tasks[step]
            metric_rows += [dict(step=step, trained_task=label, eval_task=t, metric=metric, value=R[step, j])
                            for j, t in enumerate(tasks)]
        summary["metrics"][metric] = summarize_joint(R[-1]) if joint else summarize(R)
    for step in range(done):
        label = "joint" if joint else tasks[step]
        replay = (buffer_size or 0) * 12_288 * min(step, 1)
        for component, size in (("model_frozen", 44_000_000), ("method_state", method_state),
                                ("replay_buffer", replay), ("peak_rss", int(rng.integers(800, 900)) * 1_000_000)):
            memory_rows.append(dict(step=step, trained_task=label, component=component, bytes=size))
    pd.DataFrame(metric_rows).to_csv(run_dir / "metrics.csv", index=False)
    pd.DataFrame(memory_rows).to_csv(run_dir / "memory.csv", index=False)
    if done == n_steps:
        (run_dir / "summary.json").write_text(json.dumps(summary))


def fake_sweep(root: Path, buffers=(0, 20, 100), methods=("padim", "stfpm"), seeds=(0, 1)) -> Path:
    """Replay cells over buffer sizes, sequential and joint bounds; the last stfpm replay cell was
    killed after one step, one cell never started, one failed at start-up (status.json)."""
    sweep_dir = root / "sweep"
    cells = []
    for method in methods:
        for buffer in buffers:
            for seed in seeds:
                cells.append((f"{method}-replay-buffer_size{buffer}-seed{seed}", method, "replay", buffer, seed))
        for strategy in ("sequential", "joint"):
            for seed in seeds:
                cells.append((f"{method}-{strategy}-seed{seed}", method, strategy, None, seed))
    killed = f"stfpm-replay-buffer_size{buffers[-1]}-seed{seeds[-1]}"
    never, failed = "padim-replay-buffer_size999-seed0", "padim-replay-buffer_size998-seed0"
    for name, method, strategy, buffer, seed in cells:
        fake_run(sweep_dir / "runs" / name, method=method, strategy=strategy, seed=seed, buffer_size=buffer,
                 steps_done=1 if name == killed else None)
    entries = [{"name": c[0], "run_dir": f"runs/{c[0]}", "params": {}, "config": {}} for c in cells]
    for name, buffer in ((never, 999), (failed, 998)):
        entries.append({"name": name, "run_dir": f"runs/{name}", "params": {},
                        "config": {"method": "padim", "strategy": "replay", "seed": 0,
                                   "strategy_params": {"buffer_size": buffer}}})
    grid = [{"method": list(methods), "strategy": ["replay"], "strategy_params.buffer_size": list(buffers),
             "seed": list(seeds)}, {"method": list(methods), "strategy": ["sequential", "joint"], "seed": list(seeds)}]
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({"name": "fake", "grid": grid, "cells": entries}))
    status = {"cells": {failed: {"status": "failed", "error": "ValueError: tasks: unknown category 'nope'"}}}
    (sweep_dir / "status.json").write_text(json.dumps(status))
    return sweep_dir


def summaries(sweep_dir: Path, method: str, strategy: str, buffer: int | None) -> list[dict]:
    pattern = f"{method}-{strategy}-" + (f"buffer_size{buffer}-" if buffer is not None else "") + "seed*"
    out = []
    for run in sorted((sweep_dir / "runs").glob(pattern)):
        if (run / "summary.json").is_file():
            out.append(json.loads((run / "summary.json").read_text()))
    return out


@pytest.mark.slow
def test_report_aggregates_over_seeds(tmp_path: Path) -> None:
    sweep_dir = fake_sweep(tmp_path)
    with pytest.warns(UserWarning, match="3 of 22 cells not complete"):
        report = build_report(sweep_dir)
    out = sweep_dir / "report"
    summary = pd.read_csv(out / "summary.csv")
    # 2 methods x (3 replay sizes + sequential + joint)
    assert len(summary) == 10
    assert list(summary.loc[summary.method == "padim", "strategy"]) == ["sequential", "replay", "replay", "replay", "joint"]
    for method in ("padim", "stfpm"):
        for strategy, buffer in [("replay", 0), ("replay", 20), ("replay", 100), ("sequential", None), ("joint", None)]:
            cells = summaries(sweep_dir, method, strategy, buffer)
            row = summary[(summary.method == method) & (summary.strategy == strategy) & (summary.buffer_size == (buffer or 0))]
            assert len(row) == 1
            row = row.iloc[0]
            assert row.n_seeds == len(cells)
            for metric in ("pixel_auroc", "image_auroc", "pixel_aupro"):
                for stat in ("acc", "bwt", "fm"):
                    values = np.array([c["metrics"][metric][stat] for c in cells], dtype=float)
                    mean = row[f"{metric}_{stat}_mean"]
                    std = row[f"{metric}_{stat}_std"]
                    if np.isnan(values).all():  # BWT / FM of joint runs
                        assert np.isnan(mean) and np.isnan(std)
                    elif len(values) == 1:  # the killed stfpm cell leaves one seed: no std
                        assert mean == pytest.approx(values[0]) and np.isnan(std)
                    else:
                        assert mean == pytest.approx(values.mean())
                        assert std == pytest.approx(values.std(ddof=1))
    killed = summary[(summary.method == "stfpm") & (summary.buffer_size == 100)].iloc[0]
    assert killed.n_seeds == 1 and killed.seeds == "0"
    # final memory = method state + replay buffer of the last step; peak RSS = largest step peak
    row = summary[(summary.method == "padim") & (summary.buffer_size == 20)].iloc[0]
    assert row.memory_mb_mean == pytest.approx((2_000_000 + 20 * 12_288) / 1e6)
    assert row.replay_buffer_mb_mean == pytest.approx(20 * 12_288 / 1e6)
    peaks = [pd.read_csv(sweep_dir / "runs" / f"padim-replay-buffer_size20-seed{s}" / "memory.csv")
             .query("component == 'peak_rss'")["bytes"].max() / 1e6 for s in (0, 1)]
    assert row.peak_rss_mb_mean == pytest.approx(np.mean(peaks))

    # runs.csv: every metrics.csv row of every started cell, with the cell's parameters
    runs = pd.read_csv(out / "runs.csv")
    started = [p for p in (sweep_dir / "runs").iterdir() if (p / "metrics.csv").is_file()]
    assert len(runs) == sum(len(pd.read_csv(p / "metrics.csv")) for p in started)
    assert {"cell", "method", "strategy", "buffer_size", "seed", "task_order", "backbone", "pretrained", "complete",
            "step", "trained_task", "eval_task", "metric", "value"} <= set(runs.columns)
    assert set(runs.loc[runs.strategy == "sequential", "buffer_size"]) == {0}
    assert not runs.loc[runs.cell == "stfpm-replay-buffer_size100-seed1", "complete"].any()
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 22 and (cells.status == "complete").sum() == 19
    assert set(cells.loc[cells.status != "complete", "status"]) == {"incomplete", "not started", "failed"}

    # markdown: readable table, incomplete cells listed with why
    md = (out / "summary.md").read_text()
    assert md == report.markdown
    assert "| method | strategy   | buffer | seeds | ACC" in md
    assert "stfpm-replay-buffer_size100-seed1: incomplete — 1 step(s) done, no summary.json" in md
    assert "padim-replay-buffer_size998-seed0: failed — ValueError: tasks: unknown category 'nope'" in md
    assert "padim-replay-buffer_size999-seed0: not started" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len({len(line) for line in table[:12]}) == 1  # padded columns
    assert "<table" in (out / "summary.html").read_text()

    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert {"acc_vs_replay_pixel_auroc.png", "fm_vs_replay_pixel_auroc.png", "memory_vs_replay.png"} <= set(plots)
    heatmaps = [p for p in plots if p.startswith("heatmap_pixel_auroc_")]
    assert len(heatmaps) == 10 and "heatmap_pixel_auroc_padim-replay-buffer20.png" in heatmaps
    assert "heatmap_pixel_auroc_padim-sequential.png" in heatmaps
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == PNG
    assert not list(out.rglob(".*.tmp"))


def test_single_replay_size_other_metric_and_shuffled_orders(tmp_path: Path) -> None:
    """One replay size still plots (points); seeds with different task orders are averaged by
    stream position; --metric picks the headline."""
    sweep_dir = tmp_path / "sweep"
    for seed, order in ((0, TASKS), (1, TASKS[::-1])):
        fake_run(sweep_dir / "runs" / f"padim-replay-buffer_size50-seed{seed}", method="padim", strategy="replay",
                 seed=seed, buffer_size=50, tasks=order)
    report = build_report(sweep_dir, metric="pixel_aupro")  # no sweep.yaml: every runs/* folder
    assert len(report.summary) == 1 and report.summary.loc[0, "n_seeds"] == 2
    names = {p.name for p in report.files}
    assert {"acc_vs_replay_pixel_aupro.png", "fm_vs_replay_pixel_aupro.png", "memory_vs_replay.png",
            "heatmap_pixel_aupro_padim-replay-buffer50.png"} <= names
    assert report.markdown.index("## pixel_aupro (headline)") < report.markdown.index("## pixel_auroc")
    with pytest.raises(ValueError, match="'nope' is not in the runs' summaries"):
        build_report(sweep_dir, metric="nope")


@pytest.mark.slow
def test_other_grid_keys_become_columns_and_groups(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    entries = []
    for n_features in (8, 16):
        for seed in (0, 1):
            name = f"padim-sequential-n_features{n_features}-seed{seed}"
            fake_run(sweep_dir / "runs" / name, method="padim", strategy="sequential", seed=seed, n_features=n_features)
            entries.append({"name": name, "run_dir": f"runs/{name}"})
    grid = {"method_params.n_features": [8, 16], "seed": [0, 1]}
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({"name": "nf", "grid": grid, "cells": entries}))
    report = build_report(sweep_dir)
    summary = report.summary
    assert list(summary["method_params.n_features"]) == [8, 16] and list(summary.n_seeds) == [2, 2]
    assert "method_params.n_features" in pd.read_csv(sweep_dir / "report" / "runs.csv").columns
    assert "| method | strategy   | buffer | method_params.n_features | seeds |" in report.markdown
    assert {"heatmap_pixel_auroc_padim-sequential-n_features8.png", "heatmap_pixel_auroc_padim-sequential-n_features16.png"} \
        <= {p.name for p in report.files}


@pytest.mark.slow
def test_report_cli(tmp_path: Path, capsys) -> None:
    sweep_dir = fake_sweep(tmp_path, buffers=(10,), methods=("padim",), seeds=(0,))
    parser = argparse.ArgumentParser(prog="clbench")
    add_report_parser(parser.add_subparsers())
    args = parser.parse_args(["report", str(sweep_dir), "--metric", "image_auroc"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "## image_auroc (headline)" in out and "warning: " in out and "wrote " in out
    assert (sweep_dir / "report" / "plots" / "acc_vs_replay_image_auroc.png").is_file()


def test_markdown_table_pads_columns() -> None:
    table = markdown_table(["a", "bb"], [["xyz", "1"], ["q", "22"]], [False, True])
    assert table.splitlines() == ["| a   | bb |", "| --- | -: |", "| xyz |  1 |", "| q   | 22 |"]


def test_keys_that_only_differ_between_methods_are_not_extra_columns() -> None:
    import pandas as pd

    from clbench.reporting.tables import _varying

    summary = pd.DataFrame({"method": ["a", "a", "b"], "budget": ["none", "none", "3000"], "n_features": [1, 2, 1]})
    assert _varying(summary, ["budget", "n_features"]) == ["n_features"]


def _profile_cell(sweep_dir: Path, method: str, strategy: str, seed: int, *, f1: tuple[float, float, float] | None,
                  method_state: int, differences: list[str], not_in_paper: bool = False) -> dict:
    """A run of a paper-profile sweep: fake_run plus ``paper_profile`` in its config and, if ``f1`` is
    (acc, fm, relative_forgetting), the pixel F1 summary the newer runner writes."""
    run = sweep_dir / "runs" / f"{method}-{strategy}-seed{seed}"
    fake_run(run, method=method, strategy=strategy, seed=seed, buffer_size=300 if strategy == "replay" else None,
             method_state=method_state)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["paper_profile"] = {"name": "clad", "title": "t", "not_in_paper": not_in_paper, "differences": differences}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = json.loads((run / "summary.json").read_text())
    if f1 is not None:
        summary["metrics"]["pixel_f1_max"] = {"acc": f1[0], "bwt": -f1[1], "fm": f1[1], "relative_forgetting": f1[2]}
        (run / "summary.json").write_text(json.dumps(summary))
        metrics = pd.read_csv(run / "metrics.csv")  # its rows too: the report checks metrics.csv against summary.json
        f1_rows = metrics[metrics["metric"] == "pixel_auroc"].assign(metric="pixel_f1_max", value=f1[0])
        pd.concat([metrics, f1_rows]).to_csv(run / "metrics.csv", index=False)
    return summary


@pytest.mark.slow
def test_paper_table_next_to_the_published_figures(tmp_path: Path, capsys) -> None:
    sweep_dir = tmp_path / "clad"
    from clbench.reporting.profile import load_profile

    own = load_profile("clad").differences["padim"][0]  # one of the profile's own differences: left to env.json
    padim = [_profile_cell(sweep_dir, "padim", "sequential", seed, f1=(0.2 + 0.1 * seed, 0.05, 0.25 - 0.1 * seed),
                           method_state=1_541_030_400, differences=[own, "--set tasks=3 (profile: paper10)"])
             for seed in (0, 1)]
    draem = _profile_cell(sweep_dir, "draem", "replay", 0, f1=None, method_state=0,
                          differences=["--set tasks=3 (profile: paper10)", "--set image_size=64 (profile: 256)"])
    _profile_cell(sweep_dir, "cainnflow", "replay", 0, f1=(0.3, 0.0, 0.0), method_state=0, differences=[], not_in_paper=True)
    report = build_report(sweep_dir)
    table = report.paper
    assert table is not None and table.methods == ["draem", "padim", "cainnflow"]  # the paper's column order first
    entry = table.entries[("pixel_auroc", "padim")]
    expected = np.mean([s["metrics"]["pixel_auroc"]["acc"] for s in padim])
    assert entry.n_seeds == 2 and entry.published == 0.73
    assert entry.value == pytest.approx(expected) and entry.difference == pytest.approx(expected - 0.73)
    assert table.entries[("pixel_f1", "padim")].value == pytest.approx(0.25)
    assert table.entries[("forgetting_pct", "padim")].value == pytest.approx(20.0)  # mean of 25 % and 15 %
    assert table.entries[("forgetting_pct", "padim")].published == 19.12
    assert table.entries[("fm_pixel_f1", "padim")].value == pytest.approx(5.0)
    assert table.entries[("memory_mb", "padim")].value == pytest.approx(1541.0304)
    assert table.text("memory_mb", "padim") == "1541.0 (1541, +0.0)"
    assert table.text("image_auroc", "draem") == f"{draem['metrics']['image_auroc']['acc']:.3f} (0.75, " \
                                                 f"{draem['metrics']['image_auroc']['acc'] - 0.75:+.3f})"
    # an older run without pixel F1 / relative forgetting: n/a beside the published figure
    assert table.text("pixel_f1", "draem") == "n/a (0.32)" and table.text("forgetting_pct", "draem") == "n/a (27.08)"
    replay_mb = 300 * 12_288 / 1e6  # fake_run's replay bytes at the final step
    assert table.entries[("memory_mb", "draem")].value == pytest.approx(replay_mb)
    assert table.headers()[-1] == "CAINNFlow*" and table.text("pixel_f1", "cainnflow") == "0.300"
    # the command line's differences, once each (the profile's own are in env.json)
    assert table.run_differences == ["--set tasks=3", "--set image_size=64"]
    md = (sweep_dir / "report" / "paper_table.md").read_text()
    assert "| pixel AUROC" in md and "| avg forgetting (%)" in md and "| extra memory (MB)" in md
    assert "Chaudhry" in md and "relative drop of pixel F1" in md and "* not in the paper" in md
    assert md in report.markdown
    page = (sweep_dir / "report" / "summary.html").read_text()
    assert "The paper&#x27;s table: clad" in page and "<td>1541.0 (1541, +0.0)</td>" in page
    frame = pd.read_csv(sweep_dir / "report" / "paper_table.csv")
    assert len(frame) == 7 * 3 and set(frame["method"]) == {"padim", "draem", "cainnflow"}


def test_no_paper_table_without_a_profile(tmp_path: Path) -> None:
    fake_run(tmp_path / "s" / "runs" / "padim-sequential-seed0", method="padim", strategy="sequential", seed=0)
    report = build_report(tmp_path / "s")
    assert report.paper is None and not (tmp_path / "s" / "report" / "paper_table.md").exists()
