"""Tests for clbench.reporting.plots: exact matrix values, valid PNGs, partial/joint runs, NaN, errors,
and the titles of a real replay run (its buffer size comes from the config the runner writes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from clbench.engine.rundir import RunFolder
from clbench.reporting import plots
from helpers import engine_run, write_category

TASKS = ["bottle", "cable", "capsule", "metal_nut"]
METRICS = ("pixel_auroc", "pixel_aupro")


def _value(step: int, eval_idx: int, metric: str) -> float:
    """Deterministic, distinct value per cell so a misplaced cell is caught."""
    base = 0.9 if metric == "pixel_auroc" else 0.6
    return round(base - 0.01 * step + 0.001 * eval_idx, 4)


def _sequential_metrics(n_steps: int, tasks: list[str] = TASKS) -> pd.DataFrame:
    """Tidy metrics for a sequential run that finished n_steps of len(tasks)."""
    rows = [
        {"step": s, "trained_task": tasks[s], "eval_task": t, "metric": m, "value": _value(s, j, m)}
        for s in range(n_steps)
        for j, t in enumerate(tasks)
        for m in METRICS
    ]
    return pd.DataFrame(rows)


def _joint_metrics() -> pd.DataFrame:
    """Tidy metrics for a joint run: one step, trained_task 'joint'."""
    rows = [
        {"step": 0, "trained_task": "joint", "eval_task": t, "metric": m, "value": _value(0, j, m)}
        for j, t in enumerate(TASKS)
        for m in METRICS
    ]
    return pd.DataFrame(rows)


def _memory(trained: list[str], with_cuda: bool = False) -> pd.DataFrame:
    """memory.csv rows for the given trained tasks (one step each)."""
    sizes = {"model_params": 45_000_000, "method_state": 20_000_000, "replay_buffer": 5_000_000,
             "peak_rss": 900_000_000, "peak_cuda": 300_000_000 if with_cuda else 0}
    rows = [
        {"step": s, "trained_task": t, "component": c, "bytes": b * (s + 1) if c == "method_state" else b}
        for s, t in enumerate(trained)
        for c, b in sizes.items()
    ]
    return pd.DataFrame(rows)


def _make_run(root: Path, metrics: pd.DataFrame | None, memory: pd.DataFrame | None,
              strategy: str = "sequential", strategy_params: dict | None = None) -> Path:
    """Fake results/<run>/ directory (its config in the runner's shape: ``strategy_params``)."""
    run = root / f"padim_{strategy}"
    run.mkdir(parents=True)
    config = {"method": "padim", "strategy": strategy, "strategy_params": strategy_params or {},
              "backbone": "resnet18", "tasks": TASKS}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "env.json").write_text(json.dumps({"weights": {"source": "none", "pretrained": False}}))
    if metrics is not None:
        metrics.to_csv(run / "metrics.csv", index=False)
    if memory is not None:
        memory.to_csv(run / "memory.csv", index=False)
    return run


def _assert_png(path: Path) -> None:
    """Non-empty, decodable PNG of reasonable size."""
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 300 and img.size[1] > 200


# ----------------------------------------------------------------- accuracy_matrix
def test_accuracy_matrix_exact_cells() -> None:
    m = plots.accuracy_matrix(_sequential_metrics(4), "pixel_auroc", TASKS)
    assert list(m.columns) == TASKS
    assert list(m.index) == [f"step {s}: {TASKS[s]}" for s in range(4)]
    assert m.loc["step 0: bottle", "bottle"] == pytest.approx(0.9)
    assert m.loc["step 2: capsule", "cable"] == pytest.approx(0.881)
    assert m.loc["step 3: metal_nut", "metal_nut"] == pytest.approx(0.873)
    aupro = plots.accuracy_matrix(_sequential_metrics(4), "pixel_aupro")
    assert aupro.iloc[1, 3] == pytest.approx(0.593)


def test_accuracy_matrix_column_order_and_missing_tasks() -> None:
    df = _sequential_metrics(2)
    df = df[df["eval_task"].isin(["capsule", "bottle"])]
    shuffled = df.iloc[::-1]
    # without tasks: order of first appearance in the given frame
    assert list(plots.accuracy_matrix(shuffled).columns) == ["capsule", "bottle"]
    # with tasks: stream order, never-evaluated tasks become NaN columns
    m = plots.accuracy_matrix(shuffled, tasks=TASKS)
    assert list(m.columns) == TASKS
    assert m["cable"].isna().all()
    assert list(m.index) == ["step 0: bottle", "step 1: cable"]


def test_accuracy_matrix_keeps_nan_and_rejects_unknown_metric() -> None:
    df = _sequential_metrics(3)
    hit = (df["step"] == 1) & (df["eval_task"] == "capsule") & (df["metric"] == "pixel_auroc")
    df.loc[hit, "value"] = np.nan
    m = plots.accuracy_matrix(df, tasks=TASKS)
    assert math.isnan(m.loc["step 1: cable", "capsule"])
    assert m.loc["step 1: cable", "bottle"] == pytest.approx(0.89)
    with pytest.raises(ValueError, match="image_auroc"):
        plots.accuracy_matrix(df, "image_auroc")


def test_accuracy_matrix_joint() -> None:
    m = plots.accuracy_matrix(_joint_metrics(), tasks=TASKS)
    assert m.shape == (1, 4)
    assert list(m.index) == ["step 0: joint"]
    assert m.loc["step 0: joint", "capsule"] == pytest.approx(0.902)


# ----------------------------------------------------------------- titles / ranges
def test_titles_and_colour_range() -> None:
    info = {"method": "padim", "strategy": "replay", "backbone": "resnet18", "pretrained": False, "replay_size": 50}
    title = plots.format_title(info, "X")
    for part in ("padim", "replay", "resnet18", "random-init", "replay=50"):
        assert part in title
    info.update(pretrained=True, replay_size=0)
    title = plots.format_title(info, "X")
    assert "pretrained" in title and "replay=" not in title and "oracle" not in title
    assert "oracle task index" in plots.format_title({**info, "evaluation": "oracle"}, "X")
    assert plots.colour_range("pixel_auroc") == (0.5, 1.0)
    assert plots.colour_range("pixel_aupro") == (0.0, 1.0)


# ----------------------------------------------------------------- plot_run
@pytest.mark.slow
def test_plot_run_full_sequential(tmp_path: Path) -> None:
    run = _make_run(tmp_path, _sequential_metrics(4), _memory(TASKS, with_cuda=True))
    paths = plots.plot_run(run, metrics=METRICS)
    names = sorted(p.name for p in paths)
    assert names == sorted(["heatmap_pixel_auroc.png", "forgetting_pixel_auroc.png",
                            "heatmap_pixel_aupro.png", "forgetting_pixel_aupro.png", "memory.png"])
    for p in paths:
        assert p.parent == run / "plots"
        _assert_png(p)
    assert not [p for p in (run / "plots").iterdir() if p.suffix != ".png"]  # no temp leftovers


def test_plot_run_partial_with_nan_and_replay(tmp_path: Path) -> None:
    df = _sequential_metrics(2)
    df.loc[df.index[::3], "value"] = np.nan
    run = _make_run(tmp_path, df, _memory(TASKS[:2]), strategy="replay",
                    strategy_params={"buffer_size": 20, "policy": "balanced"})
    with pytest.warns(UserWarning, match="image_auroc"):
        paths = plots.plot_run(run, metrics=("pixel_auroc", "image_auroc"))
    assert sorted(p.name for p in paths) == ["forgetting_pixel_auroc.png", "heatmap_pixel_auroc.png", "memory.png"]
    for p in paths:
        _assert_png(p)
    assert plots.read_title_info(run)["replay_size"] == 20


def test_plot_run_joint_single_step(tmp_path: Path) -> None:
    run = _make_run(tmp_path, _joint_metrics(), _memory(["joint"]), strategy="joint")
    paths = plots.plot_run(run)
    assert {p.name for p in paths} == {"heatmap_pixel_auroc.png", "forgetting_pixel_auroc.png", "memory.png"}
    for p in paths:
        _assert_png(p)


def test_plot_run_all_nan_metric(tmp_path: Path) -> None:
    df = _sequential_metrics(3)
    df["value"] = np.nan
    run = _make_run(tmp_path, df, _memory(TASKS[:3]))
    paths = plots.plot_run(run)
    assert sorted(p.name for p in paths) == ["forgetting_pixel_auroc.png", "heatmap_pixel_auroc.png", "memory.png"]
    for p in paths:
        _assert_png(p)


def test_plot_run_missing_metrics_csv(tmp_path: Path) -> None:
    run = _make_run(tmp_path, None, _memory(TASKS))
    with pytest.raises(FileNotFoundError, match="metrics.csv") as err:
        plots.plot_run(run)
    assert str(run / "metrics.csv") in str(err.value)
    assert "\n" not in str(err.value)


def test_plot_run_missing_memory_csv_still_plots(tmp_path: Path) -> None:
    run = _make_run(tmp_path, _sequential_metrics(4), None)
    with pytest.warns(UserWarning, match="memory.csv"):
        paths = plots.plot_run(run)
    assert len(paths) == 2


def test_plot_memory_other_component_and_zero_cuda(tmp_path: Path) -> None:
    mem = _memory(TASKS[:2])
    extra = pd.DataFrame([{"step": s, "trained_task": TASKS[s], "component": "optimizer_state",
                           "bytes": 1_000_000} for s in range(2)])
    persistent, peaks, labels = plots._memory_tables(pd.concat([mem, extra]))
    assert list(persistent.columns) == ["model_params", "method_state", "replay_buffer", "optimizer_state"]
    assert list(peaks.columns) == ["peak_rss"]  # peak_cuda all zero -> not drawn
    assert persistent.loc[1, "method_state"] == pytest.approx(40.0)  # MB
    assert labels == ["step 0: bottle", "step 1: cable"]
    info = plots.read_title_info(_make_run(tmp_path, None, None))
    _assert_png(plots.plot_memory(pd.concat([mem, extra]), tmp_path / "m.png", title_info=info))


@pytest.mark.slow
def test_many_tasks_figure_grows(tmp_path: Path) -> None:
    tasks = [f"task_{i:02d}_long_name" for i in range(15)]
    df = _sequential_metrics(15, tasks)
    info = {"method": "padim", "strategy": "sequential", "backbone": "resnet18", "pretrained": True,
            "replay_size": 0, "tasks": tasks}
    small = plots.plot_accuracy_heatmap(_sequential_metrics(4), tmp_path / "s.png", title_info=info | {"tasks": TASKS})
    big = plots.plot_accuracy_heatmap(df, tmp_path / "b.png", title_info=info)
    curves = plots.plot_forgetting_curves(df, tmp_path / "c.png", title_info=info)
    with Image.open(small) as s, Image.open(big) as b:
        assert b.size[0] > s.size[0] and b.size[1] > s.size[1]
    _assert_png(curves)


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory) -> Path:
    """A real 2-task PaDiM replay run (buffer of 3 images) on categories named like BTAD's."""
    root = tmp_path_factory.mktemp("data")
    write_category(root, "01", size=32)
    write_category(root, "02", size=32, seed=1)
    out = tmp_path_factory.mktemp("out")
    return engine_run("padim", "replay", {"buffer_size": 3}, root, out, tasks=["01", "02"], image_size=32)


@pytest.mark.slow
def test_replay_run_titles_show_the_buffer_size(replay_run: Path, monkeypatch) -> None:
    """The config the runner writes holds the buffer size as ``strategy_params.buffer_size``: every
    figure of a replay run names it (titles used to read a ``replay_size`` key no run writes)."""
    titles: dict[str, str] = {}
    save = plots._save_atomic

    def capture(fig, out_path):
        titles[Path(out_path).name] = fig.axes[0].get_title()
        return save(fig, out_path)

    monkeypatch.setattr(plots, "_save_atomic", capture)
    paths = [p for p in plots.plot_run(replay_run, metrics=("pixel_auroc",)) if not p.name.startswith("maps_")]
    assert sorted(p.name for p in paths) == sorted(titles) == ["forgetting_pixel_auroc.png", "heatmap_pixel_auroc.png",
                                                              "memory.png"]  # the probe panels: test_probe_maps.py
    for name, title in titles.items():
        assert title.splitlines()[1].startswith("padim · replay · resnet18 (random-init)"), name
        assert title.endswith("replay=3"), name
    for p in paths:
        _assert_png(p)


def test_plot_run_numeric_category_names(replay_run: Path) -> None:
    """Categories named like BTAD's ('01', '02') stay text: the run's own plots used to crash
    with "object of type 'int' has no len()" at the end of the run."""
    frame = RunFolder(replay_run).metrics()
    assert set(frame["eval_task"]) == {"01", "02"}
    assert list(plots.accuracy_matrix(frame).columns) == ["01", "02"]
    paths = plots.plot_run(replay_run, metrics=("pixel_auroc",))
    assert sorted(p.name for p in paths) == ["forgetting_pixel_auroc.png", "heatmap_pixel_auroc.png",
                                             "maps_01.png", "maps_02.png", "memory.png"]
    for path in paths:
        _assert_png(path)
