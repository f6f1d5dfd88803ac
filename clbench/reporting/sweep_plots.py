"""The report's plots over a sweep: final ACC, FM and memory vs replay buffer size (one line per
method, bands = +- std over seeds, sequential / joint as reference lines) and one accuracy-matrix
heatmap per group averaged over its seeds."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from clbench.reporting.cells import CellInfo
from clbench.reporting.tables import GROUP, _common, _varying


if TYPE_CHECKING:
    import pandas as pd

BOUNDS = {"sequential": "lower bound", "joint": "upper bound"}


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _variant_label(row: "pd.Series", variant_keys: Sequence[str]) -> str:
    extras = [f"{k.split('.')[-1]}={row[k]}" for k in variant_keys if k != "method"]
    return str(row["method"]) + (f" ({', '.join(extras)})" if extras else "")


def _draw_vs_replay(ax, summary: "pd.DataFrame", column: str, variant_keys: Sequence[str]) -> None:
    """Replay-like strategies as lines over buffer size (band = ± std; one size = a point with an
    error bar); sequential / joint as horizontal reference lines, in the same colour per method."""
    import matplotlib.pyplot as plt
    import numpy as np

    colours = plt.get_cmap("tab10")
    styles = ["-", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    replay = sorted(s for s in summary["strategy"].unique() if s not in BOUNDS)
    sizes = sorted({int(b) for b in summary.loc[summary["strategy"].isin(replay), "buffer_size"]})
    variants = summary.drop_duplicates(list(variant_keys))
    for k, (_, variant) in enumerate(variants.iterrows()):
        colour = colours(k % colours.N)
        label = _variant_label(variant, variant_keys)
        mask = np.logical_and.reduce([summary[key].astype(str) == str(variant[key]) for key in variant_keys])
        rows = summary[mask]
        for s, strategy in enumerate(replay):
            sel = rows[rows["strategy"] == strategy].sort_values("buffer_size")
            y = sel[f"{column}_mean"].to_numpy(dtype=float)
            if sel.empty or not np.isfinite(y).any():
                continue
            x = sel["buffer_size"].to_numpy(dtype=float)
            e = np.nan_to_num(sel[f"{column}_std"].to_numpy(dtype=float))
            name = f"{label} {strategy}"
            ax.plot(x, y, ls=styles[s % len(styles)], marker="o", color=colour, lw=1.8, label=name)
            if len(x) > 1:
                ax.fill_between(x, y - e, y + e, color=colour, alpha=0.18, lw=0)
            ax.errorbar(x, y, yerr=e, fmt="none", ecolor=colour, capsize=4, lw=1)
        for strategy, style in (("sequential", "--"), ("joint", ":")):
            for _, bound in rows[rows["strategy"] == strategy].iterrows():
                y, e = float(bound[f"{column}_mean"]), float(bound[f"{column}_std"])
                if not math.isfinite(y):
                    continue
                ax.axhline(y, ls=style, color=colour, lw=1.6, label=f"{label} {strategy} ({BOUNDS[strategy]})")
                if math.isfinite(e) and e > 0:
                    ax.axhspan(y - e, y + e, color=colour, alpha=0.08, lw=0)
    if sizes:
        positive = [s for s in sizes if s > 0]
        if len(sizes) >= 3 and positive and max(sizes) / min(positive) >= 20:
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        if len(sizes) == 1:
            pad = max(1.0, 0.5 * sizes[0])
            ax.set_xlim(sizes[0] - pad, sizes[0] + pad)
        ax.set_xlabel("replay buffer size (images)")
    else:
        ax.set_xticks([])
        ax.set_xlabel("replay buffer size (no replay runs in this sweep: bounds only)")
    ax.grid(True, alpha=0.3)


def _finish(fig, ax, title: str) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)


def plot_vs_replay(summary: "pd.DataFrame", column: str, out_path: Path, *, ylabel: str, title: str,
                   variant_keys: Sequence[str]) -> Path:
    import matplotlib.pyplot as plt

    from clbench.reporting.plots import _save_atomic

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    _draw_vs_replay(ax, summary, column, variant_keys)
    ax.set_ylabel(ylabel)
    _finish(fig, ax, title)
    return _save_atomic(fig, out_path)


def plot_memory_vs_replay(summary: "pd.DataFrame", out_path: Path, *, title: str, variant_keys: Sequence[str]) -> Path:
    import matplotlib.pyplot as plt

    from clbench.reporting.plots import _save_atomic

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _draw_vs_replay(axes[0], summary, "memory_mb", variant_keys)
    axes[0].set_ylabel("MB (10^6 bytes)")
    axes[0].set_title("final method state + replay buffer", fontsize=9)
    axes[0].set_ylim(bottom=0)
    _draw_vs_replay(axes[1], summary, "peak_rss_mb", variant_keys)
    axes[1].set_ylabel("MB (10^6 bytes)")
    axes[1].set_title("peak RSS (largest per-step peak)", fontsize=9)
    axes[1].set_ylim(bottom=0)
    _finish(fig, axes[1], title)
    fig.subplots_adjust(top=0.8, wspace=0.3)
    return _save_atomic(fig, out_path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def plot_group_heatmaps(cells: Sequence[CellInfo], summary: "pd.DataFrame", extras: Sequence[str], metric: str,
                        out_dir: Path) -> list[Path]:
    """One accuracy-matrix heatmap per group, averaged over its seeds (``plots.plot_accuracy_heatmap``
    averages duplicate (step, task) rows). Seeds with different task orders are aligned by stream
    position (T1 = first task learned, ...)."""
    import pandas as pd

    from clbench.reporting.plots import plot_accuracy_heatmap

    group = [*GROUP, *extras]
    varying = _varying(summary, [*GROUP[3:], *extras])
    written = []
    for _, row in summary.iterrows():
        members = [c for c in cells if c.complete and all(str(c.params[k]) == str(row[k]) for k in group)]
        frames, orders = [], []
        for cell in members:
            frames.append(cell.metrics.copy())
            orders.append(tuple(cell.tasks))
        if not frames:
            continue
        tasks = list(orders[0])
        by_position = len(set(orders)) > 1
        if by_position:
            for frame, order in zip(frames, orders):
                position = {t: f"T{i + 1}" for i, t in enumerate(order)}
                frame["eval_task"] = frame["eval_task"].map(lambda t: position.get(t, t))
                frame["trained_task"] = frame["trained_task"].map(lambda t: position.get(t, t))
            tasks = [f"T{i + 1}" for i in range(len(orders[0]))]
        merged = pd.concat(frames, ignore_index=True)
        if metric not in set(merged["metric"]):
            continue
        n = len(members)
        what = f"{row['method']} (mean of {n} seed{'s' if n != 1 else ''}" + (", tasks by stream position)" if by_position else ")")
        info = {"method": what, "strategy": row["strategy"], "backbone": row["backbone"],
                "pretrained": row["pretrained"] if isinstance(row["pretrained"], bool) else None,
                "replay_size": int(row["buffer_size"]), "tasks": tasks}
        parts = [str(row["method"]), str(row["strategy"])]
        if row["strategy"] not in BOUNDS or int(row["buffer_size"]):
            parts.append(f"buffer{int(row['buffer_size'])}")
        parts += [f"{k.split('.')[-1]}{row[k]}" for k in varying]
        out = out_dir / f"heatmap_{metric}_{_slug('-'.join(parts))}.png"
        written.append(plot_accuracy_heatmap(merged, out, metric=metric, title_info=info))
    return written


def write_plots(name: str, summary: "pd.DataFrame", cells: Sequence[CellInfo], extras: Sequence[str], metric: str,
                out_dir: Path) -> list[Path]:
    variant_keys = ["method", *_varying(summary, [*GROUP[3:], *extras])]
    common = _common(summary, [], extras)
    sub = f"{name} · mean ± std over seeds" + (f" · {common}" if common else "")
    written = []
    if f"{metric}_acc_mean" in summary.columns:
        written.append(plot_vs_replay(summary, f"{metric}_acc", out_dir / f"acc_vs_replay_{metric}.png",
                                      ylabel=f"final {metric} (ACC)", variant_keys=variant_keys,
                                      title=f"Final {metric} (ACC) vs replay buffer size\n{sub}"))
        written.append(plot_vs_replay(summary, f"{metric}_fm", out_dir / f"fm_vs_replay_{metric}.png",
                                      ylabel=f"forgetting FM of {metric} (higher = more)", variant_keys=variant_keys,
                                      title=f"Forgetting (FM, {metric}) vs replay buffer size\n{sub}"))
    if "memory_mb_mean" in summary.columns:
        written.append(plot_memory_vs_replay(summary, out_dir / "memory_vs_replay.png", variant_keys=variant_keys,
                                             title=f"Memory vs replay buffer size\n{sub}"))
    written += plot_group_heatmaps(cells, summary, extras, metric, out_dir)
    return written
