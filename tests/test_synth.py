"""The built-in synthetic dataset: MVTec layout, determinism, exact masks, distinct categories."""
from __future__ import annotations

import hashlib
import itertools
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clbench.data import list_categories, load_category, synth
from clbench.data.synth import catalogue, writer

SIZE = 48
SMALL = dict(size=SIZE, n_train=3, n_test_good=2, n_test_per_defect=2)


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _defects(name: str) -> tuple[str, ...]:
    return catalogue._SPECS[name].defects


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, ["stripes", "screw", "nut"], seed=3, **SMALL)
    return out


# -- catalogue ---------------------------------------------------------------------------------


def test_catalogue_is_complete_and_well_named() -> None:
    names = synth.CATEGORY_NAMES
    assert len(names) >= 15 and len(set(names)) == len(names)
    assert len(synth.GRAYSCALE_CATEGORIES) >= 3 and synth.GRAYSCALE_CATEGORIES < set(names)
    kinds = {catalogue._SPECS[n].kind for n in names}
    assert kinds == {"texture", "object"}
    for name in names:
        defects = _defects(name)
        assert 3 <= len(defects) <= 5 and len(set(defects)) == len(defects)
        assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", d) and d in synth.DEFECT_TYPES for d in defects)
    text = synth.describe()
    for name in names:
        assert re.search(rf"^{name}\s.*{', '.join(_defects(name))}$", text, re.M), name
    documented = {line.strip() for line in (synth.__doc__ or "").splitlines()}
    assert set(text.splitlines()) <= documented, "module docstring table is out of date"


# -- layout ------------------------------------------------------------------------------------


def test_layout_is_mvtec(small_set: Path) -> None:
    assert sorted(p.name for p in small_set.iterdir()) == ["nut", "screw", "stripes"]  # no staging left over
    for name in ("stripes", "screw", "nut"):
        cat = small_set / name
        defects = set(_defects(name))
        assert {p.name for p in cat.iterdir()} == {"train", "test", "ground_truth"}
        assert {p.name for p in (cat / "train").iterdir()} == {"good"}
        assert {p.name for p in (cat / "test").iterdir()} == defects | {"good"}
        assert {p.name for p in (cat / "ground_truth").iterdir()} == defects
        assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (cat / "test" / "good").iterdir()) == ["000.png", "001.png"]
        mode = "L" if name in synth.GRAYSCALE_CATEGORIES else "RGB"
        for image in cat.glob("t*/*/*.png"):
            with Image.open(image) as im:
                assert (im.mode, im.size) == (mode, (SIZE, SIZE)), image
        for defect in defects:
            assert sorted(p.name for p in (cat / "test" / defect).iterdir()) == ["000.png", "001.png"]
            masks = sorted(p.name for p in (cat / "ground_truth" / defect).iterdir())
            assert masks == ["000_mask.png", "001_mask.png"]
            for mask in masks:
                with Image.open(cat / "ground_truth" / defect / mask) as im:
                    assert (im.mode, im.size) == ("L", (SIZE, SIZE))


def test_loader_reads_it(small_set: Path) -> None:
    assert list_categories(small_set) == ["nut", "screw", "stripes"]
    cat = load_category(small_set, "nut", verify_images=True)
    assert set(cat.defects) == set(_defects("nut")) and cat.image_sizes == ((SIZE, SIZE),)


# -- determinism -------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(small_set: Path, tmp_path: Path) -> None:
    synth.generate(tmp_path / "again", ["stripes", "screw", "nut"], seed=3, **SMALL)
    assert _tree(tmp_path / "again") == _tree(small_set)
    synth.generate(tmp_path / "other", ["stripes"], seed=4, **SMALL)
    other, first = _tree(tmp_path / "other"), _tree(small_set)
    assert all(other[k] != first[k] for k in other)


def test_common_categories_do_not_depend_on_how_many(tmp_path: Path) -> None:
    counts = dict(size=32, n_train=2, n_test_good=1, n_test_per_defect=1)
    assert synth.generate(tmp_path / "a", 2, **counts) == list(synth.CATEGORY_NAMES[:2])
    assert synth.generate(tmp_path / "b", 4, workers=2, **counts) == list(synth.CATEGORY_NAMES[:4])
    for name in synth.CATEGORY_NAMES[:2]:
        assert _tree(tmp_path / "a" / name) == _tree(tmp_path / "b" / name)


# -- defects and masks -------------------------------------------------------------------------


@pytest.mark.parametrize("name", synth.CATEGORY_NAMES)
def test_masks_are_exactly_the_changed_pixels(name: str) -> None:
    for defect in _defects(name):
        clean, image, mask = synth.render_sample(name, defect, 0, SIZE, seed=1)
        assert mask is not None and mask.dtype == bool
        assert synth.MIN_DEFECT_FRACTION <= mask.mean() <= synth.MAX_DEFECT_FRACTION, (defect, mask.mean())
        diff = np.abs(image.astype(int) - clean.astype(int)).max(axis=2)
        assert (diff[~mask] == 0).all(), f"{defect}: pixels outside the mask changed"
        assert (diff[mask] >= synth.CHANGE_THRESHOLD).all(), f"{defect}: masked pixels barely changed"
        assert diff[mask].mean() > 10 * synth.NOISE_SIGMA * 255  # well above the sensor noise
        if name in synth.GRAYSCALE_CATEGORIES:  # saving channel 0 as "L" loses nothing
            assert (image == image[..., :1]).all() and (clean == clean[..., :1]).all()
    good_clean, good, good_mask = synth.render_sample(name, "test_good", 0, SIZE, seed=1)
    assert good_mask is None and (good == good_clean).all()


def test_saved_files_are_the_rendered_samples(small_set: Path) -> None:
    for name in ("stripes", "screw", "nut"):
        for defect in _defects(name):
            for i in range(2):
                _, image, mask = synth.render_sample(name, defect, i, SIZE, seed=3)
                saved = np.asarray(Image.open(small_set / name / "test" / defect / f"00{i}.png"))
                saved_mask = np.asarray(Image.open(small_set / name / "ground_truth" / defect / f"00{i}_mask.png"))
                expected = image[..., 0] if name in synth.GRAYSCALE_CATEGORIES else image
                assert (saved == expected).all()
                assert set(np.unique(saved_mask)) <= {0, 255} and saved_mask.any()
                assert ((saved_mask == 255) == mask).all()


def test_good_images_vary_but_defects_vary_in_place() -> None:
    goods = [synth.render_sample("nut", "train", i, SIZE)[1].astype(int) for i in range(3)]
    assert all(np.abs(a - b).mean() > 1 for a, b in itertools.combinations(goods, 2))
    masks = [synth.render_sample("stripes", "hole", i, SIZE)[2] for i in range(4)]
    centres = {tuple(np.round(np.argwhere(m).mean(0) / 4)) for m in masks}
    assert len(centres) > 1


# -- categories are distinct -------------------------------------------------------------------


def _stats(image: np.ndarray) -> np.ndarray:
    """Colour means and spreads plus edge energy along x and y: enough to tell categories apart."""
    f = image.astype(np.float32) / 255
    g = f.mean(axis=2)
    return np.r_[f.mean((0, 1)), f.std((0, 1)), np.abs(np.diff(g, axis=1)).mean(), np.abs(np.diff(g, axis=0)).mean()]


def test_categories_differ_from_each_other() -> None:
    feats = {
        n: np.stack([_stats(synth.render_sample(n, "train", i, 64)[1]) for i in range(4)]) for n in synth.CATEGORY_NAMES
    }
    centroids = {n: f.mean(axis=0) for n, f in feats.items()}
    for a, b in itertools.combinations(synth.CATEGORY_NAMES, 2):
        assert np.abs(centroids[a] - centroids[b]).max() > 0.05, (a, b)
    names = list(centroids)
    table = np.stack([centroids[n] for n in names])
    for name, f in feats.items():  # every image is nearest to its own category
        nearest = [names[int(np.argmin(np.abs(table - x).max(axis=1)))] for x in f]
        assert nearest == [name] * len(f)


# -- safe writing ------------------------------------------------------------------------------


def test_existing_category_replaced_only_by_a_complete_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = dict(size=32, n_train=2, n_test_good=1, n_test_per_defect=1)
    synth.synthesize(tmp_path, ["wood"], seed=0, **counts)  # claims the empty folder: wood is clbench's
    before = _tree(tmp_path)
    calls = {"n": 0}
    real_save = writer._save_png

    def failing_save(path: Path, pixels: np.ndarray, gray: bool) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a run killed midway
        real_save(path, pixels, gray)

    monkeypatch.setattr(writer, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path, ["wood"], seed=1, **counts)
    assert _tree(tmp_path) == before  # old category intact, no staging left
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path, ["tile"], seed=0, **counts)
    assert sorted(p.name for p in tmp_path.iterdir()) == [synth.MARKER, "wood"]  # no half-written tile
    monkeypatch.setattr(writer, "_save_png", real_save)
    synth.generate(tmp_path, ["wood"], seed=1, **counts)
    after = _tree(tmp_path)
    assert after.keys() == before.keys() and after != before


def test_stale_staging_of_dead_runs_is_removed(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345  # above Linux's pid_max: no such process
    stale = tmp_path / f".synth-wood-{dead_pid}-abc_12"
    (stale / "wood" / "train" / "good").mkdir(parents=True)
    (stale / synth.STAGING_MARKER).touch()  # what clbench writes first into each staging folder
    look_alike = tmp_path / f".synth-wood-{dead_pid}-users_own"  # same name pattern, not clbench's: kept
    look_alike.mkdir()
    live = tmp_path / f".synth-tile-{os.getpid()}-xyz"
    live.mkdir()
    (live / synth.STAGING_MARKER).touch()
    synth.generate(tmp_path, ["dots"], size=32, n_train=1, n_test_good=1, n_test_per_defect=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, look_alike.name, "dots"]


def test_zero_test_counts_write_no_empty_folders(tmp_path: Path) -> None:
    synth.generate(tmp_path, ["wood"], size=32, n_train=2, n_test_good=0, n_test_per_defect=0)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "wood", "wood/train", "wood/train/good", "wood/train/good/000.png", "wood/train/good/001.png"
    ]


# -- argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(categories=len(synth.CATEGORY_NAMES) + 1), f"categories={len(synth.CATEGORY_NAMES) + 1}"),
        (dict(categories=0), "categories=0"),
        (dict(categories=["stripes", "marble"]), "'marble'"),
        (dict(categories="marble"), "'marble'"),
        (dict(categories=["wood", "wood"]), "duplicates"),
        (dict(size=31), "size=31"),
        (dict(size=64.0), "size=64.0"),
        (dict(seed=-1), "seed=-1"),
        (dict(n_train=-1), "n_train=-1"),
        (dict(n_test_good=-2), "n_test_good=-2"),
        (dict(n_test_per_defect=-3), "n_test_per_defect=-3"),
        (dict(workers=0), "workers=0"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(text)) as info:
        synth.generate(tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written on bad arguments


def test_render_sample_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'crack'"):
        synth.render_sample("stripes", "crack")
    with pytest.raises(ValueError, match="'marble'"):
        synth.render_sample("marble")
    with pytest.raises(ValueError, match="size=16"):
        synth.render_sample("stripes", size=16)
