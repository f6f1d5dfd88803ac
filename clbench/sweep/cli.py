"""``clbench sweep SPEC``: the command line of a sweep."""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from clbench.sweep.executors import EXECUTORS, default_workers
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
