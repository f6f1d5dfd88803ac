"""MVTec-layout loading: structure, held-out split, decoding, and one-line errors naming the fault."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clbench.data import DatasetError, ImageStore, SampleSet, list_categories, load_category, normalize


def test_loads_category_structure(tiny_root: Path) -> None:
    assert list_categories(tiny_root) == ["alpha", "beta"]
    cat = load_category(tiny_root, "alpha", val_fraction=0.34, seed=0)
    assert len(cat.train) == 4 and len(cat.val) == 2
    assert {s.key for s in cat.train}.isdisjoint({s.key for s in cat.val})
    assert cat.defects == ("spot",)
    assert [s.label for s in cat.test] == [0, 0, 1, 1]
    assert all(s.mask is None for s in cat.test if s.label == 0)
    assert all(s.mask is not None and s.mask.is_file() for s in cat.test if s.label == 1)
    assert cat.image_sizes == ((40, 40),)


def test_split_is_seeded_and_keeps_one_training_image(tiny_root: Path) -> None:
    a = load_category(tiny_root, "alpha", val_fraction=0.5, seed=3)
    b = load_category(tiny_root, "alpha", val_fraction=0.5, seed=3)
    c = load_category(tiny_root, "alpha", val_fraction=0.5, seed=4)
    assert a.val == b.val
    assert {s.key for s in a.val} != {s.key for s in c.val} or len(a.val) == 0
    almost_all = load_category(tiny_root, "alpha", val_fraction=0.99)
    assert len(almost_all.train) == 1


def test_store_decodes_resizes_and_expands_grayscale(tiny_root: Path) -> None:
    store = ImageStore(32)
    cat = load_category(tiny_root, "beta")
    image = store.image(cat.train[0])
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    defect = next(s for s in cat.test if s.label == 1)
    mask = store.mask(defect)
    assert mask.dtype == torch.bool and mask.shape == (32, 32)
    assert 0 < mask.float().mean() < 0.2  # 10x10 of 40x40 = 6.25 %
    good_mask = store.mask(cat.test[0])
    assert not good_mask.any()


def test_batches_and_normalisation(tiny_root: Path) -> None:
    store = ImageStore(32)
    cat = load_category(tiny_root, "alpha")
    batches = list(SampleSet(cat.test, store).batches(3))
    assert [len(b) for b in batches] == [3, 1]
    shuffled = [k for b in SampleSet(cat.test, store).batches(2, shuffle=True, seed=1) for k in b.keys]
    again = [k for b in SampleSet(cat.test, store).batches(2, shuffle=True, seed=1) for k in b.keys]
    assert shuffled == again and sorted(shuffled) == sorted(s.key for s in cat.test)
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(normalize(white)[0, :, 0, 0], expected)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda root: shutil.rmtree(root / "alpha" / "train"), "train/good: missing"),
        (lambda root: [p.unlink() for p in (root / "alpha" / "train" / "good").iterdir()], "train/good: no images"),
        (lambda root: shutil.rmtree(root / "alpha" / "ground_truth"), "ground_truth/spot: missing"),
        (lambda root: (root / "alpha" / "ground_truth" / "spot" / "001_mask.png").unlink(), "001_mask.png: mask missing"),
        (
            lambda root: Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "alpha" / "ground_truth" / "spot" / "000_mask.png"),
            "size 20x20 differs from its image",
        ),
        (lambda root: (root / "alpha" / "test" / "good" / "000.png").write_bytes(b"not a png"), "000.png: unreadable or corrupt"),
    ],
)
def test_bad_layouts_fail_with_one_line_naming_the_path(tiny_root: Path, damage, fragment: str) -> None:
    damage(tiny_root)
    with pytest.raises(DatasetError) as info:
        load_category(tiny_root, "alpha")
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert str(tiny_root / "alpha") in message


def test_missing_root_and_category(tiny_root: Path) -> None:
    with pytest.raises(DatasetError, match="dataset root not found"):
        list_categories(tiny_root / "nope")
    with pytest.raises(DatasetError, match=r"category 'gamma' not found \(available: alpha, beta\)"):
        load_category(tiny_root, "gamma")


def test_truncated_image_is_reported_on_decode(tiny_root: Path) -> None:
    path = tiny_root / "alpha" / "train" / "good" / "000.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixels gone
    with pytest.raises(DatasetError, match="000.png: unreadable or corrupt"):
        load_category(tiny_root, "alpha", verify_images=True)
    cat = load_category(tiny_root, "alpha", val_fraction=0)
    with pytest.raises(DatasetError, match="000.png"):
        ImageStore(32).image(next(s for s in cat.train if s.image == path))
