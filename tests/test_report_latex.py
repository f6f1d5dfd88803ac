"""The report's formats from one list of sections: the LaTeX table (booktabs, methods as rows,
strategies as column groups, best per column in bold, escaped names), checked without a LaTeX parser
and, where pdflatex is installed, compiled; the self-contained HTML (plots and probe maps embedded)."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from clbench.reporting.cells import load_cells
from clbench.reporting.latex import escape, metric_latex, render_latex
from clbench.reporting.report import build_report, parse_formats
from clbench.reporting.sections import Cell, Section, Table, build_sections
from clbench.reporting.tables import cells_frame, render_html, render_markdown, summarize_cells
from test_report import PNG, fake_run

GROUPS = {  # (strategy, buffer) -> the column group's label
    ("sequential", None): "sequential", ("replay", 20): "replay(buffer_size=20)",
    ("latent_replay", 20): "latent_replay(buffer_size=20)", ("joint", None): "joint"}


def small_sweep(root: Path, methods=("padim", "stfpm", "cfa"), seeds=(0, 1)) -> Path:
    """Every method with sequential, replay, latent replay and joint (cfa without latent replay: an
    absent group), two seeds; no sweep.yaml (the report reads runs/*)."""
    sweep = root / "sweep"
    for method in methods:
        for strategy, buffer in GROUPS:
            if method == "cfa" and strategy == "latent_replay":
                continue
            for seed in seeds:
                name = f"{method}-{strategy}" + (f"-buffer_size{buffer}" if buffer else "") + f"-seed{seed}"
                fake_run(sweep / "runs" / name, method=method, strategy=strategy, seed=seed, buffer_size=buffer)
    return sweep


def sections_of(sweep: Path, out: Path, plots=()) -> list[Section]:
    cells, extras, name = load_cells(sweep)
    summary = summarize_cells(cells_frame(cells, extras), extras)
    return build_sections(name, summary, cells, extras, "pixel_auroc", list(plots), out)


def expected_bold(sweep: Path, metric: str) -> set[tuple[str, str, str]]:
    """Best per (group, stat) over methods, from the runs' summary.json (mean over seeds, compared at
    the 3 printed digits): ACC highest, FM lowest; ties all."""
    means: dict[tuple[str, str, str], list[float]] = {}
    for run in (sweep / "runs").iterdir():
        summary = json.loads((run / "summary.json").read_text())
        method, strategy, *rest = run.name.split("-")
        buffer = int(rest[0].removeprefix("buffer_size")) if rest[0].startswith("buffer") else None
        for stat in ("acc", "fm"):
            means.setdefault((method, GROUPS[(strategy, buffer)], stat.upper()), []).append(summary["metrics"][metric][stat])
    shown = {k: round(float(np.mean(v)), 3) for k, v in means.items() if np.isfinite(np.mean(v))}
    bold = set()
    for group in GROUPS.values():
        for stat, pick in (("ACC", max), ("FM", min)):
            column = {k: v for k, v in shown.items() if k[1] == group and k[2] == stat}
            if column:
                best = pick(column.values())
                bold |= {k for k, v in column.items() if v == best}
    return bold


def tabulars(tex: str) -> list[str]:
    return re.findall(r"\\begin\{tabular\}.*?\\end\{tabular\}", tex, flags=re.S)


def balanced(tex: str) -> bool:
    depth = 0
    for line in tex.splitlines():
        for ch in re.sub(r"\\[{}]", "", line.split("%")[0] if not line.startswith("%") else ""):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth < 0:
                return False
    return depth == 0


def read_tabular(block: str) -> tuple[int, list[str], list[list[str]]]:
    """(columns of the spec, the group of each data column, the body rows' cells)."""
    spec = re.match(r"\\begin\{tabular\}\{([lcr]+)\}", block).group(1)
    lines = [line.strip() for line in block.splitlines()]
    group_line = next(line for line in lines if "\\multicolumn" in line)
    groups = []
    for span, label in re.findall(r"\\multicolumn\{(\d+)\}\{c\}\{(.*?)\}(?: &| \\\\)", group_line):
        groups += [label.replace("\\_", "_")] * int(span)
    body = lines[lines.index("\\midrule") + 1: lines.index("\\bottomrule")]
    return len(spec), groups, [row.removesuffix("\\\\").strip().split(" & ") for row in body]


def test_the_latex_table_is_booktabs_with_methods_as_rows_and_the_best_in_bold(tmp_path: Path) -> None:
    sweep = small_sweep(tmp_path)
    tex = render_latex(sections_of(sweep, tmp_path / "report"))
    assert tex.startswith("\\documentclass{article}") and "\\usepackage{booktabs}" in tex and tex.rstrip().endswith("\\end{document}")
    assert balanced(tex)
    # no raw LaTeX special outside math: names are escaped
    for line in tex.splitlines():
        if not line.startswith("%"):
            text = re.sub(r"\$[^$]*\$", "", line).replace("\\_", "").replace("\\%", "").replace("\\&", "")
            assert "_" not in text and "%" not in text, line
    assert "\\multicolumn{2}{c}{latent\\_replay(buffer\\_size=20)}" in tex
    blocks = tabulars(tex)
    assert len(blocks) == 3  # pixel_auroc, image_auroc, pixel_aupro: 4 groups fit one tabular each
    seen: dict[tuple[str, str, str], bool] = {}
    block = blocks[0]  # the headline metric's table
    assert block.count("\\toprule") == block.count("\\midrule") == block.count("\\bottomrule") == 1
    assert block.count("\\cmidrule(lr)") == 4
    n_columns, groups, rows = read_tabular(block)
    assert n_columns == 1 + 2 * 4 and len(groups) == n_columns - 1
    assert groups[:2] == ["sequential"] * 2 and groups[-2:] == ["joint"] * 2  # bounds first and last
    header = next(line for line in block.splitlines() if line.startswith("method & "))
    stats = header.removesuffix("\\\\").strip().split(" & ")[1:]
    assert [r[0] for r in rows] == ["cfa", "padim", "stfpm"]
    for row in rows:
        assert len(row) == n_columns  # every row as wide as the spec
        for entry, group, stat in zip(row[1:], groups, stats):
            if entry not in ("--", "n/a"):
                assert re.fullmatch(r"\$(\\mathbf\{)?-?\d\.\d{3} \\pm \d\.\d{3}\}?\$", entry), entry
            seen[(row[0], group, stat)] = "\\mathbf" in entry
    assert seen[("cfa", "latent_replay(buffer_size=20)", "ACC")] is False  # absent: "--"
    assert next(r for r in rows if r[0] == "cfa")[groups.index("latent_replay(buffer_size=20)") + 1] == "--"
    assert {k for k, bold in seen.items() if bold} == expected_bold(sweep, "pixel_auroc")


def test_ties_are_both_bold_and_memory_never() -> None:
    def row(acc: float, mb: float) -> list[Cell]:
        return [Cell("m"), Cell("", acc, 0.01), Cell("", mb, 0.0, digits=1)]

    keys = [{"method": m, "strategy": "replay", "buffer_size": 20, "group": "replay(buffer_size=20)", "n_seeds": 2}
            for m in ("a_b", "c", "d")]
    table = Table(["method", "ACC", "CL memory MB"], [row(0.8612, 5.0), row(0.8609, 1.0), row(0.85, 9.0)],
                  [False, False, True], [None, "high", None], keys)
    tex = metric_latex(Section("table", "x", key="metric", metric="pixel_auroc", table=table), ("ACC", "CL memory MB"))
    lines = {line.split(" & ")[0]: line for line in tex.splitlines() if " & " in line and "\\pm" in line}
    assert set(lines) == {"a\\_b", "c", "d"}
    assert "$\\mathbf{0.861 \\pm 0.010}$" in lines["a\\_b"] and "$\\mathbf{0.861 \\pm 0.010}$" in lines["c"]
    assert "\\mathbf" not in lines["d"] and "$1.0 \\pm 0.0$" in lines["c"]  # the smallest memory is not bold


def test_escape_latex_specials() -> None:
    assert escape("lr_x%_&#${}") == r"lr\_x\%\_\&\#\$\{\}"
    assert escape("--set a") == "-{}-set a" and escape("MB = 10^6 · ±") == r"MB = $10^{6}$ $\cdot$ $\pm$"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_the_latex_report_compiles(tmp_path: Path) -> None:
    sweep = small_sweep(tmp_path, methods=("padim", "stfpm"), seeds=(0,))
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.tex").write_text(render_latex(sections_of(sweep, out)))
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "summary.tex"], cwd=out,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (out / "summary.pdf").stat().st_size > 1000 and "Overfull \\hbox" not in done.stdout


def test_the_html_report_embeds_its_plots_and_each_runs_probe_maps(tmp_path: Path) -> None:
    sweep = small_sweep(tmp_path, methods=("padim",), seeds=(0,))
    out = tmp_path / "report"
    (out / "plots").mkdir(parents=True)
    plot = out / "plots" / "acc.png"
    plot.write_bytes(PNG + b"plot")
    panel = sweep / "runs" / "padim-replay-buffer_size20-seed0" / "plots" / "maps_beta.png"
    panel.parent.mkdir()
    panel.write_bytes(PNG + b"probe maps of beta")
    sections = sections_of(sweep, out, [plot])
    page = render_html(sections)
    assert re.findall(r'src="(?!data:)', page) == []
    assert base64.b64encode(PNG + b"plot").decode() in page
    assert base64.b64encode(PNG + b"probe maps of beta").decode() in page
    details = page[page.index("<details>"):]
    assert details.startswith("<details><summary>padim-replay-buffer_size20-seed0</summary>")
    assert page.index("<details>") > page.rindex("</table>")  # after the tables
    assert "- padim-replay-buffer_size20-seed0: ../sweep/runs/padim-replay-buffer_size20-seed0/plots/maps_beta.png" \
        in render_markdown(sections)


def test_formats_are_md_and_html_plus_those_asked() -> None:
    assert parse_formats(None) == ["md", "html"]
    assert parse_formats(["latex"]) == parse_formats(["md,tex"]) == ["md", "html", "latex"]
    with pytest.raises(ValueError, match="--format: unknown format 'pdf'"):
        parse_formats(["latex,pdf"])


@pytest.mark.slow
def test_report_format_latex_writes_summary_tex(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        fake_run(sweep / "runs" / f"latent_x-sequential-seed{seed}", method="latent_x", strategy="sequential", seed=seed)
    report = build_report(sweep, formats=["latex"])
    tex = (sweep / "report" / "summary.tex").read_text()
    assert "latent\\_x & $" in tex and (sweep / "report" / "summary.md").read_text() == report.markdown
    assert 'src="data:image/png;base64,' in (sweep / "report" / "summary.html").read_text()
    build_report(sweep)  # without latex: the earlier, now stale summary.tex is gone
    assert not (sweep / "report" / "summary.tex").exists()
