"""Real-IAD (Wang et al., CVPR 2024) as distributed::

    <src>/realiad_256/<category>/OK/S0001/<category>_0001_OK_C1_<timestamp>.jpg
    <src>/realiad_256/<category>/NG/<defect>/S0071/<...>_C3_<timestamp>.jpg   (+ its .png mask beside it)
    <src>/realiad_jsons/realiad_jsons/<category>.json                         the official split

(also ``realiad_512``, ``realiad_1024``, ``realiad_raw``: option ``resolution``; ``src`` may also be
the ``realiad_<res>`` folder itself.) The split is the JSON's, never the folders': ``{"meta":
{"normal_class": "OK", ...}, "train": [entry, ...], "test": [entry, ...]}`` with entries
``{"category", "anomaly_class", "image_path", "mask_path"}``, paths relative to the category folder
(as Real-IAD's own code and anomalib read them). ``anomaly_class`` equal to the meta's normal class
("OK") is a good image; any other class is the defect type (Real-IAD's codes: AK, BX, CH, HS, PS,
QS, YW, ZW) and needs its mask. Every sample is seen by five cameras (``_C1_`` .. ``_C5_`` in the file
name): option ``view`` keeps some of them (``view=C1``, ``view=C1,C3``; default all five, as the
multi-view protocol of the paper). Another JSON set (single-view ``realiad_jsons_sv``, FUIAD's
noisy ``realiad_jsons_fuiad_0.1``): option ``jsons=<folder>``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from clbench.data.dataset import DatasetError
from clbench.data.formats._files import subfolders
from clbench.data.formats.base import FORMATS, CategoryPlan, DatasetFormat, TestImage, TrainImage

VIEWS = ("C1", "C2", "C3", "C4", "C5")
VIEW_IN_NAME = re.compile(r"_(C\d+)(?=[_.])")
RESOLUTIONS = ("256", "512", "1024", "raw")
JSON_FOLDERS = ("realiad_jsons/realiad_jsons", "realiad_jsons")  # where the split lies, under src or its parent


@FORMATS.register("realiad")
class RealIAD(DatasetFormat):
    description = "Real-IAD: <category>/OK and NG/<defect> (5 camera views), split from realiad_jsons/<category>.json"
    options_help = {
        "view": "camera views to keep: C1..C5, comma-separated (default: all five)",
        "resolution": "image folder realiad_<resolution> under src: 256, 512, 1024 or raw (default: the only one)",
        "jsons": "folder of the split JSONs <category>.json (default: realiad_jsons/realiad_jsons beside the images)",
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.views = self._views(str(self.options.get("view", ",".join(VIEWS))))
        resolution = self.options.get("resolution")
        if resolution is not None and str(resolution) not in RESOLUTIONS:
            raise DatasetError(f"format 'realiad': resolution={resolution} is not one of {', '.join(RESOLUTIONS)}")

    @staticmethod
    def _views(text: str) -> tuple[str, ...]:
        views = tuple(v.strip().upper() for v in text.split(",") if v.strip())
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not views:
            raise DatasetError(f"format 'realiad': view={text} is not a list of camera views ({', '.join(VIEWS)})")
        return views

    def _image_root(self, src: Path) -> Path:
        """The folder holding the categories: ``src/realiad_<res>``, or ``src`` itself."""
        resolution = self.options.get("resolution")
        if resolution is not None:
            root = src / f"realiad_{resolution}"
            if not root.is_dir():
                raise DatasetError(f"{root}: missing (resolution={resolution})")
            return root
        found = [src / f"realiad_{r}" for r in RESOLUTIONS if (src / f"realiad_{r}").is_dir()]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DatasetError(f"{src}: several image folders ({names}): choose one with --option resolution=...")
        return found[0] if found else src

    def _json(self, src: Path, category: str) -> Path:
        if "jsons" in self.options:
            path = Path(str(self.options["jsons"])) / f"{category}.json"
            if not path.is_file():
                raise DatasetError(f"{path}: split JSON missing (option jsons={self.options['jsons']})")
            return path
        tried = [base / folder / f"{category}.json" for base in (src, src.parent) for folder in JSON_FOLDERS]
        for path in tried:
            if path.is_file():
                return path
        raise DatasetError(f"{tried[0]}: split JSON missing (Real-IAD's splits are realiad_jsons/realiad_jsons/"
                           f"<category>.json; give another folder with --option jsons=...)")

    def categories(self, src: Path) -> list[str]:
        root = self._image_root(src)
        found = [p.name for p in subfolders(root) if (p / "OK").is_dir() or (p / "NG").is_dir()]
        if not found:
            raise DatasetError(f"{root}: no Real-IAD category found (expected <category>/OK and <category>/NG)")
        return found

    def plan(self, src: Path, category: str) -> CategoryPlan:
        folder = self._image_root(src) / category
        if not folder.is_dir():
            raise DatasetError(f"{folder}: category '{category}' not found")
        json_path = self._json(src, category)
        split = _read_split(json_path)
        normal = str((split.get("meta") or {}).get("normal_class", "OK"))
        train: list[TrainImage] = []
        test: list[TestImage] = []
        anomalous_train = 0
        for part in ("train", "test"):
            for index, entry in enumerate(split[part]):
                where = f"{json_path} ({part} entry {index})"
                image = _resolve(folder, entry.get("image_path"), where, "image_path")
                if _view(image, where) not in self.views:
                    continue
                defect = str(entry.get("anomaly_class", ""))
                if not defect:
                    raise DatasetError(f"{where}: no anomaly_class")
                if part == "train":
                    anomalous_train += defect != normal
                    train.append(TrainImage(image))
                elif defect == normal:
                    test.append(TestImage(image, "good"))
                else:
                    mask = _resolve(folder, entry.get("mask_path"), where, "mask_path")
                    test.append(TestImage(image, defect, (mask,)))
        views = ",".join(self.views)
        if not train:
            raise DatasetError(f"{json_path}: no training image of view {views}")
        if not test:
            raise DatasetError(f"{json_path}: no test image of view {views}")
        _refuse_shared_names(train, test, json_path)
        notes = [f"camera views {views} only (of {', '.join(VIEWS)}; option view)"] if self.views != VIEWS else []
        if anomalous_train:
            notes.append(f"{json_path}: {anomalous_train} training images are anomalous (a noisy-training split, "
                         "as FUIAD's): kept in train/good, as the split asks")
        return CategoryPlan(category, train, test, mask_convention="mask_path per JSON entry (.png beside the NG "
                                                                   "image), 0/255, one file", notes=notes)


def _read_split(path: Path) -> dict[str, Any]:
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: unreadable split JSON ({err.__class__.__name__}: {err})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "test")):
        raise DatasetError(f"{path}: not a Real-IAD split (expected an object with 'train' and 'test' lists)")
    for part in ("train", "test"):
        for index, entry in enumerate(split[part]):
            if not isinstance(entry, dict):
                raise DatasetError(f"{path} ({part} entry {index}): not an object with image_path and anomaly_class")
    return split


def _resolve(folder: Path, relative: Any, where: str, key: str) -> Path:
    """A JSON path, relative to the category folder; one that leaves it or is missing is refused."""
    if not isinstance(relative, str) or not relative:
        raise DatasetError(f"{where}: no {key}")
    path = folder / relative
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise DatasetError(f"{where}: {key} '{relative}' leaves the category folder {folder}")
    if not path.is_file():
        raise DatasetError(f"{path}: missing, listed as {key} in {where}")
    return path


def _view(image: Path, where: str) -> str:
    found = VIEW_IN_NAME.findall(image.name)
    if not found:
        raise DatasetError(f"{image}: no camera view (_C1_ .. _C5_) in the file name, listed in {where}")
    return found[-1]


def _refuse_shared_names(train: list[TrainImage], test: list[TestImage], json_path: Path) -> None:
    """Converted names are the file stems, per folder (train/good, test/<defect>): two may not meet,
    an image may not be listed twice, nor in both splits (a test image trained on)."""
    trained = {t.image for t in train}
    for t in test:
        if t.image in trained:
            raise DatasetError(f"{t.image}: listed in both train and test of {json_path}")
    seen: dict[tuple[str, str], Path] = {}
    for where, image in [("train", t.image) for t in train] + [(t.defect, t.image) for t in test]:
        first = seen.setdefault((where, image.stem), image)
        if first is not image:
            fault = "is listed twice" if first == image else f"and {first} would share the name '{image.stem}'"
            raise DatasetError(f"{image}: {fault} in {where} of {json_path}")
