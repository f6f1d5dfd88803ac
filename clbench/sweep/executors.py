"""Executors behind one seam, ``Executor.map(fn, cells) -> iterator of CellResult`` (in completion
order): ``serial`` (in this process), ``local`` (a process pool, one fresh process per cell) and
``ray`` (Ray tasks). Pool workers die with the sweep process (``PR_SET_PDEATHSIG`` on Linux, a
watchdog thread elsewhere) and take their share of the cores."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
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
