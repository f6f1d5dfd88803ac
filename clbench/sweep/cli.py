"""``clbench sweep SPEC``: the command line of a sweep."""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from clbench.sweep.executors import DEFAULT_RETRIES, EXECUTORS, default_workers, make_executor
from clbench.sweep.run import run_sweep
from clbench.sweep.spec import MAX_CELLS


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
      clbench sweep configs/sweep_example.yaml --executor ray --ray-address auto --gpus-per-cell 1 --retries 3
      clbench report results/sweeps/replay-sweep                   # tables and plots over the cells

    Re-running a sweep runs only the cells that are missing or unfinished (killed cells resume
    from their checkpoint). A cell whose run folder another clbench process holds (a second
    sweep, a run with the same folder) is skipped as "running elsewhere". A spec of more than
    --max-cells cells is refused before anything is built. Exit status 1 if any cell failed.

    On a Ray cluster the output directory must be on storage shared by all nodes (a cell whose
    results the driver cannot see fails with one line); a cell whose worker or node dies is
    retried (--retries) and resumes from its checkpoint.
    """
)


def _gpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GPUs") from None
    if not value >= 0 or value == float("inf") or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r}: use 0, a fraction below 1, or a whole number of GPUs")
    return value


def _retries(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use 0 or more")
    return value


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how cells run: one set of flags for ``clbench sweep`` and ``clbench reproduce``."""
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: process pool (default); serial: in this process; ray: Ray tasks")
    p.add_argument("--workers", type=int, help=f"cells at a time (default: cpu_count // 2 = {default_workers()})")
    p.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: start a local instance)")
    p.add_argument("--gpus-per-cell", dest="gpus_per_cell", type=_gpus, default=0.0,
                   help="ray: GPUs each cell requests (e.g. 1 or 0.5; default 0: cells run on CPU). "
                        "Cells with device cpu refuse it; device cuda needs it; auto follows it")
    p.add_argument("--retries", type=_retries,
                   help=f"ray: times a cell whose worker or node died is run again, resuming from its "
                        f"checkpoint (default {DEFAULT_RETRIES}; a cell's own error is never retried)")


def executor_from_args(args: argparse.Namespace):
    """The executor the flags of ``add_executor_arguments`` ask for."""
    return make_executor(args.executor, args.workers, args.ray_address, gpus_per_cell=args.gpus_per_cell,
                         retries=args.retries)


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
    add_executor_arguments(p)
    p.add_argument("--output", dest="output_dir", help="overrides the spec's output_dir")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    p.add_argument("--max-cells", type=int, default=MAX_CELLS,
                   help=f"refuse a spec that expands to more cells than this (default: {MAX_CELLS})")
    p.set_defaults(func=cmd_sweep)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    outcome = run_sweep(args.spec, executor_from_args(args), output_dir=args.output_dir, dry_run=args.dry_run,
                        max_cells=args.max_cells)
    return 1 if outcome.failed else 0
