"""The sweep report as a list of sections: one function (``build_sections``) decides what the report
says and in which order; markdown, HTML and LaTeX only render it (``tables``, ``latex``), so the
formats cannot drift apart.

A table's cells carry their numbers (mean, std, digits), not only their text, so that a renderer can
format them its own way (LaTeX: ``$0.861 \\pm 0.002$``) and mark the best one of a column
(``Table.better``: which way is better for that column; ``best_rows``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from clbench.engine.rundir import PANEL_GLOB
from clbench.reporting.cells import STATS, CellInfo


if TYPE_CHECKING:
    import pandas as pd

    from clbench.reporting.paper import PaperTable

BETTER = {"ACC": "high", "BWT": "high", "FM": "low"}  # memory columns: no better direction, never bolded


@dataclass
class Cell:
    """One table entry: its text as markdown shows it, and the numbers behind it (None for text)."""
    text: str
    mean: float | None = None
    std: float | None = None
    digits: int = 3
    signed: bool = False

    @property
    def number(self) -> bool:
        return self.mean is not None and math.isfinite(self.mean)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    right: list[bool]  # right-aligned columns (markdown)
    better: list[str | None] = field(default_factory=list)  # per column: "high", "low" or None
    keys: list[dict[str, Any]] = field(default_factory=list)  # per row: method, strategy, buffer_size, group


@dataclass
class Image:
    path: Path
    caption: str = ""


@dataclass
class Section:
    """``kind``: "title" (the report's heading), "text" (a paragraph), "table" (a table, optional
    notes in ``items``), "list" (``items``), "images" (``images``) or "panels" (``panels``: per-run
    probe-map images by cell name). ``key`` says what it is ("summary", "common", "metric", "paper",
    "left_out", "plots", "maps") so a format may treat one kind of section its own way."""
    kind: str
    title: str = ""
    key: str = ""
    text: str = ""
    table: Table | None = None
    items: list[str] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    panels: dict[str, list[Image]] = field(default_factory=dict)
    metric: str = ""


SUMMARY_NOTE = ("mean ± std over seeds (sample std, n−1) · memory = final method state + replay buffer · CL memory = "
                "memory spent on continual learning (final replay buffer + strategy state) · MB = 10^6 bytes · "
                "peak RSS = largest per-step peak")


def _cell(mean: Any, std: Any, digits: int = 3, signed: bool = False) -> Cell:
    from clbench.reporting.tables import _fmt

    mean = None if mean is None else float(mean)
    std = None if std is None else float(std)
    return Cell(_fmt(mean, std, digits=digits, signed=signed), mean, std, digits, signed)


def _group(r: "pd.Series", keys: Sequence[str]) -> str:
    """A row's column group in a methods-as-rows table: its strategy label, and any other varying key."""
    from clbench.reporting.tables import LABEL

    if LABEL in r.index:
        label = str(r[LABEL])
    else:
        label = str(r["strategy"]) + (f"(buffer_size={r['buffer_size']})" if r["strategy"] == "replay" else "")
    extra = [f"{k}={r[k]}" for k in keys if k not in ("method", "strategy", "buffer_size", LABEL)]
    return label + (f" [{', '.join(extra)}]" if extra else "")


def metric_table(summary: "pd.DataFrame", metric: str, keys: Sequence[str], memory: bool) -> Table:
    """One metric's table: the group keys, seeds, ACC / BWT / FM (mean ± std) and, for the headline
    metric, memory."""
    from clbench.reporting.tables import LABEL

    names = {"buffer_size": "buffer", LABEL: "strategy"}
    headers = [names.get(k, k) for k in keys] + ["seeds", "ACC", "BWT", "FM"]
    right = [k == "buffer_size" for k in keys] + [True, False, False, False]
    if memory:
        headers += ["memory MB", "peak RSS MB", "CL memory MB"]
        right += [True, True, True]
    better = [BETTER.get(h) for h in headers]
    rows, row_keys = [], []
    for _, r in summary.iterrows():
        row = [Cell(str(r[k])) for k in keys] + [Cell(str(int(r["n_seeds"])))]
        for stat in STATS:
            row.append(_cell(r.get(f"{metric}_{stat}_mean"), r.get(f"{metric}_{stat}_std"), signed=stat == "bwt"))
        if memory:
            row.append(_cell(r.get("memory_mb_mean"), r.get("memory_mb_std"), digits=1))
            row.append(_cell(r.get("peak_rss_mb_mean"), r.get("peak_rss_mb_std"), digits=0))
            cl = r.get("cl_memory_mb_mean")  # a small replay buffer (4 images at 64 px: 0.049 MB) must not read 0.0
            row.append(_cell(cl, r.get("cl_memory_mb_std"), digits=1 if cl is None or not 0 < abs(cl) < 1 else 3))
        rows.append(row)
        row_keys.append({"method": str(r["method"]), "strategy": str(r["strategy"]),
                         "buffer_size": r["buffer_size"], "group": _group(r, keys), "n_seeds": int(r["n_seeds"])})
    return Table(headers, rows, right, better, row_keys)


def best_rows(values: Sequence[Cell], better: str | None) -> set[int]:
    """Indices of the best entries of a column, compared as shown (rounded to their digits), so that
    two entries that read the same are both best; none for a column without a better direction."""
    if better not in ("high", "low"):
        return set()
    shown = {i: round(c.mean, c.digits) for i, c in enumerate(values) if c.number}
    if not shown:
        return set()
    target = max(shown.values()) if better == "high" else min(shown.values())
    return {i for i, v in shown.items() if v == target}


def probe_panels(cells: Sequence[CellInfo], out_dir: Path, drawn: dict[str, list[Path]] | None = None
                 ) -> dict[str, list[Image]]:
    """Each complete cell's probe-map panels (``<run_dir>/plots/maps_*.png``) where it drew them, else
    those the report drew from its stored maps (``drawn``: ``probe_plots.report_panels``); the caption
    is the panel's path from the report folder."""
    drawn = drawn or {}
    panels = {}
    for cell in cells:
        if cell.complete:
            found = [p for p in sorted((Path(cell.run_dir) / "plots").glob(PANEL_GLOB)) if p.is_file()]
            found = found or list(drawn.get(cell.name, []))
            if found:
                panels[cell.name] = [Image(p, os.path.relpath(p, out_dir)) for p in found]
    return panels


def paper_section(paper: "PaperTable") -> Section:
    title = f"The paper's table: {paper.profile}" + (f" ({paper.title})" if paper.title else "")
    table = Table(paper.headers(), [[Cell(t) for t in row] for row in paper.body()],
                  [False] + [True] * len(paper.methods), [None] * (len(paper.methods) + 1))
    return Section("table", title, key="paper", table=table, items=paper.notes())


def build_sections(name: str, summary: "pd.DataFrame", cells: Sequence[CellInfo], extras: Sequence[str],
                   metric: str, plots: Sequence[Path], out_dir: Path, paper: "PaperTable | None" = None,
                   panels: dict[str, list[Path]] | None = None) -> list[Section]:
    """The report, in order: title, the paper's table (paper-profile sweeps), what the numbers are,
    the common settings, one table per metric (headline first), cells left out, plots, probe maps."""
    from clbench.reporting.tables import GROUP, _common, _table_metrics, _varying, leading_keys

    keys = [*leading_keys(summary), *_varying(summary, [*GROUP[3:], *extras])]
    complete = sum(c.complete for c in cells)
    sections = [Section("title", f"Sweep report: {name}", key="title")]
    if paper is not None:
        sections.append(paper_section(paper))
    sections.append(Section("text", key="summary", text=f"{complete} of {len(cells)} cells complete · {SUMMARY_NOTE}"))
    common = _common(summary, cells, extras)
    if common:
        sections.append(Section("text", key="common", text=f"common: {common}"))
    for m in _table_metrics(summary, metric):
        sections.append(Section("table", m + (" (headline)" if m == metric else ""), key="metric", metric=m,
                                table=metric_table(summary, m, keys, memory=m == metric)))
    missing = [c for c in cells if not c.complete]
    if missing:
        sections.append(Section("list", "Cells left out (not complete or damaged)", key="left_out",
                                items=[f"{c.name}: {c.status}" + (f" — {c.note}" if c.note else "") for c in missing]))
    if plots:
        sections.append(Section("images", "Plots", key="plots",
                                images=[Image(Path(p), str(Path(p).relative_to(out_dir))) for p in plots]))
    found = probe_panels(cells, out_dir, panels)
    if found:
        sections.append(Section("panels", "Probe maps (per run)", key="maps", panels=found))
    return sections
