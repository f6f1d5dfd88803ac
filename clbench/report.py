"""Sweep report: the cells of a sweep aggregated over seeds into tables and plots.

``clbench report SWEEP_DIR`` reads every cell's run folder (``config.yaml``, ``env.json``,
``metrics.csv``, ``memory.csv``, ``summary.json``) and writes ``SWEEP_DIR/report/``:

* ``runs.csv``   every row of every cell's ``metrics.csv`` plus the cell's parameters (tidy);
* ``cells.csv``  one row per cell: parameters, status, ACC/BWT/FM per metric, final memory;
* ``summary.csv`` / ``summary.md`` / ``summary.html``: per (method, strategy, buffer_size, and any
  other grid key that varies) the mean and sample standard deviation (n - 1) over seeds;
* ``plots/``     final ACC, FM and memory vs replay buffer size (one line per method, bands =
  +- std over seeds; sequential and joint as horizontal lower/upper-bound lines) and the
  accuracy-matrix heatmap of each group averaged over its seeds;
* for a paper-profile sweep (``clbench reproduce``; cells carry ``paper_profile``), the paper's table
  (``paper_table.md`` / ``.csv``, also at the top of ``summary.md|html``): rows pixel AUROC, image
  AUROC, AUPRO, pixel F1, average forgetting (%), extra memory (MB), columns the methods, each entry
  clbench's value (mean over seeds) beside the published figure and the difference. One function
  (``paper_table``) builds it; markdown, HTML and the console only render it. A metric a run does not
  have (older runs: pixel F1, relative forgetting) shows "n/a".

ACC/BWT/FM are read from each cell's ``summary.json`` (the runner's numbers). Memory is the final
step's ``method_state + replay_buffer`` bytes and the largest per-step ``peak_rss``. Cells that are
not complete are listed as such and left out of the aggregates, with a warning.

A complete cell's files are checked before they are used (``check_complete_cell``): ``metrics.csv``
and ``memory.csv`` must be whole (no row cut mid-line), in the runner's columns, with every step
``summary.json`` counts and every (metric, task) of each step, and the final step must give the
summary's ACC. A cell that fails is *damaged*: one warning line naming the problem, listed in the
report, left out of ``runs.csv`` and the aggregates. Cells written by another clbench version
(``env.json``'s package version) are kept, with one warning line per version; a ``sweep.yaml`` of a
newer format is refused in one line. The report writes only into a new, empty or earlier report
folder (marked ``.clbench-report``), never over a user's files, and reads no run folder outside the
sweep folder.
"""
from __future__ import annotations

import argparse
import html
import io
import json
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from clbench import __version__ as CLBENCH_VERSION
from clbench import atomic
from clbench.sweep import SWEEP_FORMAT

if TYPE_CHECKING:
    import pandas as pd

METRICS = ("pixel_auroc", "image_auroc", "pixel_aupro")
STATS = ("acc", "bwt", "fm")
BOUNDS = {"sequential": "lower bound", "joint": "upper bound"}
PARAMS = ("method", "strategy", "buffer_size", "seed", "task_order", "backbone", "pretrained")
GROUP = ("method", "strategy", "buffer_size", "task_order", "backbone", "pretrained")
STANDARD_GRID_KEYS = {"method", "strategy", "seed", "task_order", "backbone", "strategy_params.buffer_size"}
MEMORY = ("memory_mb", "method_state_mb", "replay_buffer_mb", "peak_rss_mb")
MB = 1_000_000
REPORT_DIR = "report"


@dataclass
class CellInfo:
    name: str
    run_dir: Path
    params: dict[str, Any]
    status: str  # complete | damaged | incomplete | running elsewhere | failed | not started
    note: str = ""
    summary: dict[str, Any] | None = None
    tasks: list[str] = field(default_factory=list)
    paper_profile: dict[str, Any] | None = None  # set by `clbench reproduce`: {name, differences, ...}
    version: str | None = None  # the clbench version that wrote the run (env.json), None if unknown
    metrics: "pd.DataFrame | None" = None  # metrics.csv as checked (complete cells), read once
    memory: "pd.DataFrame | None" = None  # memory.csv as checked (complete cells)

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass
class Report:
    out_dir: Path
    files: list[Path]
    summary: "pd.DataFrame"
    cells: list[CellInfo]
    markdown: str
    paper: "PaperTable | None" = None


# --------------------------------------------------------------------------------------------
# reading the cells
# --------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, or {} (missing, unreadable, invalid, or not a mapping)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object, or {} (missing, unreadable, invalid, or not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dotted(mapping: dict[str, Any], key: str) -> Any:
    node: Any = mapping
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _scalar(value: Any) -> Any:
    """A CSV/group-friendly value: lists joined with '+', mappings as JSON, None as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _grid_keys(grid: Any) -> list[str]:
    grids = grid if isinstance(grid, list) else [grid]
    return list(dict.fromkeys(k for g in grids if isinstance(g, dict) for k in g if isinstance(k, str)))


def _steps_done(run_dir: Path) -> int:
    import pandas as pd

    try:
        return int(pd.read_csv(run_dir / "metrics.csv", usecols=["step"])["step"].nunique())
    except (OSError, ValueError, KeyError, UnicodeDecodeError):
        return 0


def _int(value: Any, default: int = 0) -> int:
    """An int from a config value a person may have edited ('3', 3.0, None); ``default`` otherwise."""
    if isinstance(value, bool):
        return default
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _entries(sweep_dir: Path, spec: dict[str, Any]) -> tuple[list[tuple[str, Path, dict[str, Any], str]], list[str]]:
    """(name, run folder, config from sweep.yaml, problem) per cell, and the extra grid keys.

    A malformed ``sweep.yaml`` entry, or one whose run folder lies outside the sweep folder (a
    hand-edited or hostile file), becomes a damaged cell named by its problem: never read."""
    if spec.get("cells"):
        entries = []
        for i, c in enumerate(spec["cells"] if isinstance(spec["cells"], list) else []):
            name = c.get("name") if isinstance(c, dict) else None
            if not isinstance(name, str) or not name:
                entries.append((f"cell #{i + 1}", sweep_dir, {}, "sweep.yaml: this entry has no name"))
                continue
            run_dir = sweep_dir / str(c.get("run_dir") or f"runs/{name}")
            config = c.get("config") if isinstance(c.get("config"), dict) else {}
            problem = "" if _inside(run_dir, sweep_dir) else f"sweep.yaml: run_dir {c.get('run_dir')!r} is outside the sweep folder"
            entries.append((name, run_dir, config, problem))
        extras = [k for k in _grid_keys(spec.get("grid")) if k not in STANDARD_GRID_KEYS]
        listed = {path.resolve() for _, path, _, _ in entries}
        others = sorted(p.parent.name for p in sweep_dir.glob("runs/*/config.yaml") if p.parent.resolve() not in listed)
        if others:
            warnings.warn(f"{sweep_dir}: run folders not in sweep.yaml are left out: {', '.join(others)}", stacklevel=4)
        return entries, extras
    folders = sorted(p.parent for p in sweep_dir.glob("runs/*/config.yaml")) or sorted(
        p.parent for p in sweep_dir.glob("*/config.yaml"))
    return [(p.name, p, {}, "") for p in folders], []


def _not_a_sweep(sweep_dir: Path) -> str:
    """The one line for a folder with no cells: say what it is when we can tell."""
    if (sweep_dir / "config.yaml").is_file() and (sweep_dir / "metrics.csv").is_file():
        return f"{sweep_dir}: this is a run folder, not a sweep (its plots: clbench plot {sweep_dir})"
    return f"{sweep_dir}: not a sweep folder (no sweep.yaml and no run folders runs/*/config.yaml)"


def _params(config: dict[str, Any], env: dict[str, Any], extras: Sequence[str]) -> dict[str, Any]:
    strategy_params = config.get("strategy_params") if isinstance(config.get("strategy_params"), dict) else {}
    method_params = config.get("method_params") if isinstance(config.get("method_params"), dict) else {}
    weights = env.get("weights") if isinstance(env.get("weights"), dict) else {}
    pretrained = weights.get("pretrained")
    params = {
        "method": str(config.get("method", "?")),
        "strategy": str(config.get("strategy", "?")),
        "buffer_size": _int(strategy_params.get("buffer_size")),
        "seed": _int(config.get("seed")),
        "task_order": str(config.get("task_order", "given")),
        "backbone": str(config.get("backbone") or method_params.get("backbone") or "default"),
        "pretrained": "unknown" if pretrained is None else bool(pretrained),
    }
    for key in extras:
        params[key] = _scalar(_dotted(config, key))
    return params


def _version(env: dict[str, Any]) -> str | None:
    packages = env.get("packages")
    version = packages.get("clbench") if isinstance(packages, dict) else None
    return str(version) if version is not None else None


def load_cells(sweep_dir: str | Path) -> tuple[list[CellInfo], list[str], str]:
    """Cells of a sweep (from ``sweep.yaml``; without one, every ``runs/*`` or ``*`` run folder),
    the extra grid keys that become columns, and the sweep's name. A complete cell whose files do
    not hold up (``check_complete_cell``) is ``damaged``, with the problem as its note."""
    sweep_dir = Path(sweep_dir)
    spec = _read_yaml(sweep_dir / "sweep.yaml")
    fmt = spec.get("format")
    if isinstance(fmt, int) and fmt > SWEEP_FORMAT:
        raise ValueError(f"{sweep_dir / 'sweep.yaml'}: written by a newer clbench ({spec.get('clbench_version', '?')}, "
                         f"format {fmt}; this clbench {CLBENCH_VERSION} reads format {SWEEP_FORMAT}): update clbench")
    status = _read_json(sweep_dir / "status.json").get("cells")
    status = status if isinstance(status, dict) else {}
    entries, extras = _entries(sweep_dir, spec)
    if not entries:
        raise FileNotFoundError(_not_a_sweep(sweep_dir))
    cells = [_load_cell(name, run_dir, spec_config, problem, status.get(name), extras)
             for name, run_dir, spec_config, problem in entries]
    return cells, extras, str(spec.get("name") or sweep_dir.name)


def _load_cell(name: str, run_dir: Path, spec_config: dict[str, Any], problem: str, status: Any,
               extras: Sequence[str]) -> CellInfo:
    if problem:
        return CellInfo(name, run_dir, _params(spec_config, {}, extras), "damaged", note=problem)
    started = (run_dir / "config.yaml").is_file()
    config = (_read_yaml(run_dir / "config.yaml") or spec_config) if started else spec_config
    env = _read_json(run_dir / "env.json")
    params = _params(config, env, extras)
    state = status if isinstance(status, dict) else {}
    error = state.get("error") if isinstance(state.get("error"), str) else None
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path)
    tasks = config.get("tasks") if isinstance(config.get("tasks"), list) else []
    if summary.get("complete") is True:
        cell = CellInfo(name, run_dir, params, "complete", summary=summary, version=_version(env))
        problem = check_complete_cell(cell)
        if problem:
            cell.status, cell.note = "damaged", problem
        cell.tasks = [str(t) for t in summary.get("tasks") or []] if isinstance(summary.get("tasks"), list) else []
    elif summary_path.is_file() and not summary:
        cell = CellInfo(name, run_dir, params, "damaged", note="summary.json is unreadable or not a JSON object",
                        version=_version(env))
    elif not started:
        cell = CellInfo(name, run_dir, params, "failed" if error else "not started", note=error or "")
    elif state.get("status") == "running elsewhere":
        cell = CellInfo(name, run_dir, params, "running elsewhere", note=error or "", tasks=[str(t) for t in tasks])
    else:
        steps = _steps_done(run_dir)
        note = f"{steps} step(s) done, no summary.json"
        cell = CellInfo(name, run_dir, params, "failed" if error else "incomplete",
                        note=f"{error} ({note})" if error else note, tasks=[str(t) for t in tasks])
    profile = config.get("paper_profile")
    cell.paper_profile = profile if isinstance(profile, dict) else None
    return cell


# --------------------------------------------------------------------------------------------
# checking a complete cell's files (W07: a truncated metrics.csv must not reach the aggregates)
# --------------------------------------------------------------------------------------------
METRICS_COLUMNS = ("step", "trained_task", "eval_task", "metric", "value")
MEMORY_COLUMNS = ("step", "component", "bytes")


class CellDamaged(Exception):
    """One line: what is wrong with a complete cell's files."""


def check_complete_cell(cell: CellInfo) -> str:
    """The first problem with a complete cell's files ('' if none); keeps the checked frames.

    A run writes ``summary.json`` last, from the same rows as ``metrics.csv``; for a complete cell
    every step and every (metric, task) must be there, once, and the final step must give the
    summary's ACC. Anything else (a file cut short, edited, from another run or another clbench
    format) would put wrong numbers into the report without a word."""
    try:
        steps, tasks, metrics = _summary_shape(cell.summary or {})
        cell.metrics = _read_table(cell.run_dir / "metrics.csv", METRICS_COLUMNS)
        _check_metrics(cell.metrics, steps, tasks, metrics, cell.summary["metrics"])
        cell.memory = _read_table(cell.run_dir / "memory.csv", MEMORY_COLUMNS)
        _check_steps(cell.memory, steps, "memory.csv")
    except CellDamaged as err:
        cell.metrics = cell.memory = None
        return str(err)
    return ""


def _summary_shape(summary: dict[str, Any]) -> tuple[int, list[str], list[str]]:
    steps, tasks, metrics = summary.get("steps"), summary.get("tasks"), summary.get("metrics")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
            and isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)
            and isinstance(metrics, dict) and metrics and all(isinstance(v, dict) for v in metrics.values())):
        raise CellDamaged("summary.json is not in the format this clbench reads (steps, tasks, metrics)")
    return steps, tasks, sorted(metrics)


NAN_TEXT = ("", "nan", "NaN")  # how pandas writes a NaN metric (an undefined one is legitimate)


def _read_table(path: Path, columns: Sequence[str]) -> "pd.DataFrame":
    """A CSV the runner wrote: complete lines, the expected columns, integer steps, numbers in the
    last column. Read as text first: a task named "NA" or "null" stays a name, not a NaN."""
    import pandas as pd

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CellDamaged(f"{path.name} is missing") from None
    except OSError as err:
        raise CellDamaged(f"{path.name} is unreadable ({err.strerror or err})") from None
    if not raw.strip():
        raise CellDamaged(f"{path.name} is empty")
    if not raw.endswith(b"\n"):
        raise CellDamaged(f"{path.name} ends in the middle of a row (truncated)")
    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError is a ValueError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CellDamaged(f"{path.name} is unreadable ({reason})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CellDamaged(f"{path.name} has no column '{missing[0]}' (a different clbench format?)")
    step = pd.to_numeric(frame["step"], errors="coerce")
    bad = frame.index[step.isna() | (step % 1 != 0)]
    if len(bad):
        raise CellDamaged(f"{path.name} line {int(bad[0]) + 2}: step {frame['step'].iloc[bad[0]]!r} is not a whole number")
    frame["step"] = step.astype(int)
    number = columns[-1]
    values = pd.to_numeric(frame[number].where(~frame[number].isin(NAN_TEXT)), errors="coerce")
    bad = frame.index[values.isna() & ~frame[number].isin(NAN_TEXT)]
    if len(bad):
        raise CellDamaged(f"{path.name} line {int(bad[0]) + 2}: {number} {frame[number].iloc[bad[0]]!r} is not a number")
    frame[number] = values.astype(float)
    return frame


def _check_steps(frame: "pd.DataFrame", steps: int, name: str) -> None:
    found = sorted(set(frame["step"]))
    if found != list(range(steps)):
        shown = f"steps {found[0]}..{found[-1]} ({len(found)})" if found else "no rows"
        raise CellDamaged(f"{name} has {shown}, summary.json says {steps} step(s)")


def _check_metrics(frame: "pd.DataFrame", steps: int, tasks: list[str], metrics: list[str],
                   stats: dict[str, dict[str, Any]]) -> None:
    _check_steps(frame, steps, "metrics.csv")
    present = sorted(set(frame["metric"]))
    if present != metrics:
        lost = [m for m in metrics if m not in present]
        what = f"lacks metric '{lost[0]}'" if lost else f"has metric '{next(m for m in present if m not in metrics)}' that summary.json lacks"
        raise CellDamaged(f"metrics.csv {what}")
    _check_coverage(frame, steps, tasks, metrics)
    _check_acc(frame[frame["step"] == steps - 1], metrics, stats)


def _check_coverage(frame: "pd.DataFrame", steps: int, tasks: list[str], metrics: list[str]) -> None:
    """Every step evaluates every task once per metric (a file cut at a row boundary loses some)."""
    groups = frame.groupby(["step", "metric"])["eval_task"]
    want = set(tasks)
    for step in range(steps):
        for metric in metrics:
            found = list(groups.get_group((step, metric))) if (step, metric) in groups.groups else []
            if len(found) != len(tasks) or set(found) != want:
                raise CellDamaged(f"metrics.csv step {step}, {metric}: {len(want & set(found))} of {len(tasks)} tasks "
                                  f"({len(found)} rows)")


def _check_acc(final: "pd.DataFrame", metrics: list[str], stats: dict[str, dict[str, Any]]) -> None:
    """The final step's mean is the summary's ACC (rows of another run, or edited, do not match)."""
    import numpy as np

    for metric in metrics:
        acc = stats[metric].get("acc")
        values = final.loc[final["metric"] == metric, "value"].to_numpy(dtype=float)
        mean = float(values.mean()) if values.size and not np.isnan(values).any() else float("nan")
        if isinstance(acc, numbers.Real) and math.isfinite(acc) and math.isfinite(mean) \
                and abs(mean - acc) > 1e-9 + 1e-6 * abs(acc):
            raise CellDamaged(f"metrics.csv disagrees with summary.json ({metric} ACC {mean:.6g} vs {acc:.6g})")


def _number(value: Any) -> float:
    """A summary value as float: null (NaN written by strict JSON) or anything else -> NaN."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else float("nan")


def _cell_values(cell: CellInfo) -> dict[str, float]:
    """ACC/BWT/FM per metric from summary.json, final memory from memory.csv (MB)."""
    values: dict[str, float] = {"steps": _number(cell.summary.get("steps"))}
    for metric, stats in (cell.summary.get("metrics") or {}).items():
        for stat in STATS:
            values[f"{metric}_{stat}"] = _number(stats.get(stat))
    nan = float("nan")
    values.update(memory_mb=nan, method_state_mb=nan, replay_buffer_mb=nan, peak_rss_mb=nan)
    memory = cell.memory
    if memory is not None and not memory.empty:
        final = memory[memory["step"] == memory["step"].max()].groupby("component")["bytes"].sum()
        state = float(final.get("method_state", 0.0))
        replay = float(final.get("replay_buffer", 0.0))
        peak = memory.loc[memory["component"] == "peak_rss", "bytes"]
        values.update(method_state_mb=state / MB, replay_buffer_mb=replay / MB, memory_mb=(state + replay) / MB,
                      peak_rss_mb=float(peak.max()) / MB if len(peak) else nan)
    return values


def _started_rows(cell: CellInfo) -> "pd.DataFrame | None":
    """metrics.csv rows of a cell for runs.csv: a complete cell's checked frame; an unfinished
    cell's rows if the file reads; a damaged cell's never (its rows are not trusted)."""
    import pandas as pd

    if cell.complete:
        return cell.metrics.copy()
    if cell.status == "damaged":
        return None
    from clbench.plots import read_csv_texts

    try:
        frame = read_csv_texts(cell.run_dir / "metrics.csv", METRICS_COLUMNS)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return frame if all(c in frame.columns for c in METRICS_COLUMNS) else None


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def runs_frame(cells: Sequence[CellInfo], extras: Sequence[str]) -> "pd.DataFrame":
    """Every metrics.csv row of every started cell, with the cell's parameters as columns
    (damaged cells left out: they are listed in cells.csv with their problem)."""
    import pandas as pd

    frames = []
    for cell in cells:
        frame = _started_rows(cell)
        if frame is None:
            continue
        front = {"cell": cell.name, **{k: cell.params[k] for k in (*PARAMS, *extras)}, "complete": cell.complete}
        for i, (key, value) in enumerate(front.items()):
            frame.insert(i, key, value)
        frames.append(frame)
    columns = ["cell", *PARAMS, *extras, "complete", "step", "trained_task", "eval_task", "metric", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def cells_frame(cells: Sequence[CellInfo], extras: Sequence[str]) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for cell in cells:
        row: dict[str, Any] = {"cell": cell.name, **{k: cell.params[k] for k in (*PARAMS, *extras)},
                               "status": cell.status, "note": cell.note, "clbench_version": cell.version or "unknown"}
        if cell.complete:
            row.update(_cell_values(cell))
        rows.append(row)
    return pd.DataFrame(rows)


def _natural(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers by value before text (8 < 16)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _strategy_rank(strategy: str) -> int:
    return {"sequential": 0, "joint": 2}.get(strategy, 1)


def summarize_cells(cells: "pd.DataFrame", extras: Sequence[str]) -> "pd.DataFrame":
    """Mean and sample std (n - 1) over seeds per group of complete cells."""
    import pandas as pd

    group = [*GROUP, *extras]
    done = cells[cells["status"] == "complete"]
    values = [c for c in [f"{m}_{s}" for m in _metrics_in(done) for s in STATS] + list(MEMORY) if c in done.columns]
    if done.empty:
        return pd.DataFrame(columns=[*group, "n_seeds", "seeds"])
    grouped = done.groupby(group, dropna=False, sort=False)
    out = grouped.size().rename("n_seeds").to_frame()
    out["seeds"] = grouped["seed"].agg(lambda s: " ".join(str(v) for v in sorted(s)))
    mean = grouped[values].mean()
    std = grouped[values].std(ddof=1)
    for column in values:
        out[f"{column}_mean"] = mean[column]
        out[f"{column}_std"] = std[column]
    out = out.reset_index()
    order = sorted(range(len(out)), key=lambda i: (str(out.loc[i, "method"]), _strategy_rank(out.loc[i, "strategy"]),
                                                   str(out.loc[i, "strategy"]), int(out.loc[i, "buffer_size"]),
                                                   *[_natural(out.loc[i, k]) for k in group[3:]]))
    return out.iloc[order].reset_index(drop=True)


def _metrics_in(frame: "pd.DataFrame") -> list[str]:
    found = [c[: -len("_acc")] for c in frame.columns if c.endswith("_acc")]
    return [m for m in METRICS if m in found] + sorted(m for m in found if m not in METRICS)


def _table_metrics(summary: "pd.DataFrame", metric: str) -> list[str]:
    """The headline metric, then the standard ones, that the summary has."""
    return [m for m in dict.fromkeys([metric, *METRICS]) if f"{m}_acc_mean" in summary.columns]


def _varying(summary: "pd.DataFrame", columns: Sequence[str]) -> list[str]:
    """Columns that tell cells of the same method apart. A key that only differs between methods
    (a method-specific setting such as PatchCore's budget) is implied by the method column."""
    def varies(column: str) -> bool:
        values = summary[column].astype(str)
        if "method" in summary.columns:
            return bool((values.groupby(summary["method"]).nunique() > 1).any())
        return values.nunique() > 1

    return [c for c in columns if c in summary.columns and varies(c)]


def _fmt(mean: float, std: float, digits: int = 3, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A pipe table padded to column width, so it reads in a terminal as well as rendered."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right)) + " |"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _table(summary: "pd.DataFrame", metric: str, keys: Sequence[str], memory: bool) -> tuple[list[str], list[list[str]], list[bool]]:
    headers = [("buffer" if k == "buffer_size" else k) for k in keys] + ["seeds", "ACC", "BWT", "FM"]
    right = [k == "buffer_size" for k in keys] + [True, False, False, False]
    if memory:
        headers += ["memory MB", "peak RSS MB"]
        right += [True, True]
    rows = []
    for _, r in summary.iterrows():
        row = [str(r[k]) for k in keys] + [str(int(r["n_seeds"]))]
        for stat in STATS:
            row.append(_fmt(r.get(f"{metric}_{stat}_mean"), r.get(f"{metric}_{stat}_std"), signed=stat == "bwt"))
        if memory:
            row.append(_fmt(r.get("memory_mb_mean"), r.get("memory_mb_std"), digits=1))
            row.append(_fmt(r.get("peak_rss_mb_mean"), r.get("peak_rss_mb_std"), digits=0))
        rows.append(row)
    return headers, rows, right


def _common(summary: "pd.DataFrame", cells: Sequence[CellInfo], extras: Sequence[str]) -> str:
    parts = []
    for key in ("backbone", "pretrained", "task_order", *extras):
        values = summary[key].astype(str).unique() if key in summary.columns and len(summary) else []
        if len(values) == 1 and key == "pretrained":
            parts.append({"True": "pretrained", "False": "random-init"}.get(values[0], "weights unknown"))
        elif len(values) == 1:
            parts.append(f"{key} {values[0]}")
    orders = {tuple(c.tasks) for c in cells if c.complete}
    if len(orders) == 1:
        parts.append("tasks " + ", ".join(next(iter(orders))))
    return " · ".join(parts)


def render_markdown(name: str, summary: "pd.DataFrame", cells: Sequence[CellInfo], extras: Sequence[str],
                    metric: str, plots: Sequence[Path], out_dir: Path) -> str:
    keys = ["method", "strategy", "buffer_size", *_varying(summary, [*GROUP[3:], *extras])]
    complete = sum(c.complete for c in cells)
    lines = [f"# Sweep report: {name}", "",
             f"{complete} of {len(cells)} cells complete · mean ± std over seeds (sample std, n−1) · "
             "memory = final method state + replay buffer, MB = 10^6 bytes · peak RSS = largest per-step peak", ""]
    common = _common(summary, cells, extras)
    if common:
        lines += [f"common: {common}", ""]
    for m in _table_metrics(summary, metric):
        lines += [f"## {m}" + (" (headline)" if m == metric else ""), ""]
        lines += [markdown_table(*_table(summary, m, keys, memory=m == metric)), ""]
    missing = [c for c in cells if not c.complete]
    if missing:
        lines += ["## Cells left out (not complete or damaged)", ""]
        lines += [f"- {c.name}: {c.status}" + (f" — {c.note}" if c.note else "") for c in missing] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"- {p.relative_to(out_dir)}" for p in plots] + [""]
    return "\n".join(lines)


def render_html(name: str, summary: "pd.DataFrame", cells: Sequence[CellInfo], extras: Sequence[str],
                metric: str, plots: Sequence[Path], out_dir: Path) -> str:
    import pandas as pd

    keys = ["method", "strategy", "buffer_size", *_varying(summary, [*GROUP[3:], *extras])]
    complete = sum(c.complete for c in cells)
    parts = [f"<h1>Sweep report: {html.escape(name)}</h1>",
             f"<p>{complete} of {len(cells)} cells complete · mean ± std over seeds (sample std, n−1) · memory = final "
             "method state + replay buffer, MB = 10<sup>6</sup> bytes · peak RSS = largest per-step peak</p>"]
    common = _common(summary, cells, extras)
    if common:
        parts.append(f"<p>common: {html.escape(common)}</p>")
    for m in _table_metrics(summary, metric):
        headers, rows, _ = _table(summary, m, keys, memory=m == metric)
        parts.append(f"<h2>{html.escape(m)}</h2>")
        parts.append(pd.DataFrame(rows, columns=headers).to_html(index=False, escape=True, border=0))
    missing = [c for c in cells if not c.complete]
    if missing:
        parts.append("<h2>Cells left out (not complete or damaged)</h2><ul>")
        parts += [f"<li>{html.escape(c.name)}: {html.escape(c.status)}{(' — ' + html.escape(c.note)) if c.note else ''}</li>"
                  for c in missing]
        parts.append("</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f'<p><img src="{html.escape(str(p.relative_to(out_dir)))}" alt="{html.escape(p.name)}"></p>' for p in plots]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}th{background:#f3f3f3}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


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

    from clbench.plots import _save_atomic

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    _draw_vs_replay(ax, summary, column, variant_keys)
    ax.set_ylabel(ylabel)
    _finish(fig, ax, title)
    return _save_atomic(fig, out_path)


def plot_memory_vs_replay(summary: "pd.DataFrame", out_path: Path, *, title: str, variant_keys: Sequence[str]) -> Path:
    import matplotlib.pyplot as plt

    from clbench.plots import _save_atomic

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

    from clbench.plots import plot_accuracy_heatmap

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


# --------------------------------------------------------------------------------------------
# the paper's table (paper-profile sweeps)
# --------------------------------------------------------------------------------------------
PROFILE_VALUE = re.compile(r" \(profile: .*\)$")  # "--set k=v (profile: old)": the old value differs per method
F1 = "pixel_f1_max"  # clbench's pixel F1 (best threshold over all pixels of a task's test set)
# (row key, label, digits of clbench's value and of the difference, digits of the published figure)
PAPER_ROWS: tuple[tuple[str, str, int, int], ...] = (
    ("pixel_auroc", "pixel AUROC", 3, 2),
    ("image_auroc", "image AUROC", 3, 2),
    ("pixel_aupro", "AUPRO", 3, 2),
    ("pixel_f1", "pixel F1", 3, 2),
    ("forgetting_pct", "avg forgetting (%)", 2, 2),
    ("fm_pixel_f1", "FM of pixel F1 x100 (clbench)", 2, 2),
    ("memory_mb", "extra memory (MB)", 1, 0),
)
DISPLAY = {"draem": "DRAEM", "patchcore": "PatchCore", "padim": "PaDiM", "cfa": "CFA", "stfpm": "STFPM",
           "efficientad": "EfficientAD", "fastflow": "FastFlow", "cainnflow": "CAINNFlow"}
FORGETTING_NOTE = (
    "avg forgetting (%) is the paper's: the relative drop of pixel F1 from its best value at any earlier step "
    "(including steps before the task was learned), each task's term clipped at 0 by its code, so >= 0 "
    "(clad src/utilities/utility_ad.py; the published CFA -4.70 cannot come from that code as written); "
    "clbench's FM (Chaudhry et al. 2018) is the absolute drop from a task's best value after it was learned "
    "to its final value, may be negative, shown x100 beside it.")
MEMORY_NOTE = ("extra memory = method state + replay buffer at the final step (memory.csv), MB = 10^6 bytes "
               "(seed 003: 30000 x 1536 x 4 B = 184.3 MB).")


@dataclass
class PaperEntry:
    value: float  # clbench, mean over seeds (NaN: not available)
    published: float | None
    n_seeds: int

    @property
    def difference(self) -> float:
        if self.published is None or not math.isfinite(self.value):
            return float("nan")
        return self.value - self.published


@dataclass
class PaperTable:
    profile: str
    title: str
    source: str
    methods: list[str]
    rows: list[tuple[str, str, int, int]]
    entries: dict[tuple[str, str], PaperEntry]
    not_in_paper: list[str]
    run_differences: list[str]  # differences of this sweep's runs beyond the profile's own (command line)

    def text(self, row: str, method: str) -> str:
        """One entry as rendered: ``clbench (published, difference)``."""
        digits, pub_digits = next((d, p) for key, _, d, p in self.rows if key == row)
        entry = self.entries[(row, method)]
        published = None if entry.published is None else f"{entry.published:.{pub_digits}f}"
        if not math.isfinite(entry.value):
            return "n/a" + (f" ({published})" if published is not None else "")
        value = f"{entry.value:.{digits}f}"
        if published is None:
            return value
        return f"{value} ({published}, {entry.difference:+.{digits}f})"

    def headers(self) -> list[str]:
        return [""] + [DISPLAY.get(m, m) + ("*" if m in self.not_in_paper else "") for m in self.methods]

    def body(self) -> list[list[str]]:
        return [[label] + [self.text(key, m) for m in self.methods] for key, label, _, _ in self.rows]

    def notes(self) -> list[str]:
        seeds = sorted({self.entries[(self.rows[0][0], m)].n_seeds for m in self.methods})
        notes = [f"each entry: clbench, mean over {'/'.join(map(str, seeds))} seed(s) (published, clbench - published); "
                 f"published: {self.source or 'the paper'}; final ACC of each metric; pixel F1 = clbench's {F1}.",
                 FORGETTING_NOTE, MEMORY_NOTE]
        if any(m in self.not_in_paper for m in self.methods):
            notes.append("* not in the paper (no published figures).")
        if self.run_differences:
            notes.append("these runs also differ from the paper in: " + "; ".join(self.run_differences))
        notes.append("the profile's own differences from the paper's code are in each run's env.json (paper_profile).")
        return notes

    def frame(self) -> "pd.DataFrame":
        import pandas as pd

        rows = [dict(row=key, label=label, method=m, clbench=self.entries[(key, m)].value,
                     published=self.entries[(key, m)].published, difference=self.entries[(key, m)].difference,
                     n_seeds=self.entries[(key, m)].n_seeds)
                for key, label, _, _ in self.rows for m in self.methods]
        return pd.DataFrame(rows)


def _stat(metrics: dict[str, Any], metric: str, key: str, scale: float = 1.0) -> float:
    value = (metrics.get(metric) or {}).get(key)
    return float(value) * scale if isinstance(value, numbers.Real) and not isinstance(value, bool) else float("nan")


def paper_values(cell: CellInfo) -> dict[str, float]:
    """The paper table's values of one complete cell (NaN for what its run does not have)."""
    metrics = (cell.summary or {}).get("metrics") or {}
    return {
        "pixel_auroc": _stat(metrics, "pixel_auroc", "acc"),
        "image_auroc": _stat(metrics, "image_auroc", "acc"),
        "pixel_aupro": _stat(metrics, "pixel_aupro", "acc"),
        "pixel_f1": _stat(metrics, F1, "acc"),
        "forgetting_pct": _stat(metrics, F1, "relative_forgetting", 100.0),
        "fm_pixel_f1": _stat(metrics, F1, "fm", 100.0),
        "memory_mb": _cell_values(cell)["memory_mb"],
    }


def paper_table(cells: Sequence[CellInfo]) -> PaperTable | None:
    """The paper's table for the cells of a paper-profile sweep (None if no cell has a profile)."""
    import numpy as np

    names = [c.paper_profile.get("name") for c in cells if c.paper_profile]
    if not names:
        return None
    name = max(set(names), key=names.count)
    members = [c for c in cells if c.paper_profile and c.paper_profile.get("name") == name]
    title, source, published, order, not_in_paper, own = "", "", {}, [], [], set()
    try:
        from clbench.profile import load_profile

        profile = load_profile(str(name))
        title, published = profile.title, dict(profile.published)
        source = str(published.pop("source", ""))
        order, not_in_paper = profile.methods, profile.not_in_paper
        own = {d for m in order for key in ("all", m, "replay", "sequential", "joint") for d in profile.differences.get(key, [])}
    except Exception as err:  # noqa: BLE001 - a report of old or moved profiles still renders
        warnings.warn(f"paper profile '{name}' not loadable ({err}): no published figures", stacklevel=2)
    first_row = next(iter(published.values()), {}) if published else {}
    present = list(dict.fromkeys(c.params["method"] for c in members))
    methods = [m for m in list(first_row) + order if m in present]
    methods = list(dict.fromkeys(methods + present))
    entries: dict[tuple[str, str], PaperEntry] = {}
    values = {m: [paper_values(c) for c in members if c.complete and c.params["method"] == m] for m in methods}
    for key, _, _, _ in PAPER_ROWS:
        for m in methods:
            column = np.array([v[key] for v in values[m]], dtype=float)
            mean = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
            pub = (published.get(key) or {}).get(m) if key in published else None
            entries[(key, m)] = PaperEntry(mean, None if pub is None else float(pub), len(values[m]))
    run_differences = list(dict.fromkeys(PROFILE_VALUE.sub("", d) for c in members
                                         for d in c.paper_profile.get("differences", []) if d not in own))
    flagged = {c.params["method"] for c in members if c.paper_profile.get("not_in_paper")}
    return PaperTable(str(name), title, source, methods, list(PAPER_ROWS), entries,
                      [m for m in methods if m in not_in_paper or m in flagged], run_differences)


def render_paper_markdown(table: PaperTable) -> str:
    lines = [f"## The paper's table: {table.profile}" + (f" ({table.title})" if table.title else ""), ""]
    lines.append(markdown_table(table.headers(), table.body(), [False] + [True] * len(table.methods)))
    lines.append("")
    lines += [f"- {note}" for note in table.notes()]
    return "\n".join(lines) + "\n"


def render_paper_html(table: PaperTable) -> str:
    import pandas as pd

    title = f"The paper's table: {table.profile}" + (f" ({table.title})" if table.title else "")
    frame = pd.DataFrame(table.body(), columns=table.headers())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes())
    return f"<h2>{html.escape(title)}</h2>" + frame.to_html(index=False, escape=True, border=0) + f"<ul>{notes}</ul>"


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _say_cells(sweep_dir: Path, cells: Sequence[CellInfo]) -> None:
    """Warnings, one line each: every damaged cell with its problem, the unfinished ones together,
    and cells written by another clbench version than this one (kept in the aggregates)."""
    for cell in cells:
        if cell.status == "damaged":
            warnings.warn(f"{cell.name}: {cell.note}; left out of the aggregates", stacklevel=3)
    missing = [c for c in cells if not c.complete]
    if missing:
        warnings.warn(f"{sweep_dir}: {len(missing)} of {len(cells)} cells not complete, left out of the aggregates: "
                      + ", ".join(f"{c.name} ({c.status})" for c in missing), stacklevel=3)
    versions: dict[str | None, list[str]] = {}
    for cell in cells:
        if cell.complete:
            versions.setdefault(cell.version, []).append(cell.name)
    known = {v for v in versions if v is not None}
    if known - {CLBENCH_VERSION} or len(versions) > 1:
        for version, names in versions.items():
            if version != CLBENCH_VERSION:
                what = f"clbench {version}" if version else "an unknown clbench version (no readable env.json)"
                warnings.warn(f"{len(names)} cell(s) written by {what}, this is {CLBENCH_VERSION}: {', '.join(names)}; "
                              "included, but compare their numbers with care", stacklevel=3)


REPORT_MARKER = ".clbench-report"  # marks a folder the report wrote, so a re-run may overwrite it
REPORT_FILES = ("runs.csv", "cells.csv", "summary.csv", "summary.md", "summary.html", "paper_table.md",
                "paper_table.csv", "plots", REPORT_MARKER)


def _check_output(out: Path) -> None:
    """Refuse, in one line, an output that is a file or a folder of someone else's: the report
    overwrites its own files (summary.md, plots/...) and must never overwrite a user's."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file, not a folder; give the report another --output")
    if not out.is_dir():
        return
    try:
        names = {p.name for p in out.iterdir()}
    except OSError as err:
        raise ValueError(f"{out}: cannot read the report folder ({err.strerror or err})") from None
    names -= {n for n in names if n.startswith(".") and n.endswith(".tmp")}
    earlier = {"runs.csv", "cells.csv", "summary.csv"} <= names and names <= set(REPORT_FILES)
    if names and REPORT_MARKER not in names and not earlier:
        raise ValueError(f"{out}: exists and is not a clbench report folder (it holds {sorted(names)[0]!r}, ...); "
                         "give the report a new or empty --output")


def build_report(sweep_dir: str | Path, metric: str = "pixel_auroc", out_dir: str | Path | None = None) -> Report:
    """Aggregate a sweep's cells; write CSVs, markdown, HTML and plots to ``<sweep_dir>/report``.

    Everything is read and checked before anything is written; a write that fails (full disk,
    permissions) is one line naming the folder."""
    sweep_dir = Path(sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ValueError(f"{sweep_dir}: is a file, not a sweep folder")
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: sweep folder not found")
    out = Path(out_dir) if out_dir is not None else sweep_dir / REPORT_DIR
    cells, extras, name = load_cells(sweep_dir)
    _say_cells(sweep_dir, cells)
    available = sorted({m for c in cells if c.complete for m in (c.summary.get("metrics") or {})})
    if available and metric not in available:
        raise ValueError(f"--metric: '{metric}' is not in the runs' summaries (available: {', '.join(available)})")
    _check_output(out)
    try:
        return _write_report(out, name, cells, extras, metric)
    except OSError as err:
        raise ValueError(f"{out}: cannot write the report ({err.strerror or err})") from None


def _write_report(out: Path, name: str, cells: list[CellInfo], extras: list[str], metric: str) -> Report:
    atomic.write_text(out / REPORT_MARKER, f"written by clbench {CLBENCH_VERSION} report\n")
    files = [atomic.write_csv(out / "runs.csv", runs_frame(cells, extras))]
    per_cell = cells_frame(cells, extras)
    files.append(atomic.write_csv(out / "cells.csv", per_cell))
    summary = summarize_cells(per_cell, extras)
    files.append(atomic.write_csv(out / "summary.csv", summary))
    plots = write_plots(name, summary, cells, extras, metric, out / "plots") if len(summary) else []
    markdown = render_markdown(name, summary, cells, extras, metric, plots, out)
    page = render_html(name, summary, cells, extras, metric, plots, out)
    paper = paper_table(cells)
    if paper is not None:
        paper_md = render_paper_markdown(paper)
        files.append(atomic.write_text(out / "paper_table.md", paper_md))
        files.append(atomic.write_csv(out / "paper_table.csv", paper.frame()))
        head, _, rest = markdown.partition("\n\n")
        markdown = f"{head}\n\n{paper_md}\n{rest}"
        page = page.replace("</p>\n", "</p>\n" + render_paper_html(paper) + "\n", 1)
    files.append(atomic.write_text(out / "summary.md", markdown))
    files.append(atomic.write_text(out / "summary.html", page))
    return Report(out, files + plots, summary, cells, markdown, paper)


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="aggregate a sweep's runs: tables (csv, md, html) and plots",
        description="Aggregate every cell of a sweep over seeds (mean ± std of ACC, BWT, FM, memory) into "
                    "SWEEP_DIR/report/: runs.csv, cells.csv, summary.csv/.md/.html and plots/.",
    )
    p.add_argument("sweep_dir", type=Path, help="the sweep folder (<output_dir>/<name>, with sweep.yaml)")
    p.add_argument("--metric", default="pixel_auroc", help="headline metric of tables and plots (default: pixel_auroc)")
    p.add_argument("--output", dest="out_dir", type=Path, help="report folder (default: SWEEP_DIR/report)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Warnings first (one line each: a damaged cell is never buried below the tables), then the
    markdown, then what was written."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_report(args.sweep_dir, args.metric, args.out_dir)
    for warning in caught:
        print(f"warning: {warning.message}")
    print(report.markdown)
    damaged = sum(c.status == "damaged" for c in report.cells)
    print(f"wrote {len(report.files)} files to {report.out_dir}"
          + (f"; {damaged} damaged cell(s) left out (see the warnings above)" if damaged else ""))
    if report.summary.empty:
        print("no complete cells: nothing to aggregate")
        return 1
    return 0
