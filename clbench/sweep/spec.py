"""A sweep's spec and cells: the YAML read and checked, the grid expanded into named cells (base, then
per-method settings, then grid values), each cell's run config validated before anything runs."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from clbench.engine.config import ConfigError, RunConfig


SPEC_KEYS = ("name", "output_dir", "base", "grid", "per_method")
DEFAULT_OUTPUT = "results/sweeps"
RUNS = "runs"
LOGS = "logs"
SWEEP_FILE = "sweep.yaml"
STATUS_FILE = "status.json"
SWEEP_ENTRIES = (RUNS, LOGS, SWEEP_FILE, STATUS_FILE, "report")  # what a sweep folder holds
SET_BY_SWEEP = ("name", "output_dir")  # RunConfig keys the sweep sets per cell
# Grid keys whose value alone reads well in a cell name ("shuffle", "wide_resnet50_2").
VALUE_ONLY = ("task_order", "backbone")
_RUN_DEFAULTS = RunConfig().to_dict()
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 120
MAX_CELLS = 1000  # a larger spec is most likely a mistake (a list where a value was meant): --max-cells
SWEEP_FORMAT = 1  # layout of sweep.yaml / run folders this clbench writes (read back by the report)


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
            # a sweep's plots are the report's; a cell's own are drawn on demand (clbench plot), unless the spec asks
            config.setdefault("plots", False)
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
    """Everything about a cell that can be checked without data (``clbench.engine.validation``, what
    the runner checks at start-up): RunConfig keys and values, the method and strategy and every one
    of their parameters' names and values."""
    from clbench.engine.validation import validate_run

    where = f"{source}: cell {cell.name}"
    return validate_run(cell.config, where, where).config
