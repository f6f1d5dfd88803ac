"""Running a sweep: one cell under its run folder's lock (in a worker; never raises), and the sweep
itself: finished cells skipped, cells locked elsewhere noted, missing synthetic data generated
before workers start, ``sweep.yaml`` and ``status.json`` written, the rest run or resumed."""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from clbench.engine import atomic
from clbench.engine.config import ConfigError, RunConfig, from_mapping
from clbench.engine.locks import FolderLocked, holder_pid, locked_by, run_lock
from clbench.engine.rundir import RunFolder
from clbench.sweep.executors import CellFn, Executor, _apply_threads, make_executor
from clbench.sweep.progress import Progress
from clbench.sweep.spec import (
    LOGS, MAX_CELLS, RUNS, STATUS_FILE, SWEEP_ENTRIES, SWEEP_FILE, SWEEP_FORMAT, Cell, CellResult, SweepSpec,
    expand, load_spec, one_line, running_elsewhere, validate_cell,
)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# --------------------------------------------------------------------------------------------
# one cell (runs in a worker)
# --------------------------------------------------------------------------------------------
def is_complete(run_dir: Path) -> bool:
    """A finished cell (``RunFolder.is_complete``: its summary says complete)."""
    return RunFolder(run_dir).is_complete()


def stale_key(cell: Cell) -> str | None:
    """The first key a finished cell's ``config.yaml`` disagrees with the spec on (None if none).

    Keys the runner resolves (``tasks`` given as a count or preset, ``backbone: null``) and keys
    that may change between a run and its resume are not compared; nested mappings are compared on
    the keys the spec sets (the saved ones carry defaults too)."""
    from clbench.engine.runner import RESUME_FREE_KEYS

    folder = RunFolder(cell.run_dir)
    problems: list[str] = []
    saved = folder.config(on_error=problems.append)
    if problems or not folder.config_path.is_file():  # unreadable or gone: nothing to compare
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
    resume = RunFolder(cell.run_dir).is_started()
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
        from clbench.engine.runner import run_experiment

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
            if getattr(result, "attempts", 1) > 1:  # Ray retried it (its worker or node died)
                status[cell.name]["attempts"] = result.attempts
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
    from clbench.data.root import ensure_dataset

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
    check = getattr(runner, "check", None)  # the executor's own rules on the cells (Ray: GPUs per cell)
    if check is not None:
        check(cells)
    sweep_dir = Path(cells[0].sweep_dir)
    if not _is_sweep_folder(sweep_dir):  # checked before the dry run too: it would refuse to run
        what = "is a file" if not sweep_dir.is_dir() else "exists and is not a clbench sweep folder (no sweep.yaml)"
        raise ConfigError(f"{sweep_dir}: {what}; choose another 'name' or --output")
    outcome = SweepOutcome(sweep_dir, cells)
    todo = _plan(cells, outcome)
    resume = sum(RunFolder(c.run_dir).is_started() for c in todo)
    busy = outcome.count("busy")
    describe = getattr(runner, "describe", lambda: type(runner).__name__)()
    echo(f"sweep {spec.name}: {len(cells)} cells in {sweep_dir} - {outcome.count('skipped')} finished, "
         f"{resume} to resume, {len(todo) - resume} to run" + (f", {busy} running elsewhere" if busy else "")
         + f"; {describe}")
    if dry_run:
        for cell in cells:
            result = outcome.results.get(cell.name)
            state = result.status if result else ("resume" if RunFolder(cell.run_dir).is_started() else "run")
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
    run_dirs = {cell.name: cell.run_dir for cell in todo}
    # every executor (serial, pool, Ray) yields here as cells finish: one printing path for all;
    # Ray knows its cells at a time only once it has seen the cluster (``cells_at_a_time``)
    progress = Progress(len(todo), lambda: getattr(runner, "cells_at_a_time", None) or getattr(runner, "workers", None) or 1,
                        echo, bar=Progress.wants_bar(echo))
    results = runner.map(cell_fn, todo)
    try:
        for k, result in enumerate(results, start=1):
            outcome.results[result.name] = result
            status.write(outcome.results)
            attempts = getattr(result, "attempts", 1)  # Ray retries a cell whose worker or node died
            tries = f", attempt {attempts}" if attempts > 1 else ""
            if result.failed:
                line = f"[{k}/{len(todo)}] FAILED  {result.name}: {result.error}  (log: {outcome.sweep_dir / LOGS / (result.name + '.log')}{tries})"
            elif result.busy:
                line = f"[{k}/{len(todo)}] SKIPPED {result.name}: {result.error}"
            else:
                line = f"[{k}/{len(todo)}] {result.status:7s} {result.name} ({result.seconds:.1f} s{tries})"
            progress.finished(result, line, run_dirs.get(result.name))
            if _disk_full(result):
                echo("stopping: the disk is full; no more cells are started (free space, then re-run the sweep: "
                     "finished cells are kept, killed ones resume)")
                break
    finally:
        progress.close()
        close = getattr(results, "close", None)
        if close is not None:
            close()  # a pool stops starting cells and waits for the running ones
