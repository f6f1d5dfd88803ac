"""Figures for one clbench run: accuracy heatmap, forgetting curves, memory.

Every plot reads the tidy files a run writes (``metrics.csv``, ``memory.csv``,
``config.yaml``, ``env.json``; through ``clbench.engine.rundir.RunFolder``, which also
owns the accuracy-matrix pivot) and must cope with partially finished runs
(fewer steps than tasks), joint runs (one step, ``trained_task == "joint"``)
and NaN values. PNGs are written atomically so a killed process never leaves
a truncated image behind.

Colour scale of the heatmap: fixed per metric so that figures of different
runs can be compared by eye. AUROC metrics use [0.5, 1] because 0.5 is
chance level and the interesting differences are all above it; any other
metric (AUPRO, AP, ...) uses [0, 1] because good values can legitimately be
well below 0.5 (pixel AP in particular). Values outside the range are clipped
in colour only; the annotation always prints the true value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # must precede the pyplot import: plots run headless

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from clbench.engine.atomic import write_with  # noqa: E402
from clbench.engine.rundir import PROBE_MAPS, RunFolder, accuracy_matrix, numeric, step_labels  # noqa: E402
from clbench.engine.tasks import as_schedule, categories_of  # noqa: E402

__all__ = [
    "accuracy_matrix",
    "colour_range",
    "plot_accuracy_heatmap",
    "plot_forgetting_curves",
    "plot_memory",
    "plot_run",
    "read_title_info",
    "format_title",
]

DPI = 120
MAX_SCALED_TASKS = 20  # figure size stops growing beyond this many tasks
ROTATE_ABOVE = 5  # rotate task tick labels when more tasks than this
BYTES_PER_MB = 1_000_000
PEAK_PREFIX = "peak_"
NAN_COLOUR = "#d9d9d9"


# --------------------------------------------------------------------------
# data shaping (the matrix itself: ``clbench.engine.rundir.accuracy_matrix``)
# --------------------------------------------------------------------------
def colour_range(metric: str) -> tuple[float, float]:
    """Fixed colour range per metric (see module docstring for why)."""
    return (0.5, 1.0) if metric.endswith("auroc") else (0.0, 1.0)


def _learned_step(metrics: pd.DataFrame, taught: dict[str, int] | None = None) -> dict[str, int]:
    """Task -> first step at which it was the trained task (joint steps learn nothing named); a task
    a multi-category step taught (its label is ``a+b``, not the task) comes from ``taught``, the
    run's schedule (``read_title_info``)."""
    frame = metrics[["step", "trained_task"]].drop_duplicates().sort_values("step", kind="stable")
    out: dict[str, int] = {}
    for step, task in zip(frame["step"].astype(int), frame["trained_task"]):
        out.setdefault(str(task), step)
    for task, step in (taught or {}).items():
        out.setdefault(task, step)
    return out


def _taught_steps(config: dict[str, Any]) -> dict[str, int]:
    """Category -> the step that teaches it, from the resolved ``tasks`` of ``config.yaml`` (a flat
    list: one per step; a list of steps); a joint run teaches nothing by name."""
    tasks = config.get("tasks")
    if config.get("strategy") == "joint" or not isinstance(tasks, list):
        return {}
    out: dict[str, int] = {}
    for step, names in enumerate(as_schedule(tasks)):
        for name in names:
            out.setdefault(str(name), step)
    return out


# --------------------------------------------------------------------------
# titles
# --------------------------------------------------------------------------
def read_title_info(run_dir: str | Path) -> dict[str, Any]:
    """Title fields from the run's config and env; missing or unreadable files give '?' (an
    unreadable one with a warning: a title is never worth failing a plot over). The replay
    buffer's size is the config's ``strategy_params.buffer_size``."""
    folder = RunFolder(run_dir)

    def warn(problem: str) -> None:
        warnings.warn(f"{problem}; the titles show '?'", stacklevel=5)

    config = folder.config(on_error=warn)
    env = folder.env(on_error=warn)
    weights = env.get("weights") if isinstance(env.get("weights"), dict) else {}
    strategy_params = config.get("strategy_params") if isinstance(config.get("strategy_params"), dict) else {}
    try:
        replay = int(strategy_params.get("buffer_size") or 0)
    except (TypeError, ValueError):
        replay = 0
    tasks = config.get("tasks")
    return {
        "method": config.get("method", "?"),
        "strategy": config.get("strategy", "?"),
        "backbone": config.get("backbone", "?"),
        "pretrained": weights.get("pretrained"),
        "replay_size": replay,
        "tasks": [str(t) for t in categories_of(tasks)] if isinstance(tasks, list) else [],
        "taught": _taught_steps(config),
        "evaluation": config.get("evaluation", "agnostic"),
        "run": folder.path.name,
    }


def format_title(title_info: dict[str, Any], what: str) -> str:
    """Two-line title: what the figure shows, then method / strategy / backbone (+weights, +replay)."""
    backbone = str(title_info.get("backbone", "?"))
    pretrained = title_info.get("pretrained")
    if pretrained is not None:
        backbone += " (pretrained)" if pretrained else " (random-init)"
    parts = [str(title_info.get("method", "?")), str(title_info.get("strategy", "?")), backbone]
    replay = int(title_info.get("replay_size") or 0)
    if replay > 0:
        parts.append(f"replay={replay}")
    if title_info.get("evaluation") == "oracle":  # the default, agnostic, is not named
        parts.append("oracle task index")
    return f"{what}\n" + " · ".join(parts)


# --------------------------------------------------------------------------
# figure helpers
# --------------------------------------------------------------------------
def _scaled(n: int, base: float, per_item: float) -> float:
    """Figure dimension that grows with the number of items, capped at MAX_SCALED_TASKS."""
    return base + per_item * min(max(n, 1), MAX_SCALED_TASKS)


def _style_task_ticks(ax: plt.Axes, labels: Sequence[str], axis: str = "x") -> None:
    """Set task tick labels, rotating them when there are many so they don't overlap."""
    positions = np.arange(len(labels))
    if axis == "x":
        rotate = len(labels) > ROTATE_ABOVE or max((len(s) for s in labels), default=0) > 12
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                           rotation_mode="anchor")
    else:
        ax.set_yticks(positions)
        ax.set_yticklabels(labels)


def _save_atomic(fig: Figure, out_path: str | Path) -> Path:
    """Save through ``atomic.write_with``: never a truncated PNG; the figure is always closed."""
    try:
        return write_with(out_path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------
def _annotate_cells(ax: plt.Axes, values: np.ndarray, vmin: float, vmax: float, fontsize: float) -> None:
    """Write each finite value (2 decimals) in its cell, dark/light text for contrast."""
    for (i, j), v in np.ndenumerate(values):
        if not math.isfinite(v):
            continue
        frac = (min(max(v, vmin), vmax) - vmin) / (vmax - vmin)
        colour = "white" if frac < 0.35 or frac > 0.85 else "black"
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color=colour)


def plot_accuracy_heatmap(
    metrics: pd.DataFrame,
    out_path: str | Path,
    *,
    metric: str = "pixel_auroc",
    title_info: dict[str, Any],
) -> Path:
    """Heatmap of the step x eval-task matrix, fixed colour range, NaN cells grey; a box marks each
    task's cell at the step that taught it (the diagonal with one task per step)."""
    matrix = accuracy_matrix(metrics, metric, title_info.get("tasks") or None)
    learned = _learned_step(metrics[metrics["metric"] == metric], title_info.get("taught"))
    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    vmin, vmax = colour_range(metric)
    fig, ax = plt.subplots(figsize=(_scaled(n_cols, 3.5, 0.75), _scaled(n_rows, 1.8, 0.45)))
    cmap = plt.get_cmap("viridis").with_extremes(bad=NAN_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    _annotate_cells(ax, values, vmin, vmax, fontsize=9 if n_cols <= 10 else 7)
    boxed = _mark_taught_cells(ax, matrix, learned)
    _style_task_ticks(ax, list(matrix.columns), "x")
    _style_task_ticks(ax, list(matrix.index), "y")
    ax.set_xlabel("evaluated task" + (" (boxed: the step that taught it)" if boxed else ""))
    ax.set_ylabel("after training step")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(f"{metric} (fixed range [{vmin:g}, {vmax:g}]; grey = n/a)")
    ax.set_title(format_title(title_info, f"Accuracy matrix — {metric}"), fontsize=10)
    return _save_atomic(fig, out_path)


def _mark_taught_cells(ax: plt.Axes, matrix: pd.DataFrame, learned: dict[str, int]) -> bool:
    """Outline the cell (teaching step, task) of every task taught within the matrix's rows."""
    boxed = False
    for j, task in enumerate(matrix.columns):
        step = learned.get(str(task))
        if step is not None and step < len(matrix.index):
            ax.add_patch(Rectangle((j - 0.5, step - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6))
            boxed = True
    return boxed


def plot_forgetting_curves(
    metrics: pd.DataFrame,
    out_path: str | Path,
    *,
    metric: str = "pixel_auroc",
    title_info: dict[str, Any],
) -> Path:
    """One line per eval task over steps; a star marks the step where that task was learned.

    Before a task is learned its line is dotted (zero-shot / forward-transfer
    regime), from then on solid, so forgetting reads as a falling solid line.
    In a joint run no named task is learned, so every line is solid.
    """
    matrix = accuracy_matrix(metrics, metric, title_info.get("tasks") or None)
    learned = _learned_step(metrics[metrics["metric"] == metric], title_info.get("taught"))
    any_learned = bool(learned.keys() & set(map(str, matrix.columns)))
    steps = np.arange(len(matrix.index))
    n_tasks = len(matrix.columns)
    height = 4.5 + 0.08 * min(n_tasks, MAX_SCALED_TASKS)
    fig, ax = plt.subplots(figsize=(_scaled(len(steps), 4.5, 0.55), height))
    colours = plt.get_cmap("tab20" if n_tasks > 10 else "tab10")
    for k, task in enumerate(matrix.columns):
        series = matrix[task].to_numpy(dtype=float)
        first = learned.get(str(task), len(steps) if any_learned else 0)
        _plot_task_line(ax, steps, series, first, colours(k % colours.N), str(task))
    _finish_forgetting_axes(ax, matrix, metric, any_learned)
    ax.set_title(format_title(title_info, f"Per-task {metric} over the stream"), fontsize=10)
    return _save_atomic(fig, out_path)


def _plot_task_line(ax: plt.Axes, steps: np.ndarray, series: np.ndarray, learned_at: int,
                    colour: Any, label: str) -> None:
    """Dotted before ``learned_at``, solid from it on, star at ``learned_at`` if it was reached."""
    pre = slice(0, min(learned_at, len(steps) - 1) + 1)  # overlap one point so the line is continuous
    if learned_at > 0:
        ax.plot(steps[pre], series[pre], ls=":", lw=1.2, marker="o", markersize=3, color=colour, alpha=0.7)
    if learned_at < len(steps):
        ax.plot(steps[learned_at:], series[learned_at:], ls="-", lw=1.8, marker="o", markersize=4,
                color=colour)
        if math.isfinite(series[learned_at]):
            ax.plot(learned_at, series[learned_at], marker="*", markersize=14, color=colour,
                    markeredgecolor="black", markeredgewidth=0.8, ls="none")
    ax.plot([], [], ls="-", lw=1.8, marker="o", markersize=4, color=colour, label=label)


def _finish_forgetting_axes(ax: plt.Axes, matrix: pd.DataFrame, metric: str, any_learned: bool) -> None:
    """Axis limits, tick labels and an outside legend (with the star's meaning)."""
    _style_task_ticks(ax, list(matrix.index), "x")
    ax.set_xlim(-0.5, len(matrix.index) - 0.5)
    lo, _ = colour_range(metric)
    finite = matrix.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    data_min = float(finite.min()) if finite.size else lo
    ax.set_ylim(min(lo, data_min) - 0.02, 1.01)
    ax.set_xlabel("after training step")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any_learned:
        handles.append(Line2D([], [], marker="*", color="grey", markeredgecolor="black",
                              markersize=12, ls="none"))
        labels.append("step the task was learned")
        handles.append(Line2D([], [], ls=":", color="grey"))
        labels.append("before it was learned")
    ncol = 1 if len(labels) <= 12 else 2
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              ncol=ncol, title="eval task", title_fontsize=8, frameon=False)


def _memory_tables(memory: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Split memory.csv into persistent components and peak_* columns, in MB, rows = step."""
    frame = memory.copy()
    frame["step"] = frame["step"].astype(int)
    frame["mb"] = numeric(frame["bytes"]) / BYTES_PER_MB
    wide = frame.groupby(["step", "component"], sort=True)["mb"].sum(min_count=1).unstack("component")
    labels = step_labels(frame)
    index_labels = [labels[int(s)] for s in wide.index]
    preferred = ["model_params", "method_state", "replay_buffer"]
    persistent = [c for c in preferred if c in wide.columns]
    persistent += [c for c in wide.columns if c not in preferred and not str(c).startswith(PEAK_PREFIX)]
    peaks = sorted((c for c in wide.columns if str(c).startswith(PEAK_PREFIX)), key=lambda c: c != "peak_rss")
    peaks = [c for c in peaks if c != "peak_cuda" or bool((wide[c].fillna(0) > 0).any())]
    return wide[persistent].fillna(0.0), wide[peaks], index_labels


def plot_memory(memory: pd.DataFrame, out_path: str | Path, *, title_info: dict[str, Any]) -> Path:
    """Stacked bars of persistent memory per step (MB) with peak RSS/CUDA as lines on the same axis."""
    persistent, peaks, labels = _memory_tables(memory)
    steps = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(_scaled(len(steps), 4.5, 0.55), 4.5))
    bottom = np.zeros(len(steps))
    colours = plt.get_cmap("Set2")
    for k, component in enumerate(persistent.columns):
        heights = persistent[component].to_numpy(dtype=float)
        ax.bar(steps, heights, bottom=bottom, width=0.6, color=colours(k % colours.N), label=component)
        bottom += heights
    for x, total in zip(steps, bottom):
        ax.annotate(f"{total:.1f}", (x, total), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
    for component, style in zip(peaks.columns, ["-", "--", ":", "-."] * 4):
        ax.plot(steps, peaks[component].to_numpy(dtype=float), ls=style, marker="D", markersize=5,
                color="black" if component == "peak_rss" else None, label=component)
    _style_task_ticks(ax, labels, "x")
    ax.set_xlim(-0.6, len(steps) - 0.4)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("after training step")
    ax.set_ylabel("MB (10^6 bytes)")
    ax.grid(True, axis="y", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: str(names[i]).startswith(PEAK_PREFIX))  # bars first
    ax.legend([handles[i] for i in order], [names[i] for i in order],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title="bars: persistent (total on top)\nlines: peaks", title_fontsize=8)
    ax.set_title(format_title(title_info, "Memory per step"), fontsize=10)
    return _save_atomic(fig, out_path)


# --------------------------------------------------------------------------
# whole run
# --------------------------------------------------------------------------
def _safe_name(metric: str) -> str:
    """File-name-safe version of a metric name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in metric)


def plot_run(run_dir: str | Path, metrics: Sequence[str] = ("pixel_auroc",)) -> list[Path]:
    """Read the run's files, write PNGs into run_dir/plots/, return their paths.

    Heatmap + forgetting curves for each requested metric that is present
    (absent ones are skipped with a warning), plus the memory plot when
    memory.csv exists, plus the probe-map panels (``maps_<task>.png``) when the
    run kept probe maps. Raises FileNotFoundError if metrics.csv is absent.
    """
    folder = RunFolder(run_dir)
    metrics_path = folder.csv_path("metrics")
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path.name} not found: {metrics_path}")
    if isinstance(metrics, str):  # plot_run(d, "pixel_aupro") would otherwise iterate characters
        metrics = (metrics,)
    frame = folder.metrics()
    info = read_title_info(folder.path)
    out_dir = folder.plots_dir
    written: list[Path] = []
    present = set(frame["metric"].dropna().astype(str))
    for metric in metrics:
        if metric not in present:
            warnings.warn(f"{metric!r} not in {metrics_path}; skipping its plots", stacklevel=2)
            continue
        name = _safe_name(metric)
        written.append(plot_accuracy_heatmap(frame, out_dir / f"heatmap_{name}.png", metric=metric, title_info=info))
        written.append(plot_forgetting_curves(frame, out_dir / f"forgetting_{name}.png", metric=metric, title_info=info))
    memory_path = folder.csv_path("memory")
    if memory_path.is_file():
        try:
            memory = folder.memory()
        except ValueError as err:
            warnings.warn(f"{err}; skipping the memory plot", stacklevel=2)
            memory = pd.DataFrame()
        if not memory.empty:
            written.append(plot_memory(memory, out_dir / "memory.png", title_info=info))
    else:
        warnings.warn(f"{memory_path.name} not found: {memory_path}; skipping the memory plot", stacklevel=2)
    if (folder.path / PROBE_MAPS).is_dir():  # a run with probe_maps: 0 (or an older one) has none, and says nothing
        from clbench.reporting.probe_plots import plot_probe_maps

        written += plot_probe_maps(folder.path)
    return written
