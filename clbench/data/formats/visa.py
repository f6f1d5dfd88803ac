"""VisA (Visual Anomaly, Amazon 2022) as distributed::

    <root>/split_csv/1cls.csv                      object,split,label,image,mask (paths relative to <root>)
    <root>/<object>/Data/Images/Normal/*.JPG
    <root>/<object>/Data/Images/Anomaly/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png       0/1 values, one file per anomalous image

The split is the 1cls file's (train: normal images; test: normal and anomalous), as anomalib and
the continual-AD papers use it; it names no defect types, so every anomalous image is defect
"anomaly". Masks are linked as they are (0/1: the loader reads every non-zero pixel as a defect).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from clbench.data.dataset import DatasetError
from clbench.data.formats.base import FORMATS, CategoryPlan, DatasetFormat, TestImage, TrainImage

SPLIT_FILE = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": "good", "anomaly": "anomaly"}


@dataclass(frozen=True)
class _Row:
    line: int
    object: str
    split: str
    label: str
    image: Path
    mask: Path | None


@FORMATS.register("visa")
class VisA(DatasetFormat):
    description = "VisA: <object>/Data/{Images,Masks}, split from split_csv/1cls.csv (0/1 masks)"

    def categories(self, src: Path) -> list[str]:
        return sorted({row.object for row in _rows(src)})

    def plan(self, src: Path, category: str) -> CategoryPlan:
        rows = [row for row in _rows(src) if row.object == category]
        if not rows:
            raise DatasetError(f"{src / SPLIT_FILE}: no rows for object '{category}'")
        csv_path = src / SPLIT_FILE
        train: list[TrainImage] = []
        test: list[TestImage] = []
        for row in rows:
            where = f"{csv_path}, line {row.line}"
            defect = LABELS[row.label]
            if row.split == "train":
                if defect != "good":
                    raise DatasetError(f"{where}: an anomalous image in the train split ({row.image})")
                train.append(TrainImage(row.image))
            elif defect == "good":
                test.append(TestImage(row.image, "good"))
            else:
                if row.mask is None:
                    raise DatasetError(f"{where}: anomalous test image {row.image} has no mask path")
                test.append(TestImage(row.image, defect, (row.mask,)))
        return CategoryPlan(
            name=category, train=train, test=test,
            mask_convention="Data/Masks/Anomaly/<stem>.png, 0/1, one file",
            notes=["split from split_csv/1cls.csv, which names no defect types: every anomalous image is "
                   "defect 'anomaly'"],
        )


def _rows(src: Path) -> list[_Row]:
    """The split file's rows, checked (columns, split and label words, paths inside ``src``)."""
    path = src / SPLIT_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing (VisA's split file; expected at split_csv/1cls.csv under the root)")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path}: unreadable split file ({err})") from None
    if not lines or tuple(cell.strip() for cell in lines[0]) != COLUMNS:
        raise DatasetError(f"{path}: header {','.join(lines[0]) if lines else '(empty file)'} "
                           f"is not {','.join(COLUMNS)}")
    rows = []
    for number, cells in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(COLUMNS):
            raise DatasetError(f"{path}, line {number}: {len(cells)} columns, expected {len(COLUMNS)}")
        obj, split, label, image, mask = (cell.strip() for cell in cells)
        if split not in ("train", "test"):
            raise DatasetError(f"{path}, line {number}: split '{split}' is not train or test")
        if label not in LABELS:
            raise DatasetError(f"{path}, line {number}: label '{label}' is not normal or anomaly")
        if not obj or obj.startswith(".") or "/" in obj:
            raise DatasetError(f"{path}, line {number}: object '{obj}' is not a folder name")
        rows.append(_Row(number, obj, split, label, _inside(src, image, path, number),
                         _inside(src, mask, path, number) if mask else None))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _inside(src: Path, relative: str, csv_path: Path, line: int) -> Path:
    """A path of the split file, refused if it leaves the dataset root (``..``, absolute)."""
    path = (src / relative).resolve()
    if not path.is_relative_to(src.resolve()):
        raise DatasetError(f"{csv_path}, line {line}: path {relative} leaves the dataset root {src}")
    return src / relative
