"""Forgetting you can see: the anomaly maps of a few fixed test images after every step.

A run picks ``probe_maps`` defect images per task from its test set once (seeded by the run seed,
``seeding.probe_seed``) and records them in ``probe_maps/probes.json`` (their keys) and
``probe_maps/probes.npz`` (their pixels and ground-truth masks, so the panels redraw without the
dataset). After each step, evaluation hands over the maps it computed for them (no extra forward),
and the step's maps are written as one file, ``probe_maps/step_<k>.npz``: float16 (H, W) per probe,
in the order of probes.json. A resumed run reads the recorded choice and rewrites the steps it redoes.
``clbench.reporting.probe_plots`` draws them as ``plots/maps_<task>.png``.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clbench.data import Category, ImageStore
from clbench.engine import atomic, seeding
from clbench.engine.rundir import PROBE_MAPS

CHOICE = "probes.json"
PIXELS = "probes.npz"


def step_file(step: int) -> str:
    return f"step_{step:03d}.npz"


def choose_probes(categories: Sequence[Category], per_task: int, seed: int) -> dict[str, list[str]]:
    """``per_task`` defect test images of each task (fewer where it has fewer), drawn without
    replacement by the run's probe stream, in test-set order."""
    rng = np.random.default_rng(seeding.probe_seed(seed))
    chosen: dict[str, list[str]] = {}
    for category in categories:
        defects = [s for s in category.test if s.label == 1]
        rows = sorted(rng.permutation(len(defects))[: min(per_task, len(defects))].tolist())
        chosen[category.name] = [defects[i].key for i in rows]
    return chosen


@dataclass
class ProbeSet:
    """The recorded probes of a run, and where their maps go."""

    folder: Path
    by_task: dict[str, list[str]]

    @property
    def keys(self) -> list[str]:
        return [key for keys in self.by_task.values() for key in keys]

    @classmethod
    def open(cls, run_dir: Path, categories: Sequence[Category], store: ImageStore, per_task: int, seed: int) -> "ProbeSet":
        """The recorded choice of a resumed run, or a new one recorded with its pixels and masks."""
        folder = Path(run_dir) / PROBE_MAPS
        choice = folder / CHOICE
        if choice.is_file():
            return cls(folder, read_choice(choice))
        by_task = choose_probes(categories, per_task, seed)
        samples = {s.key: s for c in categories for s in c.test}
        probes = [samples[key] for keys in by_task.values() for key in keys]
        folder.mkdir(exist_ok=True)
        images = np.stack([store.image(s).numpy() for s in probes]) if probes else np.zeros((0, 3, 1, 1), np.uint8)
        masks = np.stack([store.mask(s).numpy() for s in probes]) if probes else np.zeros((0, 1, 1), bool)
        write_npz(folder / PIXELS, keys=np.array([s.key for s in probes], dtype=str), images=images, masks=masks)
        atomic.write_json(choice, {"per_task": per_task, "seed": seed, "probes": by_task})
        return cls(folder, by_task)

    def write_step(self, step: int, maps: dict[str, np.ndarray]) -> Path:
        """The step's maps of every probe (float16), one file."""
        missing = [key for key in self.keys if key not in maps]
        if missing:
            raise ValueError(f"probe maps: evaluation produced no map for {missing[:3]}")
        stacked = np.stack([maps[key].astype(np.float16) for key in self.keys]) if self.keys else np.zeros((0, 1, 1), np.float16)
        return write_npz(self.folder / step_file(step), keys=np.array(self.keys, dtype=str), maps=stacked)



def read_choice(path: Path) -> dict[str, list[str]]:
    data = json.loads(path.read_text())
    probes = data.get("probes") if isinstance(data, dict) else None
    if not isinstance(probes, dict) or not all(isinstance(v, list) for v in probes.values()):
        raise ValueError(f"{path}: not a probe record (expected {{'probes': {{task: [keys]}}}})")
    return {str(task): [str(k) for k in keys] for task, keys in probes.items()}


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Arrays into one compressed .npz (what ``np.load`` reads), atomically, with no pickled object
    (strings are unicode arrays) and a fixed member time: the same maps give the same bytes (numpy's
    ``savez`` stamps the current time), so a resumed run's files equal an uninterrupted run's."""
    def writer(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                member.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(member, "w", force_zip64=True) as handle:
                    np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)

    return atomic.write_with(path, writer)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
