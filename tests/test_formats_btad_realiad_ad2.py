"""BTAD, Real-IAD, MVTec AD 2 and MPDD/MVTec as distributed: each fixture is written by the test in the
format's own layout (from two synthetic categories), then planned, converted, checked and run."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from clbench.cli import main
from clbench.data import DatasetError, load_category
from clbench.data.formats import FORMATS, convert_dataset

N_TRAIN, N_GOOD = 10, 5  # per synthetic category; one image per defect type


@pytest.fixture(scope="module")
def mvtec_src(tmp_path_factory) -> Path:
    """Two synthetic categories in MVTec layout (64 px): the pixels every fixture below re-lays out."""
    from clbench.data.synth import generate

    root = tmp_path_factory.mktemp("mvtec")
    generate(root, categories=2, size=64, seed=0, n_train=N_TRAIN, n_test_good=N_GOOD, n_test_per_defect=1)
    return root


def _categories(src: Path) -> list[str]:
    return sorted(p.name for p in src.iterdir() if (p / "train" / "good").is_dir())


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def _defects(category: Path) -> list[tuple[str, Path, Path]]:
    """(defect, image, mask) of a synthetic category, in a fixed order."""
    return [(d.name, image, category / "ground_truth" / d.name / f"{image.stem}_mask.png")
            for d in sorted((category / "test").iterdir()) if d.name != "good" for image in _pngs(d)]


def _save(source: Path, target: Path) -> Path:
    """``source`` re-encoded as ``target``'s type (.bmp, .jpg) or copied (.png)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".png":
        shutil.copyfile(source, target)
    else:
        with Image.open(source) as img:
            img.convert("RGB" if target.suffix == ".jpg" else img.mode).save(target)
    return target


# ------------------------------------------------------------------------------------------------
# the layouts, as each dataset distributes itself
# ------------------------------------------------------------------------------------------------


def write_btad(mvtec: Path, out: Path) -> Path:
    """Products 01, 02: train/ok, test/ok, test/ko, ground_truth/ko/<stem>; images and masks mix .bmp/.png."""
    for number, name in enumerate(_categories(mvtec), start=1):
        product, category = out / f"{number:02d}", mvtec / name
        for j, image in enumerate(_pngs(category / "train" / "good")):
            _save(image, product / "train" / "ok" / f"{j:04d}{'.bmp' if j % 2 == 0 else '.png'}")
        for j, image in enumerate(_pngs(category / "test" / "good")):
            _save(image, product / "test" / "ok" / f"{j:04d}{'.png' if j % 2 == 0 else '.bmp'}")
        for j, (_, image, mask) in enumerate(_defects(category)):
            _save(image, product / "test" / "ko" / f"{j:04d}{'.bmp' if j % 2 == 0 else '.png'}")
            _save(mask, product / "ground_truth" / "ko" / f"{j:04d}{'.png' if j % 2 == 0 else '.bmp'}")
    return out


def _realiad_name(category: str, sample: int, kind: str, view: int, j: int) -> str:
    return f"{category}_{sample:04d}_{kind}_C{view}_2024010112{j:04d}.jpg"


def write_realiad(mvtec: Path, out: Path) -> Path:
    """realiad_256/<cat>/OK/S..../..._C<v>_....jpg, NG/<defect>/S..../ (+ _mask.png beside), and the split
    realiad_jsons/realiad_jsons/<cat>.json; image i of a group is view C(i % 5 + 1) of sample i // 5."""
    for name in _categories(mvtec):
        category, folder = mvtec / name, out / "realiad_256" / name
        split: dict = {"meta": {"prefix": "", "normal_class": "OK"}, "train": [], "test": []}

        def ok(images: list[Path], first_sample: int, part: str) -> None:
            for j, image in enumerate(images):
                sample = first_sample + j // 5
                rel = f"OK/S{sample:04d}/{_realiad_name(name, sample, 'OK', j % 5 + 1, j)}"
                _save(image, folder / rel)
                split[part].append({"category": name, "anomaly_class": "OK", "image_path": rel, "mask_path": None})

        ok(_pngs(category / "train" / "good"), 1, "train")
        ok(_pngs(category / "test" / "good"), 10, "test")
        for j, (defect, image, mask) in enumerate(_defects(category)):
            sample = 20 + j // 5
            rel = f"NG/{defect}/S{sample:04d}/{_realiad_name(name, sample, 'NG', j % 5 + 1, j)}"
            rel_mask = rel.replace(".jpg", "_mask.png")
            _save(image, folder / rel)
            _save(mask, folder / rel_mask)
            split["test"].append({"category": name, "anomaly_class": defect, "image_path": rel, "mask_path": rel_mask})
        jsons = out / "realiad_jsons" / "realiad_jsons"
        jsons.mkdir(parents=True, exist_ok=True)
        (jsons / f"{name}.json").write_text(json.dumps(split))
    return out


def write_mvtec_ad2(mvtec: Path, out: Path) -> Path:
    """<cat>/train/good, validation/good (the last 2 training images), test_public/{good,bad} with
    ground_truth/bad/<stem>_mask.png, and the mask-less test_private, test_private_mixed."""
    for name in _categories(mvtec):
        category, folder = mvtec / name, out / name
        train = _pngs(category / "train" / "good")
        for j, image in enumerate(train):
            _save(image, folder / ("train" if j < len(train) - 2 else "validation") / "good" / f"{j:03d}_regular.png")
        for j, image in enumerate(_pngs(category / "test" / "good")):
            _save(image, folder / "test_public" / "good" / f"{j:03d}_regular.png")
            _save(image, folder / "test_private" / f"{j:03d}_regular.png")
            _save(image, folder / "test_private_mixed" / f"{j:03d}_mixed.png")
        for j, (_, image, mask) in enumerate(_defects(category)):
            _save(image, folder / "test_public" / "bad" / f"{j:03d}_regular.png")
            _save(mask, folder / "test_public" / "ground_truth" / "bad" / f"{j:03d}_regular_mask.png")
    return out


WRITERS = {"btad": write_btad, "realiad": write_realiad, "mvtec_ad2": write_mvtec_ad2,
           "mpdd": lambda mvtec, out: shutil.copytree(mvtec, out)}


# ------------------------------------------------------------------------------------------------
# BTAD
# ------------------------------------------------------------------------------------------------


def test_btad_plan_pairs_bmp_and_png_masks_by_stem(mvtec_src: Path, tmp_path: Path) -> None:
    src = write_btad(mvtec_src, tmp_path / "btad")
    fmt = FORMATS.get("btad")()
    assert fmt.categories(src) == ["01", "02"]
    plan = fmt.plan(src, "01")  # nut: 5 defect types, one image each
    assert len(plan.train) == N_TRAIN and {t.image.suffix for t in plan.train} == {".bmp", ".png"}
    assert [t.defect for t in plan.test].count("good") == N_GOOD
    bad = [t for t in plan.test if t.defect != "good"]
    assert len(bad) == 5 and {t.defect for t in bad} == {"ko"}
    assert all(len(t.masks) == 1 and t.masks[0].stem == t.image.stem and t.masks[0].parent.name == "ko" for t in bad)
    assert {t.masks[0].suffix for t in bad} == {".bmp", ".png"}
    assert "0/255" in plan.mask_convention


def test_btad_missing_mask_is_one_line_naming_it(mvtec_src: Path, tmp_path: Path) -> None:
    src = write_btad(mvtec_src, tmp_path / "btad")
    (src / "02" / "ground_truth" / "ko" / "0001.bmp").unlink()
    with pytest.raises(DatasetError) as err:
        FORMATS.get("btad")().plan(src, "02")
    assert str(err.value).startswith(f"{src / '02' / 'ground_truth' / 'ko' / '0001.png'}: mask missing for test "
                                     f"image {src / '02' / 'test' / 'ko' / '0001.png'}")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# Real-IAD
# ------------------------------------------------------------------------------------------------


def test_realiad_plan_follows_the_json_split(mvtec_src: Path, tmp_path: Path) -> None:
    src = write_realiad(mvtec_src, tmp_path / "Real-IAD")
    fmt = FORMATS.get("realiad")()
    names = _categories(mvtec_src)
    assert fmt.categories(src) == names
    plan = fmt.plan(src, names[1])  # stripes: scratch, color_spot, hole, deformation
    assert len(plan.train) == N_TRAIN and all("_OK_" in t.image.name for t in plan.train)
    assert [t.defect for t in plan.test].count("good") == N_GOOD
    bad = [t for t in plan.test if t.defect != "good"]
    assert sorted(t.defect for t in bad) == ["color_spot", "deformation", "hole", "scratch"]
    assert all(t.masks == (t.image.with_name(t.image.stem + "_mask.png"),) for t in bad)
    assert plan.notes == []


@pytest.mark.parametrize("view, n_train, n_good, n_bad", [("C1", 2, 1, 1), ("C1,c2", 4, 2, 2), ("C5", 2, 1, 0)])
def test_realiad_view_filter_keeps_those_cameras(mvtec_src: Path, tmp_path: Path, view: str, n_train: int,
                                                 n_good: int, n_bad: int) -> None:
    """Image i of each group is view C(i % 5 + 1): 10 train -> 2 per view, 5 good -> 1, 4 defects -> C1..C4."""
    src = write_realiad(mvtec_src, tmp_path / "Real-IAD")
    plan = FORMATS.get("realiad")(view=view).plan(src, "stripes")
    kept = {v.strip().upper() for v in view.split(",")}
    assert len(plan.train) == n_train
    assert [t.defect == "good" for t in plan.test].count(True) == n_good
    assert [t.defect != "good" for t in plan.test].count(True) == n_bad
    assert all(any(f"_{v}_" in t.image.name for v in kept) for t in [*plan.train, *plan.test])
    assert plan.notes and plan.notes[0].startswith("camera views ")


def test_realiad_src_may_be_the_image_folder_and_jsons_may_lie_elsewhere(mvtec_src: Path, tmp_path: Path) -> None:
    src = write_realiad(mvtec_src, tmp_path / "Real-IAD")
    whole = FORMATS.get("realiad")().plan(src, "nut")
    assert FORMATS.get("realiad")().plan(src / "realiad_256", "nut") == whole  # the split found beside it
    elsewhere = shutil.move(src / "realiad_jsons", tmp_path / "splits")
    with pytest.raises(DatasetError, match=r"nut\.json: split JSON missing .*--option jsons=\.\.\.\)$"):
        FORMATS.get("realiad")().plan(src, "nut")
    assert FORMATS.get("realiad")(jsons=str(Path(elsewhere) / "realiad_jsons")).plan(src, "nut") == whole
    (src / "realiad_512").mkdir()
    with pytest.raises(DatasetError, match=r"several image folders \(realiad_256, realiad_512\): choose one"):
        FORMATS.get("realiad")().categories(src)
    assert FORMATS.get("realiad")(resolution="256").categories(src) == ["nut", "stripes"]


def test_realiad_unknown_view_is_refused() -> None:
    with pytest.raises(DatasetError, match=r"^format 'realiad': view=C6 is not a list of camera views \(C1, C2"):
        FORMATS.get("realiad")(view="C6")


@pytest.mark.parametrize("key", ["image_path", "mask_path"])
def test_realiad_json_entry_to_a_missing_file_names_it(mvtec_src: Path, tmp_path: Path, key: str) -> None:
    src = write_realiad(mvtec_src, tmp_path / "Real-IAD")
    json_path = src / "realiad_jsons" / "realiad_jsons" / "nut.json"
    split = json.loads(json_path.read_text())
    index = len(split["test"]) - 1  # an NG entry: it has both paths
    missing = src / "realiad_256" / "nut" / split["test"][index][key]
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        FORMATS.get("realiad")().plan(src, "nut")
    assert str(err.value) == f"{missing}: missing, listed as {key} in {json_path} (test entry {index})"


def test_realiad_refuses_a_json_path_leaving_the_category(mvtec_src: Path, tmp_path: Path) -> None:
    src = write_realiad(mvtec_src, tmp_path / "Real-IAD")
    json_path = src / "realiad_jsons" / "realiad_jsons" / "nut.json"
    split = json.loads(json_path.read_text())
    split["train"][0]["image_path"] = "../stripes/" + split["train"][0]["image_path"]
    json_path.write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"\(train entry 0\): image_path '\.\./stripes/OK/.*' leaves the category"):
        FORMATS.get("realiad")().plan(src, "nut")


def test_realiad_test_image_listed_in_train_is_refused(mvtec_src: Path, tmp_path: Path) -> None:
    src = write_realiad(mvtec_src, tmp_path / "Real-IAD")
    json_path = src / "realiad_jsons" / "realiad_jsons" / "nut.json"
    split = json.loads(json_path.read_text())
    split["test"].append(dict(split["train"][3]))
    json_path.write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"listed in both train and test of .*nut\.json$"):
        FORMATS.get("realiad")().plan(src, "nut")


# ------------------------------------------------------------------------------------------------
# MVTec AD 2
# ------------------------------------------------------------------------------------------------


def test_mvtec_ad2_plan_has_its_validation_split(mvtec_src: Path, tmp_path: Path) -> None:
    src = write_mvtec_ad2(mvtec_src, tmp_path / "mvtec_ad2")
    plan = FORMATS.get("mvtec_ad2")().plan(src, "nut")  # 5 defect types
    assert len(plan.train) == N_TRAIN - 2 and len(plan.validation) == 2
    assert all(v.image.parent == src / "nut" / "validation" / "good" for v in plan.validation)
    assert [t.defect for t in plan.test].count("good") == N_GOOD
    bad = [t for t in plan.test if t.defect != "good"]
    assert len(bad) == 5 and {t.defect for t in bad} == {"bad"}
    assert all(t.masks == (src / "nut" / "test_public" / "ground_truth" / "bad" / f"{t.image.stem}_mask.png",)
               for t in bad)
    assert not any("test_private" in str(t.image) for t in plan.test)


@pytest.mark.parametrize("split", ["test_private", "test_private_mixed"])
def test_mvtec_ad2_private_split_is_refused_with_why(split: str) -> None:
    with pytest.raises(DatasetError) as err:
        FORMATS.get("mvtec_ad2")(split=split)
    assert str(err.value).startswith(f"format 'mvtec_ad2': split={split} has no masks")
    assert "pixel metrics need them" in str(err.value) and "evaluation server" in str(err.value)


def test_mvtec_ad2_missing_mask_is_one_line(mvtec_src: Path, tmp_path: Path) -> None:
    src = write_mvtec_ad2(mvtec_src, tmp_path / "mvtec_ad2")
    mask = src / "stripes" / "test_public" / "ground_truth" / "bad" / "002_regular_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError) as err:
        FORMATS.get("mvtec_ad2")().plan(src, "stripes")
    image = src / "stripes" / "test_public" / "bad" / "002_regular.png"
    assert str(err.value) == f"{mask}: mask missing for test image {image}"


# ------------------------------------------------------------------------------------------------
# MPDD and any MVTec-layout set
# ------------------------------------------------------------------------------------------------


def test_mpdd_layout_is_read_as_it_is_and_linked_as_it_is(mvtec_src: Path, tmp_path: Path) -> None:
    """An MVTec-layout set (MPDD) needs no conversion: the loader reads it; 'mpdd'/'mvtec' plan the same files."""
    src = WRITERS["mpdd"](mvtec_src, tmp_path / "mpdd")
    category = load_category(src, "nut")
    assert len(category.train) + len(category.val) == N_TRAIN and len(category.defects) == 5
    plans = [FORMATS.get(name)().plan(src, "nut") for name in ("mpdd", "mvtec")]
    assert plans[0] == plans[1]
    assert sorted(t.image for t in plans[0].test) == sorted(s.image for s in category.test)
    assert all(t.masks == ((t.image.parents[2] / "ground_truth" / t.defect / f"{t.image.stem}_mask.png",)
                           if t.defect != "good" else ()) for t in plans[0].test)
    assert plans[0].mask_convention == "suffix _mask.png, 0/255, one file"


def test_mpdd_bad_layout_is_the_loaders_line(mvtec_src: Path, tmp_path: Path) -> None:
    src = WRITERS["mpdd"](mvtec_src, tmp_path / "mpdd")
    mask = src / "nut" / "ground_truth" / "hole" / "000_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError, match=f"^{mask}: mask missing for test image"):
        FORMATS.get("mpdd")().plan(src, "nut")


# ------------------------------------------------------------------------------------------------
# end to end: convert, data check, a 2-task PaDiM run
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("format_name", sorted(WRITERS))
def test_format_converts_checks_and_runs(mvtec_src: Path, tmp_path: Path, format_name: str, capsys) -> None:
    from helpers import engine_run

    from clbench.engine.rundir import RunFolder, accuracy_matrix

    src = WRITERS[format_name](mvtec_src, tmp_path / "src")
    before = sorted(str(p) for p in src.rglob("*"))
    dst = tmp_path / "converted"
    names = convert_dataset(format_name, src, dst)
    assert len(names) == 2 and sorted(str(p) for p in src.rglob("*")) == before  # nothing written into SRC
    assert main(["data", "check", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "2 categories OK" in out and f"as '{format_name}'" in out
    run = engine_run("padim", "sequential", {}, dst, tmp_path / "runs", tasks=names, backbone="resnet18")
    matrix = accuracy_matrix(RunFolder(run).metrics(), "pixel_auroc")
    assert matrix.shape == (2, 2) and all(math.isfinite(v) for v in matrix.to_numpy().ravel())
    with capsys.disabled():  # the closing note's table: format -> the check's line -> pixel AUROC
        line = next(row for row in out.splitlines() if row.strip().startswith(names[0]))
        print(f"\n[{format_name}] {line.strip()} | pixel AUROC final step: {matrix.iloc[-1].round(3).to_dict()}")
