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
always wins), run by ``clbench.engine.runner.run_experiment`` into ``<sweep_dir>/runs/<cell>/``, so config
validation, atomic results and checkpoints come from the runner. ``<sweep_dir>/sweep.yaml`` holds the resolved spec and
the cells; ``status.json`` the last outcome of each cell; ``logs/<cell>.log`` each cell's log.

Re-running a sweep skips finished cells (``summary.json`` with ``complete: true``) and resumes cells
that were started and killed. Every cell's config is validated before anything runs. A failing
cell is reported with its one-line error and does not stop the others; a full disk stops the sweep
from starting more cells (each would fail the same way). A cell whose run folder is locked by
another live process (``clbench.engine.locks``: a second sweep, an orphan of a killed one) is reported as
running elsewhere and skipped, never started twice. A spec that expands to more than ``MAX_CELLS``
cells is refused unless ``--max-cells`` allows it (counted before any cell is built).

Executors sit behind one seam, ``Executor.map(fn, cells) -> iterator of CellResult`` (in
completion order): ``serial`` (in this process), ``local`` (a process pool, one fresh process per
cell) and ``ray`` (Ray tasks, local or on a cluster). Pool workers die with the sweep process
(``PR_SET_PDEATHSIG`` on Linux, a watchdog thread elsewhere): a killed sweep leaves no orphan
running a cell, and the cell resumes on the next run.

Modules: ``spec`` (the spec and its cells), ``executors``, ``run`` (one cell, and the sweep) and
``cli`` (``clbench sweep``).
"""
from __future__ import annotations

from clbench.sweep.cli import add_sweep_parser, cmd_sweep
from clbench.sweep.executors import (
    EXECUTORS, Executor, LocalExecutor, RayExecutor, SerialExecutor, available_cores, default_workers, make_executor,
)
from clbench.sweep.run import SweepOutcome, is_complete, run_cell, run_sweep, stale_key
from clbench.sweep.spec import (
    MAX_CELLS, SWEEP_FORMAT, Cell, CellResult, SweepSpec, expand, load_spec, set_dotted, spec_from_mapping, validate_cell,
)

__all__ = ["EXECUTORS", "MAX_CELLS", "SWEEP_FORMAT", "Cell", "CellResult", "Executor", "LocalExecutor", "RayExecutor",
           "SerialExecutor", "SweepOutcome", "SweepSpec", "add_sweep_parser", "available_cores", "cmd_sweep",
           "default_workers", "expand", "is_complete", "load_spec", "make_executor", "run_cell", "run_sweep",
           "set_dotted", "spec_from_mapping", "stale_key", "validate_cell"]
