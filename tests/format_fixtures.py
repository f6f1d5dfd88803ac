"""Small datasets in the layouts their authors distribute (VisA, MVTec LOCO AD), written by the tests
from an MVTec-layout folder (the synthetic generator's, or ``helpers.write_category``'s), and a
snapshot of a folder tree to prove a conversion never wrote into its source."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".png")


def _mask_of(root: Path, category: str, defect: str, image: Path) -> np.ndarray:
    return np.asarray(Image.open(root / category / "ground_truth" / defect / f"{image.stem}_mask.png")) > 0


def mvtec_to_visa(mvtec: Path, out: Path, categories: list[str]) -> Path:
    """VisA's layout: ``<obj>/Data/Images/{Normal,Anomaly}/*.JPG``, 0/1 masks under
    ``<obj>/Data/Masks/Anomaly``, the split in ``split_csv/1cls.csv`` (paths relative to ``out``)."""
    rows = [["object", "split", "label", "image", "mask"]]
    for cat in categories:
        data = out / cat / "Data"
        for sub in ("Images/Normal", "Images/Anomaly", "Masks/Anomaly"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        normal = 0
        for split, folder in (("train", mvtec / cat / "train" / "good"), ("test", mvtec / cat / "test" / "good")):
            for image in _images(folder):
                name = f"Images/Normal/{normal:04d}.JPG"
                Image.open(image).convert("RGB").save(data / name, format="JPEG", quality=95)
                rows.append([cat, split, "normal", f"{cat}/Data/{name}", ""])
                normal += 1
        anomaly = 0
        for defect_dir in sorted(p for p in (mvtec / cat / "test").iterdir() if p.name != "good"):
            for image in _images(defect_dir):
                name, mask = f"Images/Anomaly/{anomaly:03d}.JPG", f"Masks/Anomaly/{anomaly:03d}.png"
                Image.open(image).convert("RGB").save(data / name, format="JPEG", quality=95)
                Image.fromarray(_mask_of(mvtec, cat, defect_dir.name, image).astype(np.uint8)).save(data / mask)
                rows.append([cat, "test", "anomaly", f"{cat}/Data/{name}", f"{cat}/Data/{mask}"])
                anomaly += 1
    (out / "split_csv").mkdir(parents=True, exist_ok=True)
    with (out / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return out


def mvtec_to_loco(mvtec: Path, out: Path, categories: list[str], n_validation: int = 2) -> Path:
    """MVTec LOCO AD's layout: the last ``n_validation`` train images as ``validation/good``, defect
    types alternately ``logical_anomalies`` / ``structural_anomalies`` (renumbered), and each mask
    split into a folder of parts (``NNN/000.png`` at 255, ``NNN/001.png`` at 128: LOCO's non-255
    values) except the first image of each type, which keeps one mask file."""
    for cat in categories:
        train = _images(mvtec / cat / "train" / "good")
        for split, images in (("train/good", train[:-n_validation]), ("validation/good", train[-n_validation:]),
                              ("test/good", _images(mvtec / cat / "test" / "good"))):
            (out / cat / split).mkdir(parents=True, exist_ok=True)
            for image in images:
                shutil.copyfile(image, out / cat / split / image.name)
        counters = {"logical_anomalies": 0, "structural_anomalies": 0}
        defect_dirs = sorted(p for p in (mvtec / cat / "test").iterdir() if p.name != "good")
        for k, defect_dir in enumerate(defect_dirs):
            loco = ("logical_anomalies", "structural_anomalies")[k % 2]
            for image in _images(defect_dir):
                stem = f"{counters[loco]:03d}"
                (out / cat / "test" / loco).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, out / cat / "test" / loco / f"{stem}.png")
                mask = _mask_of(mvtec, cat, defect_dir.name, image)
                parts = [mask] if counters[loco] == 0 else _halves(mask)
                folder = out / cat / "ground_truth" / loco / stem
                folder.mkdir(parents=True)
                for j, (part, value) in enumerate(zip(parts, (255, 128))):
                    Image.fromarray(part.astype(np.uint8) * value).save(folder / f"{j:03d}.png")
                counters[loco] += 1
    return out


def _halves(mask: np.ndarray) -> list[np.ndarray]:
    """Two overlapping parts whose union is the mask (columns up to and from the defect's middle)."""
    cols = np.nonzero(mask.any(axis=0))[0]
    middle = int(cols.mean()) if len(cols) else mask.shape[1] // 2
    left, right = mask.copy(), mask.copy()
    left[:, middle + 1:] = False
    right[:, :middle] = False
    return [left, right]


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (links not followed) with its size and mtime (ns): equal before
    and after means nothing was written, added or removed there."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.lstat()
            state[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    state["."] = (0, root.lstat().st_mtime_ns)
    return state
