"""``clbench data convert`` as a framework (issue 13, parts 1 and 5), on a tiny VisA-layout source:
nothing is ever written into the source; a destination inside (or containing) the source, a
foreign non-empty one, or one converted from another source is refused; a killed conversion is
completed by running it again (a category is whole or absent); two images that would share a name
are one error naming both; the loader's own-validation-split rule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clbench.cli import main
from clbench.data import DatasetError, load_category, scan_root
from clbench.data.formats import MARKER, convert_dataset, read_conversion_marker
from clbench.data.formats import convert as convert_module
from format_fixtures import mvtec_to_visa, tree_state
from helpers import write_category


@pytest.fixture
def src(tmp_path: Path) -> Path:
    mvtec = tmp_path / "mvtec-src"
    write_category(mvtec, "alpha", size=32)
    write_category(mvtec, "beta", size=32, seed=1)
    return mvtec_to_visa(mvtec, tmp_path / "visa", ["alpha", "beta"])


def test_converting_never_writes_into_the_source(src: Path, tmp_path: Path) -> None:
    before = tree_state(src)
    dst = tmp_path / "out"
    assert convert_dataset("visa", src, dst) == ["alpha", "beta"]
    assert convert_dataset("visa", src, dst) == ["alpha", "beta"]  # again: complete, nothing to do
    with pytest.raises(DatasetError):
        convert_dataset("visa", src, src / "alpha" / "converted")
    assert tree_state(src) == before
    marker = read_conversion_marker(dst)
    assert marker["format"] == "visa" and marker["source"] == str(src.resolve()) and marker["options"] == {}
    assert marker["categories"]["alpha"]["counts"] == {"train": 6, "validation": 0, "test_good": 2,
                                                       "test_anomalous": 2}
    assert marker["categories"]["alpha"]["mask_convention"].endswith("0/1, one file")
    assert "clbench_version" in marker


@pytest.mark.parametrize("where", ["inside", "same", "contains"])
def test_a_destination_overlapping_the_source_is_refused(src: Path, where: str) -> None:
    dst = {"inside": src / "alpha" / "out", "same": src, "contains": src.parent}[where]
    before = tree_state(src)
    with pytest.raises(DatasetError) as err:
        convert_dataset("visa", src, dst)
    assert str(err.value).startswith(f"{dst.resolve()}: the destination {'contains' if where == 'contains' else 'is inside'}")
    assert tree_state(src) == before


def test_a_foreign_or_other_conversions_destination_is_refused(src: Path, tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["data", "convert", "visa", str(src), str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err == (f"clbench: error: {foreign}: not empty and not written by clbench data convert "
                   f"(no {MARKER}): not writing into it; choose a new or empty DST\n")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    dst = tmp_path / "out"
    convert_dataset("visa", src, dst, ["alpha"])
    other = tmp_path / "other-visa"
    other.symlink_to(src)  # another path: the source is recorded resolved, so this one is the same source
    convert_dataset("visa", other, dst, ["beta"])
    assert scan_root(dst).categories == ("alpha", "beta")
    copy = mvtec_to_visa(tmp_path / "mvtec-src", tmp_path / "visa2", ["alpha"])
    with pytest.raises(DatasetError, match=f"^{dst}: converted from {src} as 'visa'"):
        convert_dataset("visa", copy, dst)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="exists and is not a folder"):
        convert_dataset("visa", src, tmp_path / "file")


def test_a_killed_conversion_is_completed_by_running_it_again(src: Path, tmp_path: Path, monkeypatch) -> None:
    dst = tmp_path / "out"
    real = convert_module._write_category

    def killed_in_beta(plan, target):
        if plan.name == "beta":  # half-written, as a kill would leave it
            partial = target / ".beta.partial" / "train" / "good"
            partial.mkdir(parents=True)
            (partial / "000.JPG").symlink_to(src / "nowhere.JPG")
            raise KeyboardInterrupt
        real(plan, target)

    monkeypatch.setattr(convert_module, "_write_category", killed_in_beta)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset("visa", src, dst)
    assert (dst / MARKER).is_file() and (dst / ".beta.partial").is_dir()
    assert scan_root(dst).categories == ("alpha",) and scan_root(dst).incomplete == ()  # beta absent, not half
    alpha = tree_state(dst / "alpha")

    monkeypatch.setattr(convert_module, "_write_category", real)
    assert convert_dataset("visa", src, dst) == ["alpha", "beta"]
    assert not (dst / ".beta.partial").exists()
    assert tree_state(dst / "alpha") == alpha  # complete categories are kept as they are
    assert main(["data", "check", str(dst)]) == 0


def test_two_images_that_would_share_a_name_are_one_error_naming_both(src: Path, tmp_path: Path) -> None:
    extra = src / "alpha" / "Data" / "Images" / "Extra"
    extra.mkdir()
    first = src / "alpha" / "Data" / "Images" / "Normal" / "0000.JPG"
    (extra / "0000.jpg").write_bytes(first.read_bytes())
    with (src / "split_csv" / "1cls.csv").open("a") as handle:
        handle.write("alpha,train,normal,alpha/Data/Images/Extra/0000.jpg,\n")
    with pytest.raises(DatasetError) as err:
        convert_dataset("visa", src, tmp_path / "out")
    assert str(err.value) == (f"{extra / '0000.jpg'}: would be named '0000' in alpha/train/good, as {first} is "
                              "(the loader keys an image and finds its mask by its name)")


def test_merged_masks_of_different_sizes_name_the_file(tmp_path: Path) -> None:
    a, b = tmp_path / "000.png", tmp_path / "001.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(a)
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(b)
    with pytest.raises(DatasetError, match=f"^{b}: size 6x8 differs from {a} \\(8x8\\)"):
        convert_module.merge_masks([a, b])


def test_unknown_formats_and_options_are_one_line(src: Path, tmp_path: Path, capsys) -> None:
    assert main(["data", "convert", "nope", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clbench: error: unknown dataset format 'nope' (available: ") and "visa" in err
    assert main(["data", "convert", "visa", str(src), str(tmp_path / "out"), "--option", "view=1"]) == 2
    assert "format 'visa': unknown option 'view'" in capsys.readouterr().err
    assert main(["data", "convert", "visa", str(src), str(tmp_path / "out"), "--option", "view"]) == 2
    assert "--option view: expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_help_lists_the_formats(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["data", "convert", "--help"])
    out = capsys.readouterr().out
    assert "  visa " in out and "  mvtec_loco " in out


def test_a_validation_folder_is_the_held_out_set(tmp_path: Path) -> None:
    root = tmp_path / "data"
    folder = write_category(root, "alpha", size=32)
    assert load_category(root, "alpha").val_source == "sample"
    (folder / "validation" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"^{folder / 'validation' / 'good'}: no images"):
        load_category(root, "alpha")
    for name in ("100.png", "101.png"):
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(folder / "validation" / "good" / name)
    category = load_category(root, "alpha", val_fraction=0.5)
    assert category.val_source == "validation/good"
    assert [s.image.name for s in category.val] == ["100.png", "101.png"]
    assert len(category.train) == 6  # every train/good image
    assert json.dumps([s.key for s in category.val]) == '["alpha/validation/good/100", "alpha/validation/good/101"]'
