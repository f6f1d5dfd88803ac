"""The probe-map panels: forgetting seen on images (``plots/maps_<task>.png``, one per task).

Rows are the task's probe images (clbench.engine.probes); columns are the image, its ground-truth
mask, then the map after every step, drawn over the image in grey. Each row has **one colour scale
across its steps** (its maps' 1st to 99.5th percentile over all steps, so a single hot pixel does
not wash the rest out): a defect that the model stops seeing fades from column to column instead of
being re-stretched to full colour. A column title gives the step, what it taught and the task's
pixel AUROC then; the step that taught the task is framed.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # must precede the pyplot import: plots run headless

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clbench.engine.probes import CHOICE, PIXELS, read_choice, read_npz, step_file  # noqa: E402
from clbench.engine.atomic import write_with  # noqa: E402
from clbench.engine.rundir import PANEL_GLOB, PROBE_MAPS, RunFolder, step_labels  # noqa: E402
from clbench.reporting.plots import DPI, _safe_name, format_title, read_title_info  # noqa: E402

CELL_INCHES = 1.45


def _step_maps(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    """step -> probe key -> map (float32), for every step file present."""
    maps: dict[int, dict[str, np.ndarray]] = {}
    for path in sorted(folder.glob("step_*.npz")):
        try:
            step = int(path.stem.split("_", 1)[1])
        except ValueError:
            continue
        if path.name != step_file(step):
            continue
        data = read_npz(path)
        maps[step] = {str(k): m.astype(np.float32) for k, m in zip(data["keys"], data["maps"])}
    return maps


def _row_scale(maps: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([m[np.isfinite(m)].ravel() for m in maps]) if maps else np.zeros(1)
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [1.0, 99.5])
    return float(low), float(high if high > low else low + 1e-6)


def plot_probe_maps(run_dir: str | Path, out_dir: str | Path | None = None, tasks: int | None = None) -> list[Path]:
    """Draw ``maps_<task>.png`` for every task with probes (the first ``tasks`` of them if given) into
    ``out_dir`` (default: the run's ``plots/``); nothing (with a warning) when the run kept no probe
    maps (``probe_maps: 0``, or a run older than them)."""
    run = RunFolder(run_dir)
    folder = run.path / PROBE_MAPS
    if not (folder / CHOICE).is_file() or not (folder / PIXELS).is_file():
        warnings.warn(f"{folder}: no probe maps recorded (probe_maps: 0, or an older run); skipping the map panels",
                      stacklevel=2)
        return []
    by_task = read_choice(folder / CHOICE)
    pixels = read_npz(folder / PIXELS)
    index = {str(k): i for i, k in enumerate(pixels["keys"])}
    maps = _step_maps(folder)
    steps = sorted(maps)
    metrics = run.metrics() if run.csv_path("metrics").is_file() else None
    labels = step_labels(metrics) if metrics is not None and not metrics.empty else {}
    info = read_title_info(run.path)
    taught = info.get("taught") or {}
    written = []
    out = Path(out_dir) if out_dir is not None else run.plots_dir
    for task, keys in list(by_task.items())[:tasks]:
        if not keys:
            continue
        written.append(_panel(task, keys, pixels, index, maps, steps, labels, metrics, taught.get(task), info,
                              out / f"maps_{_safe_name(task)}.png"))
    return written


def report_panels(cells, out_dir: Path) -> dict[str, list[Path]]:
    """For a sweep report: the first task's panel (where a sequence forgets most) of one cell per
    method and strategy setting (its lowest seed), drawn into ``out_dir/<cell>/`` from the cell's stored
    maps, for the cells that kept probe maps but drew no panels of their own (sweep cells draw no plots).
    One per group keeps the self-contained HTML page a few MB."""
    chosen: dict[tuple, object] = {}
    for cell in cells:
        if not cell.complete or not (Path(cell.run_dir) / PROBE_MAPS / CHOICE).is_file():
            continue
        if any((Path(cell.run_dir) / "plots").glob(PANEL_GLOB)):
            continue  # its own panels are embedded as they are
        group = (cell.params.get("method"), cell.params.get("strategy_label"), cell.params.get("backbone"))
        best = chosen.get(group)
        if best is None or (cell.params.get("seed") or 0) < (best.params.get("seed") or 0):
            chosen[group] = cell
    drawn = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a title field a cell lacks is not the report's problem
        for cell in chosen.values():
            paths = plot_probe_maps(cell.run_dir, out_dir / _safe_name(cell.name), tasks=1)
            if paths:
                drawn[cell.name] = paths
    return drawn


def _auroc(metrics, step: int, task: str) -> str:
    if metrics is None:
        return ""
    rows = metrics[(metrics["step"] == step) & (metrics["eval_task"] == task) & (metrics["metric"] == "pixel_auroc")]
    return f"\nAUROC {float(rows['value'].iloc[0]):.2f}" if len(rows) else ""


def _panel(task, keys, pixels, index, maps, steps, labels, metrics, taught_at, info, out: Path) -> Path:
    cols = 2 + len(steps)
    fig, axes = plt.subplots(len(keys), cols, figsize=(CELL_INCHES * cols, CELL_INCHES * len(keys) + 0.9),
                             squeeze=False)
    for r, key in enumerate(keys):
        image = pixels["images"][index[key]].transpose(1, 2, 0)
        grey = image.astype(np.float32).mean(axis=2) / 255.0
        row_maps = [maps[s][key] for s in steps if key in maps[s]]
        low, high = _row_scale(row_maps)
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(f"{key.split('/')[-2]}/{key.split('/')[-1]}\nscale {low:.3g}..{high:.3g}", fontsize=7)
        axes[r, 1].imshow(pixels["masks"][index[key]], cmap="gray", vmin=0, vmax=1)
        for c, step in enumerate(steps, start=2):
            ax = axes[r, c]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            if key in maps[step]:
                ax.imshow(maps[step][key], cmap="jet", vmin=low, vmax=high, alpha=0.55)
            if step == taught_at:
                for spine in ax.spines.values():
                    spine.set_edgecolor("black")
                    spine.set_linewidth(2.5)
            if r == 0:
                label = labels.get(step, f"step {step}") if hasattr(labels, "get") else f"step {step}"
                ax.set_title(f"{label}{_auroc(metrics, step, task)}", fontsize=7)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
            axes[r, 1].set_title("ground truth", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(format_title(info, f"anomaly maps of task {task} after every step (one colour scale per row; "
                                    "framed: the step that taught it)"), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save_palette_png(fig, out)


def _save_palette_png(fig, out: Path) -> Path:
    """The panel as a 256-colour PNG, atomically: a third of the RGB file's bytes (images and heat
    maps blend into many colours that a palette holds well), which keeps a report's embedded panels small."""
    from PIL import Image

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=DPI, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    return write_with(out, lambda tmp: image.save(tmp, format="PNG", optimize=True))
