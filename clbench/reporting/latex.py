"""The report's sections as a LaTeX document (``clbench report --format latex``: ``summary.tex``).

One standalone file that compiles with a stock LaTeX (``pdflatex summary.tex``: article, booktabs,
geometry, graphicx), so the tables are checked as typeset; each table is one ``table`` float that needs
only ``\\usepackage{booktabs}``, between ``% --- table`` markers, to copy into a paper.

A metric's table has the methods as rows and one column group per strategy (its label: strategy,
replay size, non-default params) with sub-columns ACC / FM (``stats``), each entry ``$mean \\pm std$``
over seeds, the best of each column in bold (highest ACC and BWT, lowest FM, compared as printed so
equal entries are both bold; memory never). Many strategies are split into several tabulars of at
most ``groups_per_table`` groups under the same caption, so a table fits the page without shrinking.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from clbench.reporting.sections import BETTER, Cell, Section, Table, best_rows

SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
           "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
           "<": r"\textless{}", ">": r"\textgreater{}"}
UNICODE = {"±": r"$\pm$", "·": r"$\cdot$", "−": r"$-$", "—": "---", "–": "--", "×": r"$\times$",
           "≥": r"$\geq$", "≤": r"$\leq$", "…": r"\ldots{}"}
POWER = re.compile(r"(\d+)\^(\d+)")
GRAPHIC = "width=0.9\\linewidth,height=0.8\\textheight,keepaspectratio"
ABSENT = "--"  # a method the sweep did not run with that strategy
PREAMBLE = r"""\documentclass{article}
\usepackage[T1]{fontenc}
\usepackage[utf8]{inputenc}
\usepackage[landscape,margin=1.5cm]{geometry}
\usepackage{booktabs}
\usepackage{graphicx}
\setlength{\parindent}{0pt}
\setlength{\parskip}{0.6em}
\begin{document}
"""


def escape(text: str) -> str:
    """Text as LaTeX prints it: specials escaped, the report's unicode symbols as math, ``10^6`` raised."""
    out, at = [], 0
    for match in POWER.finditer(text):
        out.append(_escape_plain(text[at:match.start()]) + f"${match.group(1)}^{{{match.group(2)}}}$")
        at = match.end()
    return "".join(out) + _escape_plain(text[at:])


def _escape_plain(text: str) -> str:
    """Specials escaped; ``--set`` kept as two hyphens (LaTeX would join them into a dash)."""
    out = "".join(SPECIAL.get(ch) or UNICODE.get(ch) or ch for ch in re.sub(r"-(?=-)", "-\x00", text))
    return out.replace("\x00", "{}")


def number(cell: Cell, bold: bool = False) -> str:
    """``$0.861 \\pm 0.002$`` (bold: ``$\\mathbf{...}$``); n/a for a missing value."""
    if not cell.number:
        return escape(cell.text)  # "n/a"
    text = f"{cell.mean:+.{cell.digits}f}" if cell.signed else f"{cell.mean:.{cell.digits}f}"
    if cell.std is not None and math.isfinite(cell.std):
        text += rf" \pm {cell.std:.{cell.digits}f}"
    return f"$\\mathbf{{{text}}}$" if bold else f"${text}$"


def _chunks(items: list[str], size: int) -> list[list[str]]:
    """``items`` in balanced runs of at most ``size`` (9 by 4: 3, 3, 3, not 4, 4, 1)."""
    n = max(1, math.ceil(len(items) / max(1, size)))
    per = math.ceil(len(items) / n) if items else 0
    return [items[i:i + per] for i in range(0, len(items), per)] if items else [[]]


def pivot(table: Table, stats: Sequence[str]) -> tuple[list[str], list[str], dict[tuple[str, str, str], Cell]]:
    """Methods (rows), column groups (in the table's order) and each (method, group, stat) entry."""
    methods = list(dict.fromkeys(k["method"] for k in table.keys))
    groups = sorted(dict.fromkeys(k["group"] for k in table.keys), key=lambda g: _group_rank(table, g))
    columns = {h: i for i, h in enumerate(table.headers)}
    entries = {}
    for key, row in zip(table.keys, table.rows):
        for stat in stats:
            entries[(key["method"], key["group"], stat)] = row[columns[stat]]
    return methods, groups, entries


def _group_rank(table: Table, group: str) -> tuple:
    """A group's place, as the summary orders strategies: sequential first, joint last, the others by
    name and replay size (not by where a method's rows happen to put it: not every method runs every
    strategy)."""
    from clbench.reporting.tables import _natural, _strategy_rank

    key = next(k for k in table.keys if k["group"] == group)
    return (_strategy_rank(key["strategy"]), key["strategy"], _natural(key["buffer_size"]), group)


def metric_latex(section: Section, stats: Sequence[str] = ("ACC", "FM"), groups_per_table: int = 4) -> str:
    """One metric's table: methods as rows, strategies as column groups, best per column in bold."""
    table = section.table
    assert table is not None
    methods, groups, entries = pivot(table, stats)
    seeds = sorted({k["n_seeds"] for k in table.keys})
    rule = ", ".join(f"{s}: {'highest' if BETTER[s] == 'high' else 'lowest'}" for s in stats if BETTER.get(s))
    caption = (f"{section.metric}: final {' and '.join(stats)}, mean $\\pm$ std over {'/'.join(map(str, seeds))} "
               f"seed(s)" + (f"; best per column in bold ({rule})" if rule else "") + ".")
    lines = [f"% --- table: {section.metric} (needs \\usepackage{{booktabs}})",
             "\\begin{table}[!htbp]", "\\centering", "\\small", f"\\caption{{{_caption(caption)}}}"]
    for n, chunk in enumerate(_chunks(groups, groups_per_table)):
        if n:
            lines.append("\\par\\medskip")
        lines += _tabular(methods, chunk, entries, stats)
    lines += ["\\end{table}", "% --- end table"]
    return "\n".join(lines)


def _caption(text: str) -> str:
    """A caption that already holds math (``$\\pm$``): escape the text around it only."""
    parts = text.split("$\\pm$")
    return "$\\pm$".join(escape(p) for p in parts)


def _tabular(methods: list[str], groups: list[str], entries: dict[tuple[str, str, str], Cell],
             stats: Sequence[str]) -> list[str]:
    k = len(stats)
    bold: set[tuple[str, str, str]] = set()
    for group in groups:
        for stat in stats:
            column = [entries.get((m, group, stat)) for m in methods]
            present = [(m, c) for m, c in zip(methods, column) if c is not None]
            best = best_rows([c for _, c in present], BETTER.get(stat))
            bold |= {(present[i][0], group, stat) for i in best}
    lines = ["\\begin{tabular}{l" + ("c" * k) * len(groups) + "}", "\\toprule"]
    lines.append(" & ".join([""] + [f"\\multicolumn{{{k}}}{{c}}{{{escape(g)}}}" for g in groups]) + " \\\\")
    lines.append(" ".join(f"\\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(groups))))
    lines.append(" & ".join(["method"] + [escape(s) for _ in groups for s in stats]) + " \\\\")
    lines.append("\\midrule")
    for m in methods:
        cells = [escape(m)]
        for group in groups:
            for stat in stats:
                cell = entries.get((m, group, stat))
                cells.append(ABSENT if cell is None else number(cell, (m, group, stat) in bold))
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return lines


def plain_latex(section: Section) -> str:
    """A table of text (the paper's table) as it is, with its notes below."""
    table = section.table
    assert table is not None
    spec = "".join("r" if r else "l" for r in table.right)
    lines = [f"% --- table: {section.key} (needs \\usepackage{{booktabs}})", "\\begin{table}[!htbp]", "\\centering",
             "\\small", f"\\caption{{{escape(section.title)}}}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(escape(h) for h in table.headers) + " \\\\", "\\midrule"]
    lines += [" & ".join(escape(c.text) for c in row) + " \\\\" for row in table.rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", "% --- end table"]
    if section.items:
        lines += _itemize(section.items)
    return "\n".join(lines)


def _itemize(items: Sequence[str]) -> list[str]:
    return ["\\begin{itemize}", "\\small", *(f"\\item {escape(i)}" for i in items), "\\end{itemize}"]


def render_latex(sections: Sequence[Section], stats: Sequence[str] = ("ACC", "FM"), groups_per_table: int = 4) -> str:
    """The whole report as a standalone document; plots as (non-floating) figures from plots/, so
    ``summary.tex`` compiles in the report folder. Per-run probe maps are left to the HTML report."""
    body = []
    for s in sections:
        if s.kind == "title":
            body.append(f"\\section*{{{escape(s.title)}}}")
        elif s.kind == "text":
            body.append(escape(s.text))
        elif s.kind == "table" and s.key == "metric":
            body.append(metric_latex(s, stats, groups_per_table))
        elif s.kind == "table":
            body.append(plain_latex(s))
        elif s.kind == "list":
            body.append(f"\\subsection*{{{escape(s.title)}}}\n" + "\n".join(_itemize(s.items)))
        elif s.kind == "images":
            body.append("\\clearpage\n" + f"\\subsection*{{{escape(s.title)}}}")
            for image in s.images:
                body.append("\\begin{center}\n"
                            f"\\includegraphics[{GRAPHIC}]{{{image.caption}}}\\\\\n"
                            f"\\small\\texttt{{{escape(image.caption)}}}\n\\end{{center}}")
    return PREAMBLE + "\n\n".join(body) + "\n\\end{document}\n"
