"""``clbench status SWEEP_DIR``: where a sweep stands, read from its folder while it runs or after.

The cells and their states come from the report's reader (``clbench.reporting.cells.load_cells``:
complete | damaged | incomplete | running elsewhere | failed | not started, with ``status.json``'s
one-line errors); this module adds only what a report does not need: whether a cell's run folder
is locked *now* (a sweep is running it: its last completed step from ``metrics.csv``) and a
grouping into done / running / failed / damaged / to run. It writes nothing.

Import-light: the CLI builds its parser from here without torch or pandas."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.engine.locks import locked_by
from clbench.engine.rundir import RunFolder, read_mapping
from clbench.sweep.progress import headline
from clbench.sweep.spec import STATUS_FILE


STATES = ("done", "running", "failed", "damaged", "to run")  # the order they are listed in


@dataclass
class CellStatus:
    name: str
    state: str  # one of STATES
    detail: str = ""


def last_step(run_dir: Path) -> str:
    """``step 2 of 4 done (last: brushed_metal)`` from a run folder's ``metrics.csv`` (read
    tolerantly: the run is writing it) and ``config.yaml`` (its steps); 'no step done yet' before
    the first step's results."""
    folder = RunFolder(run_dir)
    tasks = folder.config().get("tasks")
    of = f" of {len(tasks)}" if isinstance(tasks, list) and tasks else ""  # one entry per step
    try:
        metrics = folder.table("metrics") if folder.csv_path("metrics").is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        metrics = None
    if metrics is None or metrics.empty:
        return "no step done yet"
    final = metrics[metrics["step"] == metrics["step"].max()]
    step = int(final["step"].iloc[0])
    return f"step {step + 1}{of} done (last: {final['trained_task'].iloc[0]})"


def _classify(cell: Any) -> CellStatus:
    """One ``CellInfo`` (``load_cells``) as a state of this listing; a lock held now wins over
    what ``status.json`` last said (a sweep writes it only when a cell ends)."""
    if cell.status == "complete":
        return CellStatus(cell.name, "done", headline(cell.summary or {}))
    if cell.status == "damaged":
        return CellStatus(cell.name, "damaged", cell.note)
    pid = locked_by(cell.run_dir)
    if pid is not None:
        holder = f"pid {pid}" if pid > 0 else "pid unknown"
        return CellStatus(cell.name, "running", f"{holder}, {last_step(cell.run_dir)}")
    if cell.status == "failed":
        return CellStatus(cell.name, "failed", cell.note)
    if cell.status == "not started":
        return CellStatus(cell.name, "to run", "not started")
    # incomplete, or "running elsewhere" when the sweep looked but no longer held now: it resumes
    steps = RunFolder(cell.run_dir).steps_done()
    return CellStatus(cell.name, "to run", f"resumes after {steps} step(s)" if steps else "resumes from its start")


def sweep_status(sweep_dir: str | Path) -> tuple[str, list[CellStatus]]:
    """The sweep's name and every cell's state, in the sweep's order."""
    from clbench.reporting.cells import load_cells

    cells, _, name = load_cells(sweep_dir, labels=False)  # no strategy labels: they would import torch
    return name, [_classify(cell) for cell in cells]


def render(name: str, sweep_dir: Path, cells: list[CellStatus], updated: str | None = None) -> list[str]:
    """The lines ``clbench status`` prints: a header, cells grouped by state, one count line."""
    width = max([len(c.name) for c in cells] + [1])
    lines = [f"sweep {name}: {len(cells)} cells in {sweep_dir}"
             + (f" ({STATUS_FILE} updated {updated})" if updated else "")]
    for state in STATES:
        for cell in (c for c in cells if c.state == state):
            label = "FAILED" if state == "failed" else state
            lines.append(f"  {label:8s} {cell.name:{width}s}  {cell.detail}".rstrip())
    counts = {state: sum(c.state == state for c in cells) for state in STATES}
    lines.append(f"{len(cells)} cells: " + ", ".join(f"{counts[s]} {s}" for s in STATES))
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.sweep_dir)
    name, cells = sweep_status(sweep_dir)
    stamp = read_mapping(sweep_dir / STATUS_FILE).get("updated")
    for line in render(name, sweep_dir, cells, stamp if isinstance(stamp, str) else None):
        print(line)
    return 0


def add_status_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "status",
        help="where a sweep stands: cells done, running (last step), failed (error), to run",
        description="List a sweep's cells by state: done (with pixel_auroc ACC/FM), running (the pid holding "
                    "the run folder and its last completed step), failed (the one-line error), damaged, to run; "
                    "then one count line. Reads the sweep folder only; safe while the sweep runs.",
    )
    p.add_argument("sweep_dir", type=Path, help="the sweep folder (<output_dir>/<name>, with sweep.yaml)")
    p.set_defaults(func=cmd_status)
    return p
