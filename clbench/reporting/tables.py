"""The report's tables: ``runs.csv`` and ``cells.csv`` frames, the per-group summary (mean and sample
std over seeds), and the markdown and HTML renderings of the report's sections (``sections``)."""
from __future__ import annotations

import base64
import html
import math
import mimetypes
import numbers
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from clbench.reporting.cells import STATS, CellInfo, _cell_values, _started_rows


if TYPE_CHECKING:
    import pandas as pd

    from clbench.reporting.sections import Section, Table

METRICS = ("pixel_auroc", "image_auroc", "pixel_aupro")
PARAMS = ("method", "strategy", "strategy_label", "buffer_size", "seed", "task_order", "backbone", "pretrained")
GROUP = ("method", "strategy", "buffer_size", "task_order", "backbone", "pretrained")
LABEL = "strategy_label"  # strategy + its telling params (cells.strategy_label): a group key beside GROUP
MEMORY = ("memory_mb", "method_state_mb", "replay_buffer_mb", "peak_rss_mb", "cl_memory_mb")
BUFFER_ERA = {"sequential", "joint", "replay"}  # strategies the buffer-size table layout describes fully


def group_keys(extras: Sequence[str]) -> list[str]:
    """What a summary row is the mean over seeds of: the standard keys, the strategy label, the extras."""
    return [*GROUP, LABEL, *extras]


def leading_keys(summary: "pd.DataFrame") -> list[str]:
    """The table's first columns: method | strategy | buffer while every group is sequential, joint or
    replay over buffer_size (the label says nothing more); otherwise method | strategy label."""
    if LABEL not in summary.columns:
        return ["method", "strategy", "buffer_size"]
    buffer_era = all(
        s in BUFFER_ERA and label in (s, f"{s}(buffer_size={b})")
        for s, label, b in zip(summary["strategy"].astype(str), summary[LABEL].astype(str), summary["buffer_size"]))
    return ["method", "strategy", "buffer_size"] if buffer_era else ["method", LABEL]


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def runs_frame(cells: Sequence[CellInfo], extras: Sequence[str]) -> "pd.DataFrame":
    """Every metrics.csv row of every started cell, with the cell's parameters as columns
    (damaged cells left out: they are listed in cells.csv with their problem)."""
    import pandas as pd

    frames = []
    for cell in cells:
        frame = _started_rows(cell)
        if frame is None:
            continue
        front = {"cell": cell.name, **{k: cell.params[k] for k in (*PARAMS, *extras)}, "complete": cell.complete}
        for i, (key, value) in enumerate(front.items()):
            frame.insert(i, key, value)
        frames.append(frame)
    columns = ["cell", *PARAMS, *extras, "complete", "step", "trained_task", "eval_task", "metric", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def cells_frame(cells: Sequence[CellInfo], extras: Sequence[str]) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for cell in cells:
        row: dict[str, Any] = {"cell": cell.name, **{k: cell.params[k] for k in (*PARAMS, *extras)},
                               "status": cell.status, "note": cell.note, "clbench_version": cell.version or "unknown"}
        if cell.complete:
            row.update(_cell_values(cell))
        rows.append(row)
    return pd.DataFrame(rows)


def _natural(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers by value before text (8 < 16)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _strategy_rank(strategy: str) -> int:
    return {"sequential": 0, "joint": 2}.get(strategy, 1)


def summarize_cells(cells: "pd.DataFrame", extras: Sequence[str]) -> "pd.DataFrame":
    """Mean and sample std (n - 1) over seeds per group of complete cells."""
    import pandas as pd

    group = group_keys(extras)
    done = cells[cells["status"] == "complete"]
    values = [c for c in [f"{m}_{s}" for m in _metrics_in(done) for s in STATS] + list(MEMORY) if c in done.columns]
    if done.empty:
        return pd.DataFrame(columns=[*group, "n_seeds", "seeds"])
    grouped = done.groupby(group, dropna=False, sort=False)
    out = grouped.size().rename("n_seeds").to_frame()
    out["seeds"] = grouped["seed"].agg(lambda s: " ".join(str(v) for v in sorted(s)))
    mean = grouped[values].mean()
    std = grouped[values].std(ddof=1)
    for column in values:
        out[f"{column}_mean"] = mean[column]
        out[f"{column}_std"] = std[column]
    out = out.reset_index()
    order = sorted(range(len(out)), key=lambda i: (str(out.loc[i, "method"]), _strategy_rank(out.loc[i, "strategy"]),
                                                   str(out.loc[i, "strategy"]), int(out.loc[i, "buffer_size"]),
                                                   *[_natural(out.loc[i, k]) for k in group[3:]]))
    return out.iloc[order].reset_index(drop=True)


def _metrics_in(frame: "pd.DataFrame") -> list[str]:
    found = [c[: -len("_acc")] for c in frame.columns if c.endswith("_acc")]
    return [m for m in METRICS if m in found] + sorted(m for m in found if m not in METRICS)


def _table_metrics(summary: "pd.DataFrame", metric: str) -> list[str]:
    """The headline metric, then the standard ones, that the summary has."""
    return [m for m in dict.fromkeys([metric, *METRICS]) if f"{m}_acc_mean" in summary.columns]


def _varying(summary: "pd.DataFrame", columns: Sequence[str]) -> list[str]:
    """Columns that tell cells of the same method apart. A key that only differs between methods
    (a method-specific setting such as PatchCore's budget) is implied by the method column."""
    def varies(column: str) -> bool:
        values = summary[column].astype(str)
        if "method" in summary.columns:
            return bool((values.groupby(summary["method"]).nunique() > 1).any())
        return values.nunique() > 1

    return [c for c in columns if c in summary.columns and varies(c)]


def _fmt(mean: float, std: float, digits: int = 3, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A pipe table padded to column width, so it reads in a terminal as well as rendered."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right)) + " |"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _common(summary: "pd.DataFrame", cells: Sequence[CellInfo], extras: Sequence[str]) -> str:
    parts = []
    for key in ("backbone", "pretrained", "task_order", *extras):
        values = summary[key].astype(str).unique() if key in summary.columns and len(summary) else []
        if len(values) == 1 and key == "pretrained":
            parts.append({"True": "pretrained", "False": "random-init"}.get(values[0], "weights unknown"))
        elif len(values) == 1:
            parts.append(f"{key} {values[0]}")
    orders = {tuple(c.tasks) for c in cells if c.complete}
    if len(orders) == 1:
        parts.append("tasks " + ", ".join(next(iter(orders))))
    return " · ".join(parts)


def _embedded(path: Path) -> str:
    """An image as a data: URI, so summary.html opens as one file wherever it is copied."""
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


POWER = re.compile(r"(\d+)\^(\d+)")  # "10^6" in a paragraph: a superscript in HTML and LaTeX


def _html_text(text: str) -> str:
    """Escaped text; ``10^6`` as a superscript."""
    return POWER.sub(r"\1<sup>\2</sup>", html.escape(text))


def _html_table(table: "Table") -> str:
    import pandas as pd

    frame = pd.DataFrame([[c.text for c in row] for row in table.rows], columns=table.headers)
    return frame.to_html(index=False, escape=True, border=0)


def render_markdown(sections: Sequence["Section"]) -> str:
    """The report's sections as markdown: blocks separated by a blank line."""
    blocks = []
    for s in sections:
        if s.kind == "title":
            blocks.append(f"# {s.title}")
            continue
        if s.title:
            blocks.append(f"## {s.title}")
        if s.kind == "text":
            blocks.append(s.text)
        elif s.kind == "table" and s.table is not None:
            blocks.append(markdown_table(s.table.headers, [[c.text for c in r] for r in s.table.rows], s.table.right))
        elif s.kind == "images":
            blocks.append("\n".join(f"- {image.caption}" for image in s.images))
        elif s.kind == "panels":
            blocks.append("\n".join(f"- {cell}: {image.caption}"
                                    for cell, images in s.panels.items() for image in images))
        if s.items:
            blocks.append("\n".join(f"- {item}" for item in s.items))
    return "\n\n".join(blocks) + "\n"


def render_html(sections: Sequence["Section"]) -> str:
    """The report's sections as one self-contained HTML page: plots and probe-map panels embedded as
    data: URIs (no file next to it needed); each run's panels folded in a <details>."""
    name, parts = "", []
    for s in sections:
        if s.kind == "title":
            name = s.title.removeprefix("Sweep report: ")
            parts.append(f"<h1>{html.escape(s.title)}</h1>")
            continue
        if s.title:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.kind == "text":
            parts.append(f"<p>{_html_text(s.text)}</p>")
        elif s.kind == "table" and s.table is not None:
            parts.append(_html_table(s.table))
        elif s.kind == "images":
            parts += [f'<p><img src="{_embedded(i.path)}" alt="{html.escape(i.caption)}"></p>' for i in s.images]
        elif s.kind == "panels":
            for cell, images in s.panels.items():
                parts.append(f"<details><summary>{html.escape(cell)}</summary>")
                parts += [f'<p><img src="{_embedded(i.path)}" alt="{html.escape(i.caption)}"></p>'
                          for i in images]
                parts.append("</details>")
        if s.items:
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in s.items) + "</ul>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}th{background:#f3f3f3}"
             "img{max-width:100%}summary{cursor:pointer;font-weight:bold;margin:0.5em 0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
