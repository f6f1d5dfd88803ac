"""Probe maps (clbench.engine.probes, clbench.reporting.probe_plots): a seeded, recorded choice of
defect test images, their maps after every step in one float16 file per step, and the panels.
That the stored maps are the evaluated ones, for every method and strategy and across a resume:
tests/test_contract.py (check_probe_maps_are_the_evaluated_maps)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clbench.data import ImageStore, list_categories, load_category
from clbench.engine.rundir import PROBE_MAPS
from clbench.engine.probes import ProbeSet, choose_probes, read_npz, step_file
from helpers import engine_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_probes_are_seeded_defect_images_of_each_task(synthetic_root: Path) -> None:
    categories = [load_category(synthetic_root, name) for name in list_categories(synthetic_root)]
    chosen = choose_probes(categories, 2, seed=0)
    assert list(chosen) == [c.name for c in categories]
    for category in categories:
        defects = [s.key for s in category.test if s.label == 1]
        assert len(chosen[category.name]) == min(2, len(defects)) and set(chosen[category.name]) <= set(defects)
    assert chosen == choose_probes(categories, 2, seed=0)
    assert any(choose_probes(categories, 2, seed=s) != chosen for s in range(1, 6))  # the seed matters
    many = choose_probes(categories, 1000, seed=0)  # more than a task has: all its defect images
    assert all(len(many[c.name]) == sum(s.label for s in c.test) for c in categories)


def test_a_recorded_choice_is_kept(synthetic_root: Path, tmp_path: Path) -> None:
    """A resumed run reads probes.json instead of choosing again (even with another seed)."""
    categories = [load_category(synthetic_root, name) for name in list_categories(synthetic_root)[:2]]
    store = ImageStore(64)
    first = ProbeSet.open(tmp_path, categories, store, 2, seed=0)
    again = ProbeSet.open(tmp_path, categories, store, 2, seed=7)
    assert again.by_task == first.by_task
    pixels = read_npz(tmp_path / PROBE_MAPS / "probes.npz")
    assert list(pixels["keys"]) == first.keys and pixels["images"].shape == (len(first.keys), 3, 64, 64)
    assert pixels["masks"].dtype == bool and pixels["masks"].any(axis=(1, 2)).all()  # defects have mask pixels


@pytest.mark.slow
def test_a_run_keeps_the_maps_of_every_step_and_draws_a_panel_per_task(synthetic_root: Path, tmp_path: Path) -> None:
    run = engine_run("padim", "sequential", {}, synthetic_root, tmp_path / "runs", tasks=3)
    folder = run / PROBE_MAPS
    record = json.loads((folder / "probes.json").read_text())
    assert record["per_task"] == 2 and len(record["probes"]) == 3
    for step in range(3):
        maps = read_npz(folder / step_file(step))
        assert maps["maps"].shape == (6, 64, 64) and maps["maps"].dtype == np.float16
    summary = json.loads((run / "summary.json").read_text())
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    assert summary["disk_bytes"]["probe_maps"] == on_disk > 0
    panels = sorted((run / "plots").glob("maps_*.png"))
    assert [p.name for p in panels] == [f"maps_{t}.png" for t in sorted(record["probes"])]
    assert all(p.read_bytes()[:8] == PNG for p in panels)
    # `clbench plot` redraws them from the stored maps (the dataset is not needed)
    from clbench.reporting.plots import plot_run

    for panel in panels:
        panel.unlink()
    assert set(panels) <= set(plot_run(run))


@pytest.mark.slow
def test_probe_maps_zero_keeps_nothing(synthetic_root: Path, tmp_path: Path) -> None:
    run = engine_run("padim", "sequential", {}, synthetic_root, tmp_path / "runs", probe_maps=0)
    assert not (run / PROBE_MAPS).exists() and not list((run / "plots").glob("maps_*.png"))
    assert json.loads((run / "summary.json").read_text())["disk_bytes"]["probe_maps"] == 0
