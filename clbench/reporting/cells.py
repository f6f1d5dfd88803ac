"""A sweep's cells as the report reads them: ``sweep.yaml`` entries (or the run folders found), each
cell's parameters and state, and a complete cell's files checked before anything of them is used
(``check_complete_cell``: a truncated or edited ``metrics.csv`` makes the cell *damaged*). A cell's
files are read through ``clbench.engine.rundir.RunFolder``."""
from __future__ import annotations

import functools
import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from clbench import __version__ as CLBENCH_VERSION
from clbench.engine.rundir import CONFIG, TABLES, RunFileDamaged, RunFolder, read_checked_csv, read_mapping
from clbench.engine.tasks import categories_of
from clbench.sweep.spec import RUNS, SWEEP_FORMAT


if TYPE_CHECKING:
    import pandas as pd

STATS = ("acc", "bwt", "fm")
STANDARD_GRID_KEYS = {"method", "strategy", "seed", "task_order", "backbone"}  # and every strategy_params.* (the label)
MB = 1_000_000


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
    strategy_params: dict[str, Any] = field(default_factory=dict)  # as written in config.yaml

    @property
    def complete(self) -> bool:
        return self.status == "complete"


# --------------------------------------------------------------------------------------------
# reading the cells
# --------------------------------------------------------------------------------------------
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
            run_dir = sweep_dir / str(c.get("run_dir") or f"{RUNS}/{name}")
            config = c.get("config") if isinstance(c.get("config"), dict) else {}
            problem = "" if _inside(run_dir, sweep_dir) else f"sweep.yaml: run_dir {c.get('run_dir')!r} is outside the sweep folder"
            entries.append((name, run_dir, config, problem))
        # a strategy parameter is told by the strategy label (``label_strategies``), not by a column of its own
        extras = [k for k in _grid_keys(spec.get("grid")) if k not in STANDARD_GRID_KEYS and not k.startswith("strategy_params.")]
        listed = {path.resolve() for _, path, _, _ in entries}
        others = sorted(p.parent.name for p in sweep_dir.glob(f"{RUNS}/*/{CONFIG}") if p.parent.resolve() not in listed)
        if others:
            warnings.warn(f"{sweep_dir}: run folders not in sweep.yaml are left out: {', '.join(others)}", stacklevel=4)
        return entries, extras
    folders = sorted(p.parent for p in sweep_dir.glob(f"{RUNS}/*/{CONFIG}")) or sorted(
        p.parent for p in sweep_dir.glob(f"*/{CONFIG}"))
    return [(p.name, p, {}, "") for p in folders], []


def _not_a_sweep(sweep_dir: Path) -> str:
    """The one line for a folder with no cells: say what it is when we can tell."""
    folder = RunFolder(sweep_dir)
    if folder.is_started() and folder.csv_path("metrics").is_file():
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
        "strategy_label": str(config.get("strategy", "?")),  # set over all cells by label_strategies
        "buffer_size": _int(strategy_params.get("buffer_size")),
        "seed": _int(config.get("seed")),
        "task_order": str(config.get("task_order", "given")),
        "backbone": str(config.get("backbone") or method_params.get("backbone") or "default"),
        "pretrained": "unknown" if pretrained is None else bool(pretrained),
    }
    for key in extras:
        params[key] = _scalar(_dotted(config, key))
    return params


def _strategy_params(config: dict[str, Any]) -> dict[str, Any]:
    params = config.get("strategy_params")
    return dict(params) if isinstance(params, dict) else {}


# --------------------------------------------------------------------------------------------
# strategy groups: a strategy and the parameters that tell its cells apart
# --------------------------------------------------------------------------------------------
LABEL_ALWAYS = ("buffer_size",)  # the memory axis of a buffer strategy: named even at its default


@functools.lru_cache(maxsize=None)
def _strategy_defaults(strategy: str) -> tuple[tuple[str, Any], ...] | None:
    """The registered strategy's declared defaults, in declaration order; None for a name this
    clbench does not know (a strategy of another version, a combination): then every param shows."""
    try:
        from strategies.base import STRATEGIES  # only here: the report reads run folders without torch otherwise

        return tuple(STRATEGIES.get(strategy).hyperparameters.items())
    except Exception:  # noqa: BLE001 - any failure to find the class only makes labels longer
        return None


def _show_value(value: Any) -> str:
    return str(_scalar(value))


def strategy_label(strategy: str, params: dict[str, Any], varying: set[str] = frozenset()) -> str:
    """``replay(buffer_size=100)``, ``ewc(ewc_lambda=1000)``, ``sequential``: the strategy and the
    params of its config.yaml that differ from the declared defaults, vary within the sweep
    (``varying``), or are a buffer size; so two cells share a label exactly when their strategy
    settings agree, whatever the strategy."""
    defaults = _strategy_defaults(strategy)
    declared = dict(defaults) if defaults is not None else {}
    order = [k for k in declared if k in params] + sorted(k for k in params if k not in declared)
    shown = []
    for key in order:
        value = params[key]
        differs = defaults is None or key not in declared or not (
            value == declared[key] or _show_value(value) == _show_value(declared[key]))
        if differs or key in varying or key in LABEL_ALWAYS:
            shown.append(f"{key}={_show_value(value)}")
    return f"{strategy}({', '.join(shown)})" if shown else strategy


def label_strategies(cells: Sequence[CellInfo]) -> None:
    """Set each cell's ``strategy_label`` (a param that takes several values among the cells of one
    strategy is shown in all of them, so a sweep's labels line up)."""
    values: dict[tuple[str, str], set[str]] = {}
    for cell in cells:
        for key, value in cell.strategy_params.items():
            values.setdefault((cell.params["strategy"], key), set()).add(_show_value(value))
    for cell in cells:
        strategy = cell.params["strategy"]
        varying = {k for (s, k), seen in values.items() if s == strategy and len(seen) > 1}
        cell.params["strategy_label"] = strategy_label(strategy, cell.strategy_params, varying)


def _version(env: dict[str, Any]) -> str | None:
    packages = env.get("packages")
    version = packages.get("clbench") if isinstance(packages, dict) else None
    return str(version) if version is not None else None


def load_cells(sweep_dir: str | Path, *, labels: bool = True) -> tuple[list[CellInfo], list[str], str]:
    """Cells of a sweep (from ``sweep.yaml``; without one, every ``runs/*`` or ``*`` run folder),
    the extra grid keys that become columns, and the sweep's name. A complete cell whose files do
    not hold up (``check_complete_cell``) is ``damaged``, with the problem as its note.
    ``labels=False`` skips the strategy labels (they import the strategies, hence torch: seconds
    that ``clbench status`` does without)."""
    sweep_dir = Path(sweep_dir)
    spec = read_mapping(sweep_dir / "sweep.yaml", yaml.safe_load)
    fmt = spec.get("format")
    if isinstance(fmt, int) and fmt > SWEEP_FORMAT:
        raise ValueError(f"{sweep_dir / 'sweep.yaml'}: written by a newer clbench ({spec.get('clbench_version', '?')}, "
                         f"format {fmt}; this clbench {CLBENCH_VERSION} reads format {SWEEP_FORMAT}): update clbench")
    status = read_mapping(sweep_dir / "status.json").get("cells")
    status = status if isinstance(status, dict) else {}
    entries, extras = _entries(sweep_dir, spec)
    if not entries:
        raise FileNotFoundError(_not_a_sweep(sweep_dir))
    cells = [_load_cell(name, run_dir, spec_config, problem, status.get(name), extras)
             for name, run_dir, spec_config, problem in entries]
    if labels:
        label_strategies(cells)
    return cells, extras, str(spec.get("name") or sweep_dir.name)


def _load_cell(name: str, run_dir: Path, spec_config: dict[str, Any], problem: str, status: Any,
               extras: Sequence[str]) -> CellInfo:
    if problem:
        return CellInfo(name, run_dir, _params(spec_config, {}, extras), "damaged", note=problem,
                        strategy_params=_strategy_params(spec_config))
    folder = RunFolder(run_dir)
    started = folder.is_started()
    config = (folder.config() or spec_config) if started else spec_config
    env = folder.env()
    params = _params(config, env, extras)
    state = status if isinstance(status, dict) else {}
    error = state.get("error") if isinstance(state.get("error"), str) else None
    summary = folder.summary()
    tasks = config.get("tasks") if isinstance(config.get("tasks"), list) else []
    tasks = categories_of(tasks)  # a schedule of several categories per step is a list of steps
    if summary.get("complete") is True:
        cell = CellInfo(name, run_dir, params, "complete", summary=summary, version=_version(env))
        problem = check_complete_cell(cell)
        if problem:
            cell.status, cell.note = "damaged", problem
        cell.tasks = [str(t) for t in summary.get("tasks") or []] if isinstance(summary.get("tasks"), list) else []
    elif folder.summary_path.is_file() and not summary:
        cell = CellInfo(name, run_dir, params, "damaged", note="summary.json is unreadable or not a JSON object",
                        version=_version(env))
    elif not started:
        cell = CellInfo(name, run_dir, params, "failed" if error else "not started", note=error or "")
    elif state.get("status") == "running elsewhere":
        cell = CellInfo(name, run_dir, params, "running elsewhere", note=error or "", tasks=[str(t) for t in tasks])
    else:
        steps = folder.steps_done()
        note = f"{steps} step(s) done, no summary.json"
        cell = CellInfo(name, run_dir, params, "failed" if error else "incomplete",
                        note=f"{error} ({note})" if error else note, tasks=[str(t) for t in tasks])
    cell.strategy_params = _strategy_params(config)
    profile = config.get("paper_profile")
    cell.paper_profile = profile if isinstance(profile, dict) else None
    return cell


# --------------------------------------------------------------------------------------------
# checking a complete cell's files (W07: a truncated metrics.csv must not reach the aggregates)
# --------------------------------------------------------------------------------------------
METRICS_COLUMNS = TABLES["metrics"].columns
CellDamaged = RunFileDamaged  # one line: what is wrong with a complete cell's files
_read_table = read_checked_csv  # a complete run's CSV, strictly


def check_complete_cell(cell: CellInfo) -> str:
    """The first problem with a complete cell's files ('' if none); keeps the checked frames.

    A run writes ``summary.json`` last, from the same rows as ``metrics.csv``; for a complete cell
    every step and every (metric, task) must be there, once, and the final step must give the
    summary's ACC. Anything else (a file cut short, edited, from another run or another clbench
    format) would put wrong numbers into the report without a word."""
    try:
        steps, tasks, metrics = _summary_shape(cell.summary or {})
        folder = RunFolder(cell.run_dir)
        cell.metrics = folder.checked_table("metrics")
        _check_metrics(cell.metrics, steps, tasks, metrics, cell.summary["metrics"])
        cell.memory = folder.checked_table("memory")
        _check_steps(cell.memory, steps, TABLES["memory"].file)
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


def _check_steps(frame: "pd.DataFrame", steps: int, name: str) -> None:
    found = sorted(set(frame["step"]))
    if found != list(range(steps)):
        shown = f"steps {found[0]}..{found[-1]} ({len(found)})" if found else "no rows"
        raise CellDamaged(f"{name} has {shown}, summary.json says {steps} step(s)")


def _check_metrics(frame: "pd.DataFrame", steps: int, tasks: list[str], metrics: list[str],
                   stats: dict[str, dict[str, Any]]) -> None:
    _check_steps(frame, steps, TABLES["metrics"].file)
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
    values.update(memory_mb=nan, method_state_mb=nan, replay_buffer_mb=nan, peak_rss_mb=nan, cl_memory_mb=nan)
    memory = cell.memory
    if memory is not None and not memory.empty:
        final = memory[memory["step"] == memory["step"].max()].groupby("component")["bytes"].sum()
        state = float(final.get("method_state", 0.0))
        replay = float(final.get("replay_buffer", 0.0))
        peak = memory.loc[memory["component"] == "peak_rss", "bytes"]
        values.update(method_state_mb=state / MB, replay_buffer_mb=replay / MB, memory_mb=(state + replay) / MB,
                      peak_rss_mb=float(peak.max()) / MB if len(peak) else nan,
                      cl_memory_mb=sum(float(b) for c, b in final.items() if is_cl_memory(str(c))) / MB)
    return values


def is_cl_memory(component: str) -> bool:
    """Memory spent on continual learning: the replay buffer and whatever a strategy stores
    (``strategy_state``: EWC's importance and anchor; any future ``strategy_*`` component)."""
    return component == "replay_buffer" or component.startswith("strategy_")


def _started_rows(cell: CellInfo) -> "pd.DataFrame | None":
    """metrics.csv rows of a cell for runs.csv: a complete cell's checked frame; an unfinished
    cell's rows if the file reads; a damaged cell's never (its rows are not trusted)."""
    if cell.complete:
        return cell.metrics.copy()
    if cell.status == "damaged":
        return None
    try:
        frame = RunFolder(cell.run_dir).read_csv("metrics")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return frame if all(c in frame.columns for c in METRICS_COLUMNS) else None
