"""Sweeps: a grid of runs (methods x replay sizes x seeds x ...), each a normal run folder.

A sweep spec (YAML)::

    name: replay-sweep
    output_dir: results/sweeps          # the sweep folder is <output_dir>/<name>/
    base: {tasks: 4, image_size: 64, weights: none, device: cpu}
    grid:                               # a mapping (one product) or a list of mappings (union)
      method: [padim, stfpm]
      strategy: [replay]
      strategy_params.buffer_size: [0, 20, 100]     # dotted keys address nested mappings
      seed: [0, 1]
    per_method:                         # optional: settings for the cells of one method
      stfpm: {method_params.epochs: 20, method_params.batch_size: 4}

Every cell is ``base``, then ``per_method[<its method>]``, then its grid values on top (a grid key
always wins), run by ``clbench.runner.run_experiment`` into ``<sweep_dir>/runs/<cell>/``, so config
validation, atomic results and checkpoints come from the runner. ``<sweep_dir>/sweep.yaml`` holds the resolved spec and
the cells; ``status.json`` the last outcome of each cell; ``logs/<cell>.log`` each cell's log.

Re-running a sweep skips finished cells (``summary.json`` with ``complete: true``) and resumes cells
that were started and killed. Every cell's config is validated before anything runs. A failing
cell is reported with its one-line error and does not stop the others; a full disk stops the sweep
from starting more cells (each would fail the same way). A cell whose run folder is locked by
another live process (``clbench.locks``: a second sweep, an orphan of a killed one) is reported as
running elsewhere and skipped, never started twice. A spec that expands to more than ``MAX_CELLS``
cells is refused unless ``--max-cells`` allows it (counted before any cell is built).

Executors sit behind one seam, ``Executor.map(fn, cells) -> iterator of CellResult`` (in
completion order): ``serial`` (in this process), ``local`` (a process pool, one fresh process per
cell) and ``ray`` (Ray tasks, local or on a cluster). Pool workers die with the sweep process
(``PR_SET_PDEATHSIG`` on Linux, a watchdog thread elsewhere): a killed sweep leaves no orphan
running a cell, and the cell resumes on the next run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import sys
import signal
import textwrap
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import yaml

from clbench import atomic
from clbench.config import ConfigError, RunConfig, from_mapping
from clbench.locks import FolderLocked, holder_pid, locked_by, run_lock

log = logging.getLogger("clbench.sweep")

SPEC_KEYS = ("name", "output_dir", "base", "grid", "per_method")
DEFAULT_OUTPUT = "results/sweeps"
RUNS = "runs"
LOGS = "logs"
SWEEP_FILE = "sweep.yaml"
STATUS_FILE = "status.json"
SWEEP_ENTRIES = (RUNS, LOGS, SWEEP_FILE, STATUS_FILE, "report")  # what a sweep folder holds
EXECUTORS = ("local", "serial", "ray")
SET_BY_SWEEP = ("name", "output_dir")  # RunConfig keys the sweep sets per cell
# Grid keys whose value alone reads well in a cell name ("shuffle", "wide_resnet50_2").
VALUE_ONLY = ("task_order", "backbone")
_RUN_DEFAULTS = RunConfig().to_dict()
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 120
MAX_CELLS = 1000  # a larger spec is most likely a mistake (a list where a value was meant): --max-cells
SWEEP_FORMAT = 1  # layout of sweep.yaml / run folders this clbench writes (read back by the report)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# --------------------------------------------------------------------------------------------
# spec and cells
# --------------------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    name: str
    output_dir: str
    base: dict[str, Any]
    grids: list[dict[str, list[Any]]]
    source: str = "sweep"
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> settings of its cells

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class Cell:
    """One run of the sweep: its name, the grid values that define it, and its full config."""

    name: str
    params: dict[str, Any]  # grid key (dotted) -> value
    config: dict[str, Any]  # RunConfig mapping (nested), output_dir and name set by the sweep
    sweep_dir: str

    @property
    def run_dir(self) -> Path:
        return Path(self.sweep_dir) / RUNS / self.name

    @property
    def log_path(self) -> Path:
        return Path(self.sweep_dir) / LOGS / f"{self.name}.log"


@dataclass
class CellResult:
    name: str
    status: str  # ran | resumed | skipped | failed | busy (its folder is locked by another live process)
    seconds: float = 0.0
    error: str | None = None  # one line
    errno: int | None = None  # of an OSError that failed the cell (a full disk stops the sweep)

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def complete(self) -> bool:
        return self.status in ("ran", "resumed", "skipped")

    @property
    def busy(self) -> bool:
        return self.status == "busy"


def running_elsewhere(pid: int | None) -> str:
    return f"running elsewhere (pid {pid if pid is not None else 'unknown'})"


def one_line(err: BaseException | str) -> str:
    """``Type: first line of the message`` (ConfigError / ValueError messages already name the fault)."""
    if isinstance(err, str):
        return err
    lines = str(err).strip().splitlines()
    message = lines[0] if lines else ""
    kind = type(err).__name__
    return f"{kind}: {message}" if message else kind


def load_spec(path: str | Path, output_dir: str | None = None) -> SweepSpec:
    """Read and check a sweep YAML (structure only; cells are validated by ``expand``)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep spec not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(SPEC_KEYS)}")
    data.setdefault("name", path.stem)
    return spec_from_mapping(data, source, output_dir)


def spec_from_mapping(data: Mapping[str, Any], source: str = "sweep", output_dir: str | None = None) -> SweepSpec:
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' (a sweep has: {', '.join(SPEC_KEYS)})")
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"{source}: 'name' must be a folder name, got {name!r}")
    out = output_dir if output_dir is not None else data.get("output_dir", DEFAULT_OUTPUT)
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{source}: 'output_dir' must be a path, got {out!r}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: 'base' must be a mapping of run-config keys, got {base!r}")
    if "grid" not in data:
        raise ConfigError(f"{source}: 'grid' is missing (a mapping of keys to lists of values)")
    grid = data["grid"]
    grids = grid if isinstance(grid, list) else [grid]
    if not grids:
        raise ConfigError(f"{source}: 'grid' is empty")
    for i, g in enumerate(grids):
        where = f"{source}: grid" if not isinstance(grid, list) else f"{source}: grid[{i}]"
        if not isinstance(g, dict) or not g:
            raise ConfigError(f"{where} must be a non-empty mapping of keys to lists of values, got {g!r}")
        for key, values in g.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{where}: bad key {key!r}")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: '{key}' must be a non-empty list of values, got {values!r}")
    per_method = data.get("per_method") or {}
    if not isinstance(per_method, dict) or not all(isinstance(m, str) and isinstance(v, dict) for m, v in per_method.items()):
        raise ConfigError(f"{source}: 'per_method' must map method names to mappings of run-config keys, got {per_method!r}")
    per_method_keys = [k for settings in per_method.values() for k in settings]
    for key in list(base) + [k for g in grids for k in g] + per_method_keys:
        if key.split(".")[0] in SET_BY_SWEEP:
            raise ConfigError(f"{source}: '{key}' is set by the sweep (runs go to <output_dir>/<name>/runs/<cell>); remove it")
    for method, settings in per_method.items():
        if "method" in settings:
            raise ConfigError(f"{source}: per_method.{method}: 'method' cannot be set here")
    return SweepSpec(name=name, output_dir=out, base=dict(base), grids=[dict(g) for g in grids], source=source,
                     per_method={m: dict(v) for m, v in per_method.items()})


def set_dotted(mapping: dict[str, Any], key: str, value: Any, source: str) -> None:
    """``mapping['a']['b'] = value`` for ``key='a.b'``; the first part must be a RunConfig key."""
    head, *rest = key.split(".")
    if head not in _RUN_DEFAULTS:
        where = f" in '{key}'" if rest else ""
        raise ConfigError(f"{source}: unknown key '{head}'{where} (known: {', '.join(_RUN_DEFAULTS)})")
    if not rest:
        mapping[key] = copy.deepcopy(value)
        return
    if not isinstance(_RUN_DEFAULTS[head], dict):
        raise ConfigError(f"{source}: '{head}' is not a mapping, cannot set '{key}'")
    node = mapping.setdefault(head, {})
    for part in rest[:-1]:
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cannot set '{key}': its parent is not a mapping")
        node = node.setdefault(part, {})
    if not isinstance(node, dict) or not rest[-1]:
        raise ConfigError(f"{source}: cannot set '{key}'")
    node[rest[-1]] = copy.deepcopy(value)


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "+".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}{_format_value(v)}" for k, v in value.items())
    return str(value)


def _abbreviations(keys: Sequence[str]) -> dict[str, str]:
    """Grid key -> name in cell names: its last dotted part, unless two keys share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, last)}


def _component(abbr: str, key: str, value: Any) -> str:
    text = _format_value(value)
    if key in VALUE_ONLY:
        return text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{abbr}{text}"
    return f"{abbr}_{text}"


def cell_name(params: Mapping[str, Any], config: Mapping[str, Any], abbreviations: Mapping[str, str]) -> str:
    """``<method>-<strategy>[-<grid key><value>...]-seed<N>``, deterministic.

    Method, strategy and seed are always in the name; every other grid key of the cell is, in
    grid order, except top-level run keys at their RunConfig default (``task_order: given``), so
    adding values to a grid later never renames the cells that already exist.
    """
    parts = [_format_value(config.get("method", _RUN_DEFAULTS["method"])),
             _format_value(config.get("strategy", _RUN_DEFAULTS["strategy"]))]
    for key, value in params.items():
        if key in ("method", "strategy", "seed"):
            continue
        if key in _RUN_DEFAULTS and value == _RUN_DEFAULTS[key]:
            continue
        parts.append(_component(abbreviations[key], key, value))
    parts.append(f"seed{_format_value(config.get('seed', _RUN_DEFAULTS['seed']))}")
    name = _UNSAFE.sub("_", "-".join(parts)).strip("._") or "cell"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}-{_digest(params)}"
    return name


def _digest(data: Any) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _absolute_paths(config: dict[str, Any]) -> None:
    """Workers (other processes, Ray nodes) may not share the cwd: make file paths absolute."""
    root = config.get("data_root", _RUN_DEFAULTS["data_root"])
    if isinstance(root, str) and root:
        config["data_root"] = str(Path(root).expanduser().resolve())
    weights = config.get("weights")
    if isinstance(weights, str) and weights not in ("auto", "none", "imagenet") and Path(weights).expanduser().exists():
        config["weights"] = str(Path(weights).expanduser().resolve())


def count_cells(spec: SweepSpec) -> int:
    """How many cells the grids give at most (before removing runs listed twice), without building any."""
    return sum(math.prod(len(values) for values in grid.values()) for grid in spec.grids)


def check_cell_count(spec: SweepSpec, max_cells: int | None = MAX_CELLS) -> int:
    """Refuse a spec larger than ``max_cells`` before expanding it (10^6 cells would take minutes
    and gigabytes just to list); ``None`` means no limit."""
    if max_cells is not None and max_cells < 1:
        raise ConfigError(f"--max-cells must be at least 1, got {max_cells}")
    total = count_cells(spec)
    if max_cells is not None and total > max_cells:
        sizes = " + ".join(" x ".join(str(len(v)) for v in g.values()) for g in spec.grids)
        raise ConfigError(f"{spec.source}: the grid expands to {total} cells ({sizes}), more than the limit of "
                          f"{max_cells}; check the grid, or pass --max-cells {total} to run them all")
    return total


def expand(spec: SweepSpec, *, check: bool = True, max_cells: int | None = MAX_CELLS) -> list[Cell]:
    """All cells of the spec, in grid order; names unique. With ``check``, each cell's config is
    validated (RunConfig keys and values, method, method_params, strategy, strategy_params), so a
    typo stops the sweep before anything runs, with one line naming the key and the cell.

    Names are unique ignoring case too: on a case-insensitive file system (macOS, Windows)
    ``tasks_Alpha`` and ``tasks_alpha`` would be one run folder."""
    import itertools

    check_cell_count(spec, max_cells)
    sweep_dir = Path(spec.output_dir).expanduser().resolve() / spec.name
    keys = list(dict.fromkeys(k for g in spec.grids for k in g))
    abbreviations = _abbreviations(keys)
    base: dict[str, Any] = {}
    for key, value in spec.base.items():
        set_dotted(base, key, value, f"{spec.source}: base")
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    for i, grid in enumerate(spec.grids):
        where = f"{spec.source}: grid" if len(spec.grids) == 1 else f"{spec.source}: grid[{i}]"
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid.keys(), values))
            config = copy.deepcopy(base)
            method = params.get("method", base.get("method", _RUN_DEFAULTS["method"]))
            for key, value in spec.per_method.get(method, {}).items():
                set_dotted(config, key, value, f"{spec.source}: per_method.{method}")
            for key, value in params.items():
                set_dotted(config, key, value, where)
            _absolute_paths(config)
            name = cell_name(params, config, abbreviations)
            other = seen.get(name.casefold())
            if other is not None:
                if other.config == {**config, "output_dir": other.config["output_dir"], "name": other.name}:
                    continue  # the same run listed twice (two grids, or a value repeated in a list)
                name = _unique_name(f"{name}-{_digest(params)}", seen)
            config["output_dir"] = str(sweep_dir / RUNS)
            config["name"] = name
            cell = Cell(name=name, params=params, config=config, sweep_dir=str(sweep_dir))
            seen[name.casefold()] = cell
            cells.append(cell)
    if check:
        for cell in cells:
            validate_cell(cell, spec.source)
    return cells


def _unique_name(name: str, seen: Mapping[str, Cell]) -> str:
    """``name``, or ``name-2``, ``name-3``, ...: the first that no cell has (ignoring case)."""
    candidate, k = name, 2
    while candidate.casefold() in seen:
        candidate, k = f"{name}-{k}", k + 1
    return candidate


def validate_cell(cell: Cell, source: str = "sweep") -> RunConfig:
    """Everything about a cell that can be checked without data: RunConfig keys and values, the
    method and strategy names and their parameter names (what the runner checks at start-up)."""
    where = f"{source}: cell {cell.name}"
    config = from_mapping(cell.config, where)
    from methods.base import METHODS
    from strategies.base import STRATEGIES

    try:
        method_cls = METHODS.get(config.method)
        method_cls.resolve_params(config.method_params)
        if config.backbone is not None and "backbone" not in method_cls.hyperparameters:
            raise ConfigError(f"backbone: method '{config.method}' takes no backbone")
        strategy_cls = STRATEGIES.get(config.strategy)
        unknown = sorted(set(config.strategy_params) - set(strategy_cls.hyperparameters))
        if unknown:
            known = ", ".join(sorted(strategy_cls.hyperparameters)) or "none"
            raise ConfigError(f"strategy_params: unknown key '{unknown[0]}' for strategy '{config.strategy}' (known: {known})")
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config


# --------------------------------------------------------------------------------------------
# one cell (runs in a worker)
# --------------------------------------------------------------------------------------------
def is_complete(run_dir: Path) -> bool:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def stale_key(cell: Cell) -> str | None:
    """The first key a finished cell's ``config.yaml`` disagrees with the spec on (None if none).

    Keys the runner resolves (``tasks`` given as a count or preset, ``backbone: null``) and keys
    that may change between a run and its resume are not compared; nested mappings are compared on
    the keys the spec sets (the saved ones carry defaults too)."""
    from clbench.runner import RESUME_FREE_KEYS

    path = cell.run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None

    def differs(have: Any, want: Any, prefix: str) -> str | None:
        for key, value in want.items():
            if not prefix and (key in RESUME_FREE_KEYS or key == "name"
                               or (key == "tasks" and (not isinstance(value, list) or want.get("task_order") == "shuffle"))
                               or (key == "backbone" and value is None)):
                continue
            old = have.get(key) if isinstance(have, dict) else None
            if isinstance(value, dict):
                found = differs(old or {}, value, f"{prefix}{key}.")
                if found:
                    return found
            elif old != value:
                return f"{prefix}{key}: was {old!r}, the spec says {value!r}"
        return None

    return differs(saved, cell.config, "")


def run_cell(cell: Cell) -> CellResult:
    """Run (or resume) one cell under its run folder's lock; never raises: a failure comes back as a
    result with one line, a folder another process holds as ``busy``. Its log (and a failure's
    traceback) goes to ``<sweep>/logs/<cell>.log``."""
    start = time.perf_counter()
    try:
        with run_lock(cell.run_dir):  # is_complete / resume are decided under the lock
            return _run_locked(cell, start)
    except FolderLocked:
        pid = holder_pid(cell.run_dir)
        return CellResult(cell.name, "busy", error=running_elsewhere(pid))
    except Exception as err:  # noqa: BLE001 - e.g. the runs folder cannot be created (full disk, permissions)
        return CellResult(cell.name, "failed", time.perf_counter() - start, one_line(err), getattr(err, "errno", None))


def _run_locked(cell: Cell, start: float) -> CellResult:
    if is_complete(cell.run_dir):
        return CellResult(cell.name, "skipped")
    resume = (cell.run_dir / "config.yaml").is_file()
    logger = logging.getLogger("clbench")
    level = logger.level
    handler: logging.Handler | None = None
    try:
        cell.log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(cell.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        _apply_threads()  # in a pool / Ray worker: its share of the cores
        from clbench.runner import run_experiment

        logger.info("cell %s: %s", cell.name, "resuming" if resume else "starting")
        run_experiment(from_mapping(cell.config, f"cell {cell.name}"), resume=resume, progress=False)
        return CellResult(cell.name, "resumed" if resume else "ran", time.perf_counter() - start)
    except FolderLocked:
        raise  # the runner's own lock: another process got there first
    except Exception as err:  # noqa: BLE001 - a failed cell must not stop the others
        logger.error("cell %s failed:\n%s", cell.name, traceback.format_exc())
        return CellResult(cell.name, "failed", time.perf_counter() - start, one_line(err), getattr(err, "errno", None))
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------------
CellFn = Callable[[Cell], CellResult]


class Executor(Protocol):
    """Runs ``fn`` on every cell; yields one CellResult per cell, in completion order. ``fn``
    itself never raises; a worker that dies comes back as a failed result for its cell."""

    def map(self, fn: CellFn, cells: Sequence[Cell]) -> Iterator[CellResult]: ...


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1) // 2)


THREADS_ENV = "CLBENCH_TORCH_THREADS"


def _set_threads(threads: int) -> None:
    """Worker start-up: thread count for torch (set when a cell starts, see ``_apply_threads``)
    and the BLAS/OpenMP libraries, so ``workers`` cells share the cores instead of oversubscribing."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", THREADS_ENV):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        _apply_threads()


WATCHDOG_SECONDS = 0.5  # how often a worker checks that its parent is alive (where prctl is missing)
PR_SET_PDEATHSIG = 1


def _worker_init(threads: int, parent_pid: int) -> None:
    """Pool-worker start-up: die with the sweep process, then take its share of the cores."""
    _die_with_parent(parent_pid)
    _set_threads(threads)


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when ``parent_pid`` dies, even by SIGKILL, so a killed sweep leaves no
    orphan writing its cell (the cell resumes from its checkpoint on the next run).

    Linux: the kernel sends SIGTERM on the parent's death (``PR_SET_PDEATHSIG``). Everywhere: a
    daemon thread polls ``os.getppid()`` (an orphan is re-parented) as a fallback."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no libc / no prctl: the watchdog still works
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        _terminate_self()
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="clbench-parent-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_SECONDS)
    _terminate_self()


def _terminate_self() -> None:
    """SIGTERM ourselves (what PR_SET_PDEATHSIG sends); exit hard if a handler swallowed it."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)


def _apply_threads() -> None:
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))


class SerialExecutor:
    """In this process, one cell after another (debuggable; the tests use it)."""

    workers = 1
    threads = None

    def map(self, fn: CellFn, cells: Sequence[Cell]) -> Iterator[CellResult]:
        for cell in cells:
            try:
                yield fn(cell)
            except Exception as err:  # noqa: BLE001
                yield CellResult(cell.name, "failed", error=one_line(err))

    def describe(self) -> str:
        return "serial (in this process)"


class LocalExecutor:
    """A process pool on this machine: ``workers`` cells at a time, each in a fresh spawned process
    (clean peak-RSS per cell, safe with torch) with ``cores // workers`` torch threads."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        self.threads = max(1, available_cores() // self.workers)

    def describe(self) -> str:
        return f"local process pool, {self.workers} worker(s) x {self.threads} thread(s)"

    def _pool(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        kwargs: dict[str, Any] = {}
        if sys.version_info >= (3, 11):
            kwargs["max_tasks_per_child"] = 1
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(self.threads, os.getpid()), **kwargs)

    def map(self, fn: CellFn, cells: Sequence[Cell]) -> Iterator[CellResult]:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        broken: list[Cell] = []
        returned = False  # whether any worker has come back with a result
        with self._pool(self.workers) as pool:
            futures = {pool.submit(fn, cell): cell for cell in cells}
            try:
                for future in as_completed(futures):
                    cell = futures[future]
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken.append(cell)
                        continue
                    except Exception as err:  # noqa: BLE001
                        yield CellResult(cell.name, "failed", error=one_line(err))
                        continue
                    returned = True
                    yield result
            except BaseException:  # Ctrl-C, or the caller stopped early: start nothing more
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        if broken:
            # A worker died (killed, e.g. out of memory) and took the pool with it: every unfinished
            # cell got BrokenProcessPool. Re-run those one at a time, each in its own pool, so
            # only the cell that dies fails (the others resume from their checkpoints).
            # If no worker ever returned and two isolated retries die too, workers die at start-up
            # (e.g. a main module without ``if __name__ == "__main__":``): fail the rest at once.
            log.warning("a worker process died; re-running %d unfinished cell(s) one at a time", len(broken))
            deaths = 0
            for cell in broken:
                if deaths >= 2 and not returned:
                    yield CellResult(cell.name, "failed", error="not run: worker processes die at start-up (see the error above)")
                    continue
                with self._pool(1) as pool:
                    try:
                        result = pool.submit(fn, cell).result()
                    except BrokenProcessPool:
                        deaths += 1
                        yield CellResult(cell.name, "failed", error="worker process died before returning "
                                         "(killed, e.g. out of memory, or crashed at start-up: see stderr)")
                        continue
                    except Exception as err:  # noqa: BLE001
                        yield CellResult(cell.name, "failed", error=one_line(err))
                        continue
                    returned = True
                    yield result


def _ray_entry(fn: CellFn, cell: Cell, threads: int) -> CellResult:
    _set_threads(threads)
    return fn(cell)


class RayExecutor:
    """Ray tasks: ``ray.init(address)`` (an existing cluster: "auto", "ray://host:10001") or a
    local instance; ``workers`` cells at a time, each with ``cluster CPUs // workers`` CPUs and a
    fresh worker process. Paths in the configs must exist on the nodes (shared file system)."""

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("executor 'ray': Ray is not installed (pip install 'clbench[ray]')") from None
        self.workers = workers
        self.address = address
        self.threads: int | None = None
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")

    def describe(self) -> str:
        where = self.address or "a local instance"
        return f"ray on {where}, {self.workers or 'default'} worker(s)"

    def map(self, fn: CellFn, cells: Sequence[Cell]) -> Iterator[CellResult]:
        import ray

        started = False
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address)
            else:
                ray.init(num_cpus=available_cores(), include_dashboard=False)
            started = True
        try:
            total = max(1, int(ray.cluster_resources().get("CPU", 1)))
            workers = self.workers or max(1, total // 2)
            self.threads = max(1, total // workers)
            remote = ray.remote(num_cpus=self.threads, max_calls=1, max_retries=1)(_ray_entry)
            refs = {remote.remote(fn, cell, self.threads): cell for cell in cells}
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    cell = refs.pop(ref)
                    try:
                        yield ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...
                        yield CellResult(cell.name, "failed", error=one_line(err))
        finally:
            if started:
                ray.shutdown()


def make_executor(name: str, workers: int | None = None, ray_address: str | None = None) -> Executor:
    if name == "serial":
        return SerialExecutor()
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, ray_address)
    raise ConfigError(f"--executor: unknown executor '{name}' (use one of: {', '.join(EXECUTORS)})")


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    sweep_dir: Path
    cells: list[Cell]
    results: dict[str, CellResult] = field(default_factory=dict)

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results.values() if r.failed]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results.values())


def _write_sweep_file(spec: SweepSpec, cells: list[Cell], sweep_dir: Path) -> None:
    data = {
        "name": spec.name,
        "format": SWEEP_FORMAT,
        "clbench_version": _clbench_version(),
        "output_dir": str(sweep_dir.parent),
        "spec_file": spec.source,
        "base": spec.base,
        **({"per_method": spec.per_method} if spec.per_method else {}),
        "grid": spec.grids[0] if len(spec.grids) == 1 else spec.grids,
        "cells": [
            {"name": c.name, "run_dir": f"{RUNS}/{c.name}", "params": c.params,
             "config": from_mapping(c.config).to_dict()}
            for c in cells
        ],
    }
    atomic.write_yaml(sweep_dir / SWEEP_FILE, data)


def _clbench_version() -> str:
    from clbench import __version__

    return __version__


def _write_status(sweep_dir: Path, cells: list[Cell], results: Mapping[str, CellResult]) -> None:
    status = {}
    for cell in cells:
        result = results.get(cell.name)
        if result is None:
            status[cell.name] = {"status": "pending"}
        else:
            state = "complete" if result.complete else ("running elsewhere" if result.busy else result.status)
            status[cell.name] = {"status": state, "last": result.status, "seconds": round(result.seconds, 2),
                                 "error": result.error}
    atomic.write_json(sweep_dir / STATUS_FILE, {"updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "cells": status})


def _dataset_key(config: RunConfig) -> tuple:
    """What decides what ``ensure_dataset`` generates and checks at a root: cells that differ in
    any of it (e.g. 2 and 4 tasks on one synthetic root) each need their own preparation."""
    return (os.path.abspath(config.data_root), config.synthetic, repr(config.tasks), config.synthetic_categories)


def _prepare_datasets(cells: Sequence[Cell]) -> None:
    """Generate missing synthetic data here, before workers start: each worker would otherwise
    generate (in parallel, into one folder) the categories its own task spec needs.

    The first cell on a root checks the root: its error stops the sweep before the sweep folder
    exists. A later cell's task spec that does not resolve there is that cell's own failure (it
    fails with the same line when it runs; nothing was generated for it), not the sweep's."""
    from clbench.data import DatasetError
    from clbench.runner import ensure_dataset

    seen: set[tuple] = set()
    roots: set[str] = set()
    for cell in cells:
        config = from_mapping(cell.config)
        key = _dataset_key(config)
        if key in seen:
            continue
        seen.add(key)
        first_on_root = key[0] not in roots
        roots.add(key[0])
        try:
            ensure_dataset(config)
        except ValueError as err:
            if first_on_root or isinstance(err, DatasetError):
                raise


def run_sweep(
    spec: SweepSpec | str | Path,
    executor: str | Executor = "local",
    *,
    workers: int | None = None,
    output_dir: str | None = None,
    ray_address: str | None = None,
    dry_run: bool = False,
    cell_fn: CellFn = run_cell,
    echo: Callable[[str], None] = print,
    cells: Sequence[Cell] | None = None,
    max_cells: int | None = MAX_CELLS,
) -> SweepOutcome:
    """Validate every cell, write ``sweep.yaml``, skip finished cells, run/resume the rest.

    ``cells``: the spec's cells already expanded (and possibly adjusted, as ``clbench reproduce``
    does); they are validated again here. ``max_cells``: refuse a larger sweep (None: no limit)."""
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec, output_dir)
    elif output_dir is not None:
        spec = dataclasses.replace(spec, output_dir=output_dir)
    if cells is None:
        cells = expand(spec, max_cells=max_cells)  # raises ConfigError (naming key and cell) before anything runs
    else:
        cells = list(cells)
        if max_cells is not None and len(cells) > max_cells:
            raise ConfigError(f"{spec.source}: {len(cells)} cells, more than the limit of {max_cells}; "
                              f"pass --max-cells {len(cells)} to run them all")
        for cell in cells:
            validate_cell(cell, spec.source)
    runner = make_executor(executor, workers, ray_address) if isinstance(executor, str) else executor
    sweep_dir = Path(cells[0].sweep_dir)
    if not _is_sweep_folder(sweep_dir):  # checked before the dry run too: it would refuse to run
        what = "is a file" if not sweep_dir.is_dir() else "exists and is not a clbench sweep folder (no sweep.yaml)"
        raise ConfigError(f"{sweep_dir}: {what}; choose another 'name' or --output")
    outcome = SweepOutcome(sweep_dir, cells)
    todo = _plan(cells, outcome)
    resume = sum((c.run_dir / "config.yaml").is_file() for c in todo)
    busy = outcome.count("busy")
    describe = getattr(runner, "describe", lambda: type(runner).__name__)()
    echo(f"sweep {spec.name}: {len(cells)} cells in {sweep_dir} - {outcome.count('skipped')} finished, "
         f"{resume} to resume, {len(todo) - resume} to run" + (f", {busy} running elsewhere" if busy else "")
         + f"; {describe}")
    if dry_run:
        for cell in cells:
            result = outcome.results.get(cell.name)
            state = result.status if result else ("resume" if (cell.run_dir / "config.yaml").is_file() else "run")
            echo(f"  {state:8s} {cell.name}" + (f": {result.error}" if result and result.busy else ""))
        return outcome

    if todo:
        _prepare_datasets(todo)  # a missing data root is one line before the sweep folder is created
    _open_sweep_dir(spec, cells, sweep_dir)
    for result in outcome.results.values():
        if result.failed:
            echo(f"FAILED   {result.name}: {result.error}")
        elif result.busy:
            echo(f"SKIPPED  {result.name}: {result.error}")
    status = _StatusWriter(sweep_dir, cells, echo)
    status.write(outcome.results)
    _run_cells(runner, cell_fn, todo, outcome, status, echo)
    done = sum(r.complete for r in outcome.results.values())
    busy = outcome.count("busy")
    echo(f"sweep {spec.name}: {done} of {len(cells)} cells complete, {len(outcome.failed)} failed"
         + (f", {busy} running elsewhere (skipped)" if busy else "")
         + (f", {len(cells) - len(outcome.results)} not started" if len(outcome.results) < len(cells) else "")
         + (f" -> clbench report {sweep_dir}" if done else ""))
    return outcome


def _plan(cells: Sequence[Cell], outcome: SweepOutcome) -> list[Cell]:
    """The cells to run; finished ones are recorded as skipped (or failed: no longer the spec's),
    ones locked by another live process as busy."""
    todo: list[Cell] = []
    for cell in cells:
        if is_complete(cell.run_dir):
            stale = stale_key(cell)
            if stale:
                outcome.results[cell.name] = CellResult(
                    cell.name, "failed",
                    error=f"finished run {cell.run_dir} no longer matches the spec ({stale}); "
                          "delete that folder to run it again, or give the sweep a new name")
            else:
                outcome.results[cell.name] = CellResult(cell.name, "skipped")
            continue
        pid = locked_by(cell.run_dir)
        if pid is not None:
            outcome.results[cell.name] = CellResult(cell.name, "busy", error=running_elsewhere(pid if pid > 0 else None))
        else:
            todo.append(cell)
    return todo


def _is_sweep_folder(sweep_dir: Path) -> bool:
    """Whether clbench may write ``sweep_dir``: missing, or holding only what a sweep writes, with
    any ``sweep.yaml`` one of clbench's (never overwrite a user's file or fill a user's folder)."""
    if not sweep_dir.exists():
        return True
    if not sweep_dir.is_dir():
        return False
    try:
        names = {p.name for p in sweep_dir.iterdir()}
    except OSError:  # unreadable: writing sweep.yaml will fail with one line naming why
        return True
    if SWEEP_FILE not in names:
        return all(n in SWEEP_ENTRIES or (n.startswith(".") and n.endswith(".tmp")) for n in names)
    try:
        saved = yaml.safe_load((sweep_dir / SWEEP_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("cells"), list)


def _open_sweep_dir(spec: SweepSpec, cells: list[Cell], sweep_dir: Path) -> None:
    """Create the sweep folder and write ``sweep.yaml``; one line if it cannot be written
    (permissions, full disk, a file where a folder should be)."""
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_sweep_file(spec, cells, sweep_dir)
    except OSError as err:
        raise ConfigError(f"{sweep_dir}: cannot write the sweep folder ({err.strerror or err})") from None


class _StatusWriter:
    """Writes ``status.json`` after every cell; a failed write (full disk) is said once and does not
    stop the sweep: the run folders are the record, status.json only a summary of them."""

    def __init__(self, sweep_dir: Path, cells: list[Cell], echo: Callable[[str], None]) -> None:
        self.sweep_dir, self.cells, self.echo = sweep_dir, cells, echo
        self.warned = False

    def write(self, results: Mapping[str, CellResult]) -> None:
        try:
            _write_status(self.sweep_dir, self.cells, results)
        except OSError as err:
            if not self.warned:
                self.echo(f"warning: cannot write {self.sweep_dir / STATUS_FILE} ({err.strerror or err}); "
                          "the cells' run folders still record their state")
                self.warned = True


def _disk_full(result: CellResult) -> bool:
    text = result.error or ""
    return result.errno in DISK_FULL or "No space left on device" in text or "Disk quota exceeded" in text


def _run_cells(runner: Executor, cell_fn: CellFn, todo: list[Cell], outcome: SweepOutcome, status: _StatusWriter,
               echo: Callable[[str], None]) -> None:
    """Run ``todo``, recording and printing each result; a full disk stops starting new cells."""
    if not todo:
        return
    results = runner.map(cell_fn, todo)
    try:
        for k, result in enumerate(results, start=1):
            outcome.results[result.name] = result
            status.write(outcome.results)
            if result.failed:
                echo(f"[{k}/{len(todo)}] FAILED  {result.name}: {result.error}  (log: {outcome.sweep_dir / LOGS / (result.name + '.log')})")
            elif result.busy:
                echo(f"[{k}/{len(todo)}] SKIPPED {result.name}: {result.error}")
            else:
                echo(f"[{k}/{len(todo)}] {result.status:7s} {result.name} ({result.seconds:.1f} s)")
            if _disk_full(result):
                echo("stopping: the disk is full; no more cells are started (free space, then re-run the sweep: "
                     "finished cells are kept, killed ones resume)")
                break
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # a pool stops starting cells and waits for the running ones


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
SWEEP_EXAMPLES = textwrap.dedent(
    """\
    examples:
      clbench sweep configs/sweep_example.yaml                     # process pool, cpu_count/2 workers
      clbench sweep configs/sweep_example.yaml --workers 4 --output /scratch/sweeps
      clbench sweep configs/sweep_example.yaml --dry-run           # validate, list cells and their state
      clbench sweep configs/sweep_example.yaml --executor ray --ray-address auto   # an existing Ray cluster
      clbench report results/sweeps/replay-sweep                   # tables and plots over the cells

    Re-running a sweep runs only the cells that are missing or unfinished (killed cells resume
    from their checkpoint). A cell whose run folder another clbench process holds (a second
    sweep, a run with the same folder) is skipped as "running elsewhere". A spec of more than
    --max-cells cells is refused before anything is built. Exit status 1 if any cell failed.
    """
)


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of experiments (methods x replay sizes x seeds ...)",
        description="Run every cell of a sweep spec (base config + grid) as a run folder under "
                    "<output_dir>/<name>/runs/, skipping finished cells and resuming killed ones.",
        epilog=SWEEP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", type=Path, help="sweep YAML: name, output_dir, base, grid")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: process pool (default); serial: in this process; ray: Ray tasks")
    p.add_argument("--workers", type=int, help=f"cells at a time (default: cpu_count // 2 = {default_workers()})")
    p.add_argument("--output", dest="output_dir", help="overrides the spec's output_dir")
    p.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: start a local instance)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    p.add_argument("--max-cells", type=int, default=MAX_CELLS,
                   help=f"refuse a spec that expands to more cells than this (default: {MAX_CELLS})")
    p.set_defaults(func=cmd_sweep)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    outcome = run_sweep(args.spec, args.executor, workers=args.workers, output_dir=args.output_dir,
                        ray_address=args.ray_address, dry_run=args.dry_run, max_cells=args.max_cells)
    return 1 if outcome.failed else 0

