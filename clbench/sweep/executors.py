"""Executors behind one seam, ``Executor.map(fn, cells) -> iterator of CellResult`` (in completion
order): ``serial`` (in this process), ``local`` (a process pool, one fresh process per cell) and
``ray`` (Ray tasks). Pool workers die with the sweep process (``PR_SET_PDEATHSIG`` on Linux, a
watchdog thread elsewhere) and take their share of the cores."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

from clbench.engine.config import ConfigError
from clbench.sweep.spec import Cell, CellResult, one_line


log = logging.getLogger("clbench.sweep")

EXECUTORS = ("local", "serial", "ray")


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


@dataclass
class RayCellResult(CellResult):
    """A cell's result under Ray, with how many times it was started and where it last ran."""

    attempts: int = 1
    node: str | None = None  # "hostname (node id prefix)"


SHARED_STORAGE = "the output directory must be on storage shared by all nodes"
DEFAULT_RETRIES = 2


def check_gpu_request(cells: Sequence[Cell], gpus_per_cell: float) -> None:
    """The GPU rule of a Ray sweep (one line naming the cell or the flag if broken): a cell gets
    exactly ``gpus_per_cell`` GPUs from Ray. ``device: cpu`` cannot use them; ``device: cuda``
    without them would share GPUs Ray does not know are in use. ``auto`` follows the request
    (GPU if ``gpus_per_cell > 0``, else CPU: the worker sees no GPU)."""
    gpus_per_cell = float(gpus_per_cell)
    if not (math.isfinite(gpus_per_cell) and gpus_per_cell >= 0) or (gpus_per_cell > 1 and not gpus_per_cell.is_integer()):
        raise ConfigError(f"--gpus-per-cell: {gpus_per_cell:g} is not a GPU count per cell "
                          "(0, a fraction below 1, or a whole number)")
    for cell in cells:
        device = str(cell.config.get("device", "auto"))
        if gpus_per_cell > 0 and device == "cpu":
            raise ConfigError(f"--gpus-per-cell {gpus_per_cell:g}: cell {cell.name} has device 'cpu'; "
                              "set device to cuda or auto, or drop --gpus-per-cell")
        if gpus_per_cell == 0 and device.startswith("cuda"):
            raise ConfigError(f"cell {cell.name} has device '{device}' but requests no GPU from Ray; "
                              "pass --gpus-per-cell (e.g. 1)")


def _retryable(err: BaseException) -> bool:
    """A system failure (the worker or its node died, its result was lost): the cell itself did
    not fail, so it is run again and resumes. A cell's own exception (``RayTaskError``) is not."""
    import ray.exceptions as rex

    kinds = tuple(getattr(rex, name) for name in ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
                                                 "ObjectLostError", "OutOfMemoryError", "RaySystemError")
                  if hasattr(rex, name))
    return isinstance(err, kinds) and not isinstance(err, rex.RayTaskError)


def _ray_entry(fn: CellFn, cell: Cell, threads: int, gpus: float) -> tuple[CellResult, str]:
    """One attempt of a cell in a fresh Ray worker: returns its result and the node it ran on."""
    import socket

    import ray

    where = f"{socket.gethostname()} ({ray.get_runtime_context().get_node_id()[:8]})"
    if not os.path.isdir(cell.sweep_dir):  # the driver created it: this node does not see the driver's storage
        return CellResult(cell.name, "failed", error=f"cell {cell.name} on node {where}: the sweep folder "
                          f"{cell.sweep_dir} does not exist there; {SHARED_STORAGE}"), where
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Ray leaves all GPUs visible to a task that asked for none
    _set_threads(threads)
    return fn(cell), where


class RayExecutor:
    """Ray tasks, on a local instance or a cluster (``address``: "auto", "ray://host:10001").

    Output: **shared storage is required**. Every cell writes its run folder under the sweep folder
    itself, as under the other executors, so the checkpoint that a retry resumes from, the run
    folder's lock and the logs are where any node (and the driver) finds them. Shipping results
    back to the driver would lose exactly that: a cell killed with its node would restart on
    another one from scratch, and checkpoints (up to GBs) would travel through the object store.
    The failure mode is detected: a node that does not see the sweep folder fails its cell at once,
    and after each finished cell the driver checks that its run folder is complete on its own file
    system, else the cell fails with one line ("finished on node Y but its results are not
    visible at PATH: the output directory must be on storage shared by all nodes").

    Scheduling: ``workers`` cells at a time (default: cluster CPUs // 2), each a fresh worker
    process (``max_calls=1``) with ``cluster CPUs // workers`` CPUs, capped at the largest node's,
    and ``gpus_per_cell`` GPUs (``check_gpu_request`` states the rule).

    Retries: a cell whose worker or node dies (a system error, ``_retryable``) is submitted again
    by the driver, up to ``retries`` times, and resumes from its last checkpoint (``run_cell``
    resumes a started run folder; a step is never recorded twice). A cell that fails by itself
    (bad config, an exception) is not retried: it would fail the same way. The driver counts
    the attempts (``RayCellResult.attempts``) for the progress line.

    On a shared file system whose locks outlive a dead node for a while (NFS leases), a retry may
    find its folder still locked and come back as "running elsewhere"; re-run the sweep later."""

    def __init__(self, workers: int | None = None, address: str | None = None, *, gpus_per_cell: float = 0.0,
                 retries: int = DEFAULT_RETRIES) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("executor 'ray': Ray is not installed (pip install 'clbench[ray]')") from None
        self.workers = workers
        self.address = address
        self.threads: int | None = None
        self.cells_at_a_time: int | None = None  # set by ``_plan`` once the cluster is seen
        self.gpus_per_cell = float(gpus_per_cell)
        self.retries = retries
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if retries < 0:
            raise ConfigError(f"--retries must be 0 or more, got {retries}")
        check_gpu_request([], self.gpus_per_cell)

    def describe(self) -> str:
        import ray

        where = self.address or ("the Ray instance already connected" if ray.is_initialized() else "a local instance")
        gpus = f", {self.gpus_per_cell:g} GPU(s) per cell" if self.gpus_per_cell else ""
        return f"ray on {where}, {self.workers or 'default'} worker(s){gpus}, up to {self.retries} retries per cell"

    def check(self, cells: Sequence[Cell]) -> None:
        """Before anything runs (also for a dry run): the cells' devices against ``gpus_per_cell``."""
        check_gpu_request(cells, self.gpus_per_cell)

    def map(self, fn: CellFn, cells: Sequence[Cell]) -> Iterator[CellResult]:
        import ray

        self.check(cells)
        started = False
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address)
            else:
                ray.init(num_cpus=available_cores(), include_dashboard=False)
            started = True
        try:
            yield from self._run(ray, fn, cells)
        finally:
            if started:
                ray.shutdown()

    def _plan(self, ray) -> int:
        """Cells at a time; sets ``threads`` (CPUs per cell, fitting on one node)."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total = max(1, int(sum(n.get("CPU", 0) for n in nodes)))
        largest = max([int(n.get("CPU", 0)) for n in nodes] + [1])
        workers = self.workers or max(1, total // 2)
        self.cells_at_a_time = workers  # the sweep's ETA divides by it (``clbench.sweep.progress``)
        self.threads = max(1, min(total // workers, largest))
        gpus = max([n.get("GPU", 0) for n in nodes] + [0])
        if self.gpus_per_cell > gpus:
            log.warning("warning: --gpus-per-cell %g but no node of the cluster has that many GPUs (largest: %g); "
                        "cells wait until one joins", self.gpus_per_cell, gpus)
        elif self.gpus_per_cell == 0 and gpus:
            log.warning("warning: the cluster has GPUs but cells request none (--gpus-per-cell 0): "
                        "they run on CPU")
        return workers

    def _run(self, ray, fn: CellFn, cells: Sequence[Cell]) -> Iterator[CellResult]:
        from collections import deque

        workers = self._plan(ray)
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus_per_cell, max_calls=1,
                            max_retries=0)(_ray_entry)  # retried here, by the driver, which counts attempts
        queue = deque(cells)
        attempts: dict[str, int] = {}
        running: dict[Any, Cell] = {}
        while queue or running:
            while queue and len(running) < workers:
                cell = queue.popleft()
                attempts[cell.name] = attempts.get(cell.name, 0) + 1
                running[remote.remote(fn, cell, self.threads, self.gpus_per_cell)] = cell
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                cell = running.pop(ref)
                n = attempts[cell.name]
                try:
                    result, where = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - WorkerCrashedError, NodeDiedError, RayTaskError ...
                    if _retryable(err) and n <= self.retries:
                        log.warning("cell %s: attempt %d of %d lost (%s); retrying, it resumes from its checkpoint",
                                    cell.name, n, self.retries + 1, one_line(err))
                        queue.appendleft(cell)
                        continue
                    yield RayCellResult(cell.name, "failed", error=one_line(err), attempts=n)
                    continue
                yield _checked(result, cell, where, n)


def _checked(result: CellResult, cell: Cell, where: str, attempts: int) -> RayCellResult:
    """The cell's result as the driver sees it: a finished cell whose run folder is not complete
    on the driver's file system failed (its node wrote somewhere the driver cannot see)."""
    from clbench.engine.rundir import RunFolder

    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(CellResult)}
    checked = RayCellResult(**fields, attempts=attempts, node=where)
    if result.complete and not RunFolder(cell.run_dir).is_complete():
        checked.status = "failed"
        checked.error = (f"cell {cell.name} finished on node {where} but its results are not visible at "
                         f"{cell.run_dir}: {SHARED_STORAGE}")
    return checked


def make_executor(name: str, workers: int | None = None, ray_address: str | None = None, *,
                  gpus_per_cell: float = 0.0, retries: int | None = None) -> Executor:
    """The executor ``name``; ``gpus_per_cell`` and ``retries`` are Ray's (refused elsewhere)."""
    if name != "ray" and (gpus_per_cell or retries is not None):
        flag = "--gpus-per-cell" if gpus_per_cell else "--retries"
        raise ConfigError(f"{flag} applies to --executor ray only (this sweep uses '{name}')")
    if name == "serial":
        return SerialExecutor()
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, ray_address, gpus_per_cell=gpus_per_cell,
                           retries=DEFAULT_RETRIES if retries is None else retries)
    raise ConfigError(f"--executor: unknown executor '{name}' (use one of: {', '.join(EXECUTORS)})")
