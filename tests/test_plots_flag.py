"""`plots: false` / `--no-plots` leaves a run's figures to `clbench plot` (issue 14: a small run paid ~1 s
for its plots); sweep cells default to it, since a sweep's figures are its report's."""
from __future__ import annotations

from pathlib import Path

from helpers import write_category

from clbench.cli import main
from clbench.sweep.spec import expand, spec_from_mapping


def _run(tmp_path: Path, *flags: str) -> Path:
    data = tmp_path / "data"
    for name in ("alpha", "beta"):
        write_category(data, name, size=32)
    args = ["run", "--method", "padim", "--tasks", "2", "--image-size", "32", "--weights", "none",
            "--data-root", str(data), "--synthetic", "false", "--output", str(tmp_path / "out"),
            "--name", "r", "--no-progress", "--param", "backbone=resnet18", *flags]
    assert main(args) == 0
    return tmp_path / "out" / "r"


def test_no_plots_skips_the_figures_and_plot_draws_them_later(tmp_path: Path) -> None:
    run = _run(tmp_path, "--no-plots")
    assert (run / "summary.json").is_file()
    assert not (run / "plots").exists() or not any((run / "plots").iterdir())
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "heatmap_pixel_auroc.png").is_file()


def test_sweep_cells_default_to_no_plots_unless_the_spec_asks(tmp_path: Path) -> None:
    spec = {"name": "s", "base": {"tasks": 2}, "grid": {"method": ["padim"], "seed": [0, 1]}}
    cells = expand(spec_from_mapping(spec, output_dir=str(tmp_path)), check=False)
    assert [c.config["plots"] for c in cells] == [False, False]
    asked = expand(spec_from_mapping({**spec, "base": {"tasks": 2, "plots": True}}, output_dir=str(tmp_path)), check=False)
    assert [c.config["plots"] for c in asked] == [True, True]
