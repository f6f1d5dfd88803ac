"""Sweep report: the cells of a sweep aggregated over seeds into tables and plots.

``clbench report SWEEP_DIR`` reads every cell's run folder (``config.yaml``, ``env.json``,
``metrics.csv``, ``memory.csv``, ``summary.json``) and writes ``SWEEP_DIR/report/``:

* ``runs.csv``   every row of every cell's ``metrics.csv`` plus the cell's parameters (tidy);
* ``cells.csv``  one row per cell: parameters, status, ACC/BWT/FM per metric, final memory;
* ``summary.csv`` / ``summary.md`` / ``summary.html``: per (method, strategy group, and any other grid
  key that varies) the mean and sample standard deviation (n - 1) over seeds. A strategy group is
  the strategy and the params of its config.yaml that tell its cells apart (``strategy_label``:
  ``replay(buffer_size=100)``, ``ewc(ewc_lambda=1000)``, ``sequential``; ``cells.strategy_label``);
* ``plots/``     first the main plot: final ACC and FM against ``cl_memory_mb``, the memory spent on
  continual learning (one line per strategy per method; sequential / joint as markers at 0), so
  strategies of different kinds compare on one axis; then
  final ACC, FM and memory vs replay buffer size (one line per method, bands =
  +- std over seeds; sequential and joint as horizontal lower/upper-bound lines) and the
  accuracy-matrix heatmap of each group averaged over its seeds;
* for a paper-profile sweep (``clbench reproduce``; cells carry ``paper_profile``), the paper's table
  (``paper_table.md`` / ``.csv``, also at the top of ``summary.md|html``): rows pixel AUROC, image
  AUROC, AUPRO, pixel F1, average forgetting (%), extra memory (MB), columns the methods, each entry
  clbench's value (mean over seeds) beside the published figure and the difference. One function
  (``paper_table``) builds it; markdown, HTML and the console only render it. A metric a run does not
  have (older runs: pixel F1, relative forgetting) shows "n/a".

ACC/BWT/FM are read from each cell's ``summary.json`` (the runner's numbers). Memory is the final
step's ``method_state + replay_buffer`` bytes and the largest per-step ``peak_rss``; ``cl_memory_mb``
is the final step's ``replay_buffer`` plus every ``strategy_*`` component (EWC's ``strategy_state``). Cells that are
not complete are listed as such and left out of the aggregates, with a warning.

A complete cell's files are checked before they are used (``check_complete_cell``): ``metrics.csv``
and ``memory.csv`` must be whole (no row cut mid-line), in the runner's columns, with every step
``summary.json`` counts and every (metric, task) of each step, and the final step must give the
summary's ACC. A cell that fails is *damaged*: one warning line naming the problem, listed in the
report, left out of ``runs.csv`` and the aggregates. Cells written by another clbench version
(``env.json``'s package version) are kept, with one warning line per version; a ``sweep.yaml`` of a
newer format is refused in one line. The report writes only into a new, empty or earlier report
folder (marked ``.clbench-report``), never over a user's files, and reads no run folder outside the
sweep folder.

``summary.html`` is one self-contained file: its plots and each complete cell's probe-map panels
(``<run_dir>/plots/maps_*.png``, folded per cell) are embedded as data: URIs. ``--format latex`` also
writes ``summary.tex`` (``latex``): booktabs tables, methods as rows, strategies as column groups, best
per column in bold; a standalone document that compiles with pdflatex.

This module builds and writes the report; the cells are read and checked in ``cells``, the tables
built in ``tables``, what the report says (its sections, in order) in ``sections`` (markdown and HTML
rendered in ``tables``, LaTeX in ``latex``), the plots drawn in ``sweep_plots`` and the paper's table in
``paper``.
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from clbench import __version__ as CLBENCH_VERSION
from clbench.engine import atomic
from clbench.reporting.cells import CellInfo, load_cells
from clbench.reporting.latex import render_latex
from clbench.reporting.paper import PaperTable, paper_table, render_paper_markdown
from clbench.reporting.sections import Section, build_sections
from clbench.reporting.sweep_plots import write_plots
from clbench.reporting.tables import cells_frame, render_html, render_markdown, runs_frame, summarize_cells


if TYPE_CHECKING:
    import pandas as pd

REPORT_DIR = "report"


@dataclass
class Report:
    out_dir: Path
    files: list[Path]
    summary: "pd.DataFrame"
    cells: list[CellInfo]
    markdown: str
    paper: "PaperTable | None" = None
    sections: "list[Section] | None" = None


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _say_cells(sweep_dir: Path, cells: Sequence[CellInfo]) -> None:
    """Warnings, one line each: every damaged cell with its problem, the unfinished ones together,
    and cells written by another clbench version than this one (kept in the aggregates)."""
    for cell in cells:
        if cell.status == "damaged":
            warnings.warn(f"{cell.name}: {cell.note}; left out of the aggregates", stacklevel=3)
    missing = [c for c in cells if not c.complete]
    if missing:
        warnings.warn(f"{sweep_dir}: {len(missing)} of {len(cells)} cells not complete, left out of the aggregates: "
                      + ", ".join(f"{c.name} ({c.status})" for c in missing), stacklevel=3)
    versions: dict[str | None, list[str]] = {}
    for cell in cells:
        if cell.complete:
            versions.setdefault(cell.version, []).append(cell.name)
    known = {v for v in versions if v is not None}
    if known - {CLBENCH_VERSION} or len(versions) > 1:
        for version, names in versions.items():
            if version != CLBENCH_VERSION:
                what = f"clbench {version}" if version else "an unknown clbench version (no readable env.json)"
                warnings.warn(f"{len(names)} cell(s) written by {what}, this is {CLBENCH_VERSION}: {', '.join(names)}; "
                              "included, but compare their numbers with care", stacklevel=3)


REPORT_MARKER = ".clbench-report"  # marks a folder the report wrote, so a re-run may overwrite it
REPORT_FILES = ("runs.csv", "cells.csv", "summary.csv", "summary.md", "summary.html", "summary.tex", "paper_table.md",
                "paper_table.csv", "plots", REPORT_MARKER)
FORMATS = {"md": "md", "markdown": "md", "html": "html", "latex": "latex", "tex": "latex"}
DEFAULT_FORMATS = ("md", "html")  # always written; --format adds to them


def parse_formats(values: Sequence[str] | None) -> list[str]:
    """``--format`` values (repeatable, or comma lists) as the formats to write: md and html always,
    plus those asked for; an unknown one is one line naming it."""
    asked = [v.strip().lower() for value in (values or []) for v in str(value).split(",") if v.strip()]
    unknown = [v for v in asked if v not in FORMATS]
    if unknown:
        raise ValueError(f"--format: unknown format '{unknown[0]}' (known: md, html, latex)")
    return list(dict.fromkeys([*DEFAULT_FORMATS, *(FORMATS[v] for v in asked)]))


def _check_output(out: Path) -> None:
    """Refuse, in one line, an output that is a file or a folder of someone else's: the report
    overwrites its own files (summary.md, plots/...) and must never overwrite a user's."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file, not a folder; give the report another --output")
    if not out.is_dir():
        return
    try:
        names = {p.name for p in out.iterdir()}
    except OSError as err:
        raise ValueError(f"{out}: cannot read the report folder ({err.strerror or err})") from None
    names -= {n for n in names if n.startswith(".") and n.endswith(".tmp")}
    earlier = {"runs.csv", "cells.csv", "summary.csv"} <= names and names <= set(REPORT_FILES)
    if names and REPORT_MARKER not in names and not earlier:
        raise ValueError(f"{out}: exists and is not a clbench report folder (it holds {sorted(names)[0]!r}, ...); "
                         "give the report a new or empty --output")


def build_report(sweep_dir: str | Path, metric: str = "pixel_auroc", out_dir: str | Path | None = None,
                 formats: Sequence[str] | None = None) -> Report:
    """Aggregate a sweep's cells; write CSVs, markdown, HTML (and LaTeX: ``formats``, see
    ``parse_formats``) and plots to ``<sweep_dir>/report``.

    Everything is read and checked before anything is written; a write that fails (full disk,
    permissions) is one line naming the folder."""
    sweep_dir = Path(sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ValueError(f"{sweep_dir}: is a file, not a sweep folder")
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: sweep folder not found")
    out = Path(out_dir) if out_dir is not None else sweep_dir / REPORT_DIR
    formats = parse_formats(formats)
    cells, extras, name = load_cells(sweep_dir)
    _say_cells(sweep_dir, cells)
    available = sorted({m for c in cells if c.complete for m in (c.summary.get("metrics") or {})})
    if available and metric not in available:
        raise ValueError(f"--metric: '{metric}' is not in the runs' summaries (available: {', '.join(available)})")
    _check_output(out)
    try:
        return _write_report(out, name, cells, extras, metric, formats)
    except OSError as err:
        raise ValueError(f"{out}: cannot write the report ({err.strerror or err})") from None


def _write_report(out: Path, name: str, cells: list[CellInfo], extras: list[str], metric: str,
                  formats: Sequence[str] = DEFAULT_FORMATS) -> Report:
    atomic.write_text(out / REPORT_MARKER, f"written by clbench {CLBENCH_VERSION} report\n")
    files = [atomic.write_csv(out / "runs.csv", runs_frame(cells, extras))]
    per_cell = cells_frame(cells, extras)
    files.append(atomic.write_csv(out / "cells.csv", per_cell))
    summary = summarize_cells(per_cell, extras)
    files.append(atomic.write_csv(out / "summary.csv", summary))
    plots = write_plots(name, summary, cells, extras, metric, out / "plots") if len(summary) else []
    from clbench.reporting.probe_plots import report_panels  # matplotlib: only when a report is written

    panels = report_panels(cells, out / "plots" / "maps")
    paper = paper_table(cells)
    if paper is not None:
        files.append(atomic.write_text(out / "paper_table.md", render_paper_markdown(paper)))
        files.append(atomic.write_csv(out / "paper_table.csv", paper.frame()))
    sections = build_sections(name, summary, cells, extras, metric, plots, out, paper, panels)
    markdown = render_markdown(sections)
    files.append(atomic.write_text(out / "summary.md", markdown))
    files.append(atomic.write_text(out / "summary.html", render_html(sections)))
    if "latex" in formats:
        files.append(atomic.write_text(out / "summary.tex", render_latex(sections)))
    elif (out / "summary.tex").is_file():  # an earlier report's, now out of date
        (out / "summary.tex").unlink()
    drawn = [path for paths in panels.values() for path in paths]
    return Report(out, files + plots + drawn, summary, cells, markdown, paper, sections)


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="aggregate a sweep's runs: tables (csv, md, html, latex) and plots",
        description="Aggregate every cell of a sweep over seeds (mean ± std of ACC, BWT, FM, memory) into "
                    "SWEEP_DIR/report/: runs.csv, cells.csv, summary.csv/.md/.html (self-contained: plots and "
                    "probe maps embedded), plots/ and, with --format latex, summary.tex.",
    )
    p.add_argument("sweep_dir", type=Path, help="the sweep folder (<output_dir>/<name>, with sweep.yaml)")
    p.add_argument("--metric", default="pixel_auroc", help="headline metric of tables and plots (default: pixel_auroc)")
    p.add_argument("--output", dest="out_dir", type=Path, help="report folder (default: SWEEP_DIR/report)")
    p.add_argument("--format", dest="formats", action="append", metavar="FORMAT",
                   help="also write this format: latex (summary.tex, booktabs; compiles with pdflatex); repeatable "
                        "or a comma list; summary.md and summary.html are always written")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Warnings first (one line each: a damaged cell is never buried below the tables), then the
    markdown, then what was written."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_report(args.sweep_dir, args.metric, args.out_dir, getattr(args, "formats", None))
    for warning in caught:
        print(f"warning: {warning.message}")
    print(report.markdown)
    damaged = sum(c.status == "damaged" for c in report.cells)
    print(f"wrote {len(report.files)} files to {report.out_dir}"
          + (f"; {damaged} damaged cell(s) left out (see the warnings above)" if damaged else ""))
    if report.summary.empty:
        print("no complete cells: nothing to aggregate")
        return 1
    return 0
