"""VisA and MVTec LOCO AD (issue 13, parts 1, 2, 5): a fixture in each format's own layout, written
here from the synthetic generator, converted to MVTec layout by links; ``data check`` passes and
prints the mask convention; LOCO's several masks per image are merged (their OR), its validation
split is the held-out set; a bad source is one line naming the file; a 2-task PaDiM run completes
with a finite pixel AUROC (slow)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clbench.cli import main
from clbench.data import DatasetError, load_category, scan_root
from clbench.data.formats import convert_dataset
from format_fixtures import mvtec_to_loco, mvtec_to_visa
from helpers import engine_run


@pytest.fixture(scope="module")
def two_synthetic(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two synthetic categories at 64 px (MVTec layout), the source of both formats' fixtures."""
    from clbench.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, categories=2, size=64, seed=0, n_train=8, n_test_good=3, n_test_per_defect=2)
    return root, scan_root(root).categories


@pytest.fixture
def visa(two_synthetic, tmp_path: Path) -> Path:
    root, cats = two_synthetic
    return mvtec_to_visa(root, tmp_path / "visa", list(cats))


@pytest.fixture
def loco(two_synthetic, tmp_path: Path) -> Path:
    root, cats = two_synthetic
    return mvtec_to_loco(root, tmp_path / "loco", list(cats))


def _counts(root: Path, name: str) -> tuple[int, int, int, int]:
    category = load_category(root, name)
    return (len(category.train), len(category.val), sum(s.label == 0 for s in category.test),
            sum(s.label == 1 for s in category.test))


# -- VisA ------------------------------------------------------------------------------------------


def test_visa_converts_by_links_and_checks(visa: Path, two_synthetic, tmp_path: Path, capsys) -> None:
    synth, cats = two_synthetic
    dst = tmp_path / "mvtec"
    assert main(["data", "convert", "visa", str(visa), str(dst)]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    n_defect = sum(len(list(d.iterdir())) for d in (synth / cats[0] / "test").iterdir() if d.name != "good")
    assert first == (f"{cats[0]}: train 8, validation 0, test good 3, test anomalous {n_defect}; defects: anomaly; "
                     "masks: Data/Masks/Anomaly/<stem>.png, 0/1, one file")
    assert "note: split from split_csv/1cls.csv" in out
    image = dst / cats[0] / "test" / "anomaly" / "000.JPG"
    mask = dst / cats[0] / "ground_truth" / "anomaly" / "000_mask.png"
    assert image.is_symlink() and os.readlink(image) == str(visa / cats[0] / "Data" / "Images" / "Anomaly" / "000.JPG")
    assert mask.is_symlink() and os.path.isabs(os.readlink(mask))
    assert set(np.unique(np.asarray(Image.open(mask)))) == {0, 1}  # linked as is: VisA's 0/1
    assert _counts(dst, cats[0]) == (8 - 1, 1, 3, n_defect)  # no validation split: a sample of train/good

    assert main(["data", "check", str(dst)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[0] == cats[0])
    assert "0/1 png" in row and "anomaly" in row and "64x64" in row
    assert f"{dst / cats[0]}: converted from {visa} as 'visa'; source masks: Data/Masks/Anomaly/<stem>.png, 0/1" in out
    assert "hidden entries ignored" not in out  # the conversion marker is reported as the source instead
    assert out.splitlines()[-1] == "2 categories OK"


def test_visa_categories_option_converts_only_those(visa: Path, two_synthetic, tmp_path: Path) -> None:
    _, cats = two_synthetic
    assert convert_dataset("visa", visa, tmp_path / "one", [cats[1]]) == [cats[1]]
    assert scan_root(tmp_path / "one").categories == (cats[1],)
    with pytest.raises(DatasetError, match=f"category 'nope' not found \\(available: {cats[0]}, {cats[1]}\\)"):
        convert_dataset("visa", visa, tmp_path / "two", ["nope"])


@pytest.mark.parametrize("fault", ["missing csv", "missing mask", "bad label", "bad header", "path outside"])
def test_visa_bad_source_is_one_line_naming_the_file(visa: Path, tmp_path: Path, fault: str) -> None:
    csv_path = visa / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    if fault == "missing csv":
        csv_path.unlink()
        expected = f"{csv_path}: missing"
    elif fault == "missing mask":
        mask = visa / lines[-1].split(",")[-1]
        mask.unlink()
        expected = f"{mask}: missing"
    elif fault == "bad label":
        lines[3] = lines[3].replace("normal", "ok")
        expected = f"{csv_path}, line 4: label 'ok' is not normal or anomaly"
    elif fault == "bad header":
        lines[0] = "object,split,label,image"
        expected = f"{csv_path}: header object,split,label,image is not object,split,label,image,mask"
    else:
        lines[2] = lines[2].replace(lines[2].split(",")[3], "../../etc/passwd")
        expected = f"{csv_path}, line 3: path ../../etc/passwd leaves the dataset root"
    if fault != "missing csv":
        csv_path.write_text("\n".join(lines) + "\n")
    dst = tmp_path / "out"
    assert main(["data", "convert", "visa", str(visa), str(dst)]) == 2
    with pytest.raises(DatasetError) as err:
        convert_dataset("visa", visa, dst)
    message = str(err.value)
    assert message.startswith(expected) and "\n" not in message
    assert not dst.exists()  # every source file is checked before anything is written


# -- MVTec LOCO AD ---------------------------------------------------------------------------------


def test_loco_merges_masks_and_keeps_its_validation_split(loco: Path, two_synthetic, tmp_path: Path,
                                                          capsys) -> None:
    synth, cats = two_synthetic
    dst = tmp_path / "mvtec"
    assert convert_dataset("mvtec_loco", loco, dst) == list(cats)
    cat = cats[0]
    parts_root = loco / cat / "ground_truth"
    merged = 0
    for defect in ("logical_anomalies", "structural_anomalies"):
        for folder in sorted((parts_root / defect).iterdir()):
            target = dst / cat / "ground_truth" / defect / f"{folder.name}_mask.png"
            parts = sorted(folder.iterdir())
            union = np.logical_or.reduce([np.asarray(Image.open(p)) != 0 for p in parts])
            if len(parts) == 1:
                assert target.is_symlink() and os.readlink(target) == str(parts[0])
            else:
                merged += 1
                assert not target.is_symlink()
                written = np.asarray(Image.open(target))
                assert set(np.unique(written)) <= {0, 255} and np.array_equal(written > 0, union)
                assert union.sum() > max((np.asarray(Image.open(p)) != 0).sum() for p in parts)  # both parts count
    assert merged >= 2

    category = load_category(dst, cat, val_fraction=0.5)
    assert category.val_source == "validation/good"
    assert len(category.train) == 6 and len(category.val) == 2  # all of train/good; val_fraction unused
    assert all(s.key.startswith(f"{cat}/validation/good/") for s in category.val)
    assert set(category.defects) == {"logical_anomalies", "structural_anomalies"}

    assert main(["data", "check", str(dst)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[0] == cat)
    assert "0/255 png" in row and "logical_anomalies, structural_anomalies" in row
    assert f"{dst / cat / 'validation/good'}: the held-out set (2 images; all of train/good is trained on)" in out
    assert "source masks: folder per image" in out and "masks merged into 0/255 PNGs" in out


@pytest.mark.parametrize("fault", ["mask folder", "mask files"])
def test_loco_missing_masks_are_one_line_naming_the_folder(loco: Path, two_synthetic, tmp_path: Path,
                                                           fault: str) -> None:
    _, cats = two_synthetic
    folder = loco / cats[1] / "ground_truth" / "structural_anomalies" / "001"
    for part in folder.iterdir():
        part.unlink()
    if fault == "mask folder":
        folder.rmdir()
    with pytest.raises(DatasetError) as err:
        convert_dataset("mvtec_loco", loco, tmp_path / "out")
    assert str(err.value).startswith(f"{folder}: {'missing' if fault == 'mask folder' else 'no mask files'}")
    assert not (tmp_path / "out").exists()


# -- a run on each converted format ----------------------------------------------------------------


def _pixel_auroc(run: Path) -> list[float]:
    metrics = pd.read_csv(run / "metrics.csv")
    return metrics[metrics["metric"] == "pixel_auroc"]["value"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["visa", "mvtec_loco"])
def test_a_two_task_padim_run_on_the_converted_format(fmt: str, two_synthetic, tmp_path: Path) -> None:
    synth, cats = two_synthetic
    write = mvtec_to_visa if fmt == "visa" else mvtec_to_loco
    src = write(synth, tmp_path / fmt, list(cats))
    dst = tmp_path / "mvtec"
    convert_dataset(fmt, src, dst)
    run = engine_run("padim", "sequential", {}, dst, tmp_path / "runs", backbone="resnet18", name=fmt)
    values = _pixel_auroc(run)
    assert len(values) == 4 and all(math.isfinite(v) for v in values)  # 2 steps x 2 evaluated tasks
    held_out = json.loads((run / "env.json").read_text())["held_out"]
    if fmt == "mvtec_loco":
        assert set(held_out["own_split"]) == set(cats) and held_out["counts"] == {c: 2 for c in cats}
    else:
        assert "own_split" not in held_out
