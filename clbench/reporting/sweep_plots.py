"""The report's plots over a sweep. The main one: final ACC and FM against the memory spent on
continual learning (``cl_memory_mb``: replay buffer + strategy state), one line per strategy family
per method, so strategies of different kinds compare on one axis. Then final ACC, FM and memory vs
replay buffer size (one line per method, bands = +- std over seeds, sequential / joint as reference
lines) and one accuracy-matrix heatmap per group averaged over its seeds."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from clbench.reporting.cells import CellInfo
from clbench.reporting.tables import BUFFER_ERA, GROUP, LABEL, _common, _varying, group_keys


if TYPE_CHECKING:
    import pandas as pd

BOUNDS = {"sequential": "lower bound", "joint": "upper bound"}


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _variant_label(row: "pd.Series", variant_keys: Sequence[str]) -> str:
    extras = [f"{k.split('.')[-1]}={row[k]}" for k in variant_keys if k != "method"]
    return str(row["method"]) + (f" ({', '.join(extras)})" if extras else "")


def _variants(summary: "pd.DataFrame", variant_keys: Sequence[str]) -> Iterator[tuple[Any, str, "pd.DataFrame"]]:
    """Each method variant's colour, legend label and summary rows (one colour per variant, every plot)."""
    import matplotlib.pyplot as plt
    import numpy as np

    colours = plt.get_cmap("tab10")
    for k, (_, variant) in enumerate(summary.drop_duplicates(list(variant_keys)).iterrows()):
        mask = np.logical_and.reduce([summary[key].astype(str) == str(variant[key]) for key in variant_keys])
        yield colours(k % colours.N), _variant_label(variant, variant_keys), summary[mask]


def _draw_vs_replay(ax, summary: "pd.DataFrame", column: str, variant_keys: Sequence[str]) -> None:
    """Replay-like strategies as lines over buffer size (band = ± std; one size = a point with an
    error bar); sequential / joint as horizontal reference lines, in the same colour per method."""
    import numpy as np

    styles = ["-", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    replay = sorted(s for s in summary["strategy"].unique() if s not in BOUNDS and _buffer_strategy(summary, s))
    sizes = sorted({int(b) for b in summary.loc[summary["strategy"].isin(replay), "buffer_size"]})
    for colour, label, rows in _variants(summary, variant_keys):
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


def _buffer_strategy(summary: "pd.DataFrame", strategy: str) -> bool:
    """A strategy whose cells are drawn over buffer size: replay, or any whose groups name a buffer."""
    rows = summary[summary["strategy"] == strategy]
    labels = rows[LABEL].astype(str) if LABEL in rows.columns else []
    return strategy == "replay" or bool((rows["buffer_size"] > 0).any()) or any("buffer_size=" in t for t in labels)


BOUND_MARKERS = {"sequential": "v", "joint": "^"}


def _family_markers(summary: "pd.DataFrame") -> dict[str, str]:
    """One marker per strategy family of the sweep (the bounds have theirs: ``BOUND_MARKERS``)."""
    markers = ["o", "s", "D", "*", "X", "P", "h", "p"]
    families = sorted(s for s in summary["strategy"].unique() if s not in BOUNDS)
    return {family: markers[f % len(markers)] for f, family in enumerate(families)}


def _cl_memory_legend(summary: "pd.DataFrame", variant_keys: Sequence[str]) -> list:
    """The legend in two parts: a colour per method variant, a marker per strategy (lines join a
    strategy's settings, e.g. its buffer sizes): 4 methods x 8 strategies read as 4 + 8 entries."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, lw=2.5, label=label) for colour, label, _ in _variants(summary, variant_keys)]
    present = set(summary["strategy"])
    handles += [Line2D([], [], color="0.35", marker=marker, ls="-", lw=1, label=family)
                for family, marker in _family_markers(summary).items()]
    handles += [Line2D([], [], color="0.35", marker=marker, ms=9, ls="none", label=f"{strategy} ({BOUNDS[strategy]})")
                for strategy, marker in BOUND_MARKERS.items() if strategy in present]
    return handles


def _draw_vs_cl_memory(ax, summary: "pd.DataFrame", column: str, variant_keys: Sequence[str]) -> None:
    """One line per strategy family (the strategy name) per method variant, x = mean CL memory, y =
    mean ``column`` with +- std error bars; sequential and joint (no CL memory) as markers only.
    The x axis is linear up to the smallest non-zero memory and logarithmic above (symlog), so the
    zero-memory cells stay on the plot."""
    import numpy as np

    for colour, label, rows in _variants(summary, variant_keys):
        for family, marker in _family_markers(summary).items():
            sel = rows[rows["strategy"] == family].sort_values(["cl_memory_mb_mean", LABEL])
            x, y = sel["cl_memory_mb_mean"].to_numpy(dtype=float), sel[f"{column}_mean"].to_numpy(dtype=float)
            keep = np.isfinite(x) & np.isfinite(y)
            if not keep.any():
                continue
            e = np.nan_to_num(sel[f"{column}_std"].to_numpy(dtype=float))[keep]
            ax.errorbar(x[keep], y[keep], yerr=e, color=colour, marker=marker, ls="-", lw=1.6,
                        capsize=3, label=f"{label} {family}")
        for strategy, marker in BOUND_MARKERS.items():
            sel = rows[rows["strategy"] == strategy]
            x, y = sel["cl_memory_mb_mean"].to_numpy(dtype=float), sel[f"{column}_mean"].to_numpy(dtype=float)
            keep = np.isfinite(x) & np.isfinite(y)
            if keep.any():
                e = np.nan_to_num(sel[f"{column}_std"].to_numpy(dtype=float))[keep]
                ax.errorbar(x[keep], y[keep], yerr=e, color=colour, marker=marker, ms=9, ls="none", capsize=3,
                            label=f"{label} {strategy} ({BOUNDS[strategy]})")
    memory = summary["cl_memory_mb_mean"].to_numpy(dtype=float)
    positive = memory[np.isfinite(memory) & (memory > 0)]
    if positive.size:
        low, high = float(positive.min()), float(positive.max())
        ax.set_xscale("symlog", linthresh=low)
        ax.set_xlim(-0.5 * low, 2.0 * high)  # room for the markers at 0 and at the largest memory
        decades = range(math.ceil(math.log10(low)), math.floor(math.log10(2.0 * high)) + 1)
        ax.set_xticks([0.0, *(10.0 ** k for k in decades)])  # 0, then decades clear of it
    else:
        ax.set_xticks([0.0])  # bounds only (or no memory recorded)
    ax.set_xlabel("CL memory, MB (replay buffer + strategy state)")
    ax.grid(True, alpha=0.3)


def plot_vs_cl_memory(summary: "pd.DataFrame", metric: str, out_path: Path, *, title: str,
                      variant_keys: Sequence[str]) -> Path:
    """The report's main plot: final ACC (left) and FM (right) of ``metric`` against CL memory."""
    import matplotlib.pyplot as plt

    from clbench.reporting.plots import _save_atomic

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, stat, ylabel in ((axes[0], "acc", f"final {metric} (ACC)"),
                             (axes[1], "fm", f"forgetting FM of {metric} (higher = more)")):
        if f"{metric}_{stat}_mean" in summary.columns:
            _draw_vs_cl_memory(ax, summary, f"{metric}_{stat}", variant_keys)
        ax.set_ylabel(ylabel)
    if axes[0].get_legend_handles_labels()[0]:
        axes[1].legend(handles=_cl_memory_legend(summary, variant_keys), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(top=0.82, wspace=0.3)
    return _save_atomic(fig, out_path)


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

    group = group_keys(extras)
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
        legacy = row["strategy"] in BUFFER_ERA
        info = {"method": what, "strategy": row["strategy"] if legacy else row[LABEL], "backbone": row["backbone"],
                "pretrained": row["pretrained"] if isinstance(row["pretrained"], bool) else None,
                "replay_size": int(row["buffer_size"]), "tasks": tasks}
        parts = [str(row["method"]), str(row["strategy"])]
        if row["strategy"] == "replay" or int(row["buffer_size"]) or "buffer_size=" in str(row[LABEL]):
            parts.append(f"buffer{int(row['buffer_size'])}")
        parts += [p.replace("=", "") for p in _label_params(str(row[LABEL]), str(row["strategy"]))
                  if not p.startswith("buffer_size=")]
        parts += [f"{k.split('.')[-1]}{row[k]}" for k in varying]
        out = out_dir / f"heatmap_{metric}_{_slug('-'.join(parts))}.png"
        written.append(plot_accuracy_heatmap(merged, out, metric=metric, title_info=info))
    return written


def _label_params(label: str, strategy: str) -> list[str]:
    """``["ewc_lambda=1000"]`` from ``ewc(ewc_lambda=1000)``: the params a group label names."""
    inner = label[len(strategy) + 1:-1] if label.startswith(strategy + "(") and label.endswith(")") else ""
    return [p.strip() for p in inner.split(", ") if p.strip()]


def write_plots(name: str, summary: "pd.DataFrame", cells: Sequence[CellInfo], extras: Sequence[str], metric: str,
                out_dir: Path) -> list[Path]:
    variant_keys = ["method", *_varying(summary, [*GROUP[3:], *extras])]
    common = _common(summary, [], extras)
    sub = f"{name} · mean ± std over seeds" + (f" · {common}" if common else "")
    written = []
    if f"{metric}_acc_mean" in summary.columns and "cl_memory_mb_mean" in summary.columns:
        written.append(plot_vs_cl_memory(summary, metric, out_dir / f"acc_fm_vs_cl_memory_{metric}.png",
                                         variant_keys=variant_keys,
                                         title=f"Final {metric} (ACC) and forgetting (FM) vs memory spent on "
                                               f"continual learning\n{sub}"))
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
