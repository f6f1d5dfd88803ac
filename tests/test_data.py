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


def _position_image(path: Path, size: int) -> None:
    """R = 5 * column, G = 5 * row, B = 7: every pixel says where it is."""
    rows, cols = np.mgrid[0:size, 0:size]
    Image.fromarray(np.stack([5 * cols, 5 * rows, np.full_like(rows, 7)], axis=-1).astype(np.uint8)).save(path)


def test_center_crop_of_known_pixels(tmp_path: Path) -> None:
    """No resize (40 -> 40), crop 32: the crop starts at (4, 4), so pixel (r, c) is the original (r + 4, c + 4);
    the mask is cropped the same way."""
    from clbench.data import Sample

    _position_image(tmp_path / "img.png", 40)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 6:16] = 255
    Image.fromarray(mask).save(tmp_path / "img_mask.png")
    sample = Sample("c/test/spot/img", tmp_path / "img.png", tmp_path / "img_mask.png", 1, "spot")
    store = ImageStore(40, crop=32)
    image = store.image(sample)
    assert image.shape == (3, 32, 32) and store.out_size == 32
    assert image[0, 0, 0] == 5 * 4 and image[1, 0, 0] == 5 * 4          # original (4, 4)
    assert image[0, 3, 10] == 5 * 14 and image[1, 3, 10] == 5 * 7       # original (7, 14)
    assert torch.equal(image[2], torch.full((32, 32), 7, dtype=torch.uint8))
    cropped = store.mask(sample)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[6:16, 2:12] = True
    assert torch.equal(cropped, expected)
    good = Sample("c/test/good/img", tmp_path / "img.png", None, 0, "good")
    assert store.mask(good).shape == (32, 32)


@pytest.mark.parametrize("source, size, crop", [(50, 64, 56), (50, 41, 32), (40, 40, 40)])
def test_resize_then_crop_matches_torchvision(tmp_path: Path, source: int, size: int, crop: int) -> None:
    """Resize to ``size`` (PIL bilinear, masks nearest) then torchvision's CenterCrop offsets (odd margins too)."""
    from torchvision.transforms import functional as TF

    from clbench.data import Sample

    _position_image(tmp_path / "img.png", source)
    mask = np.zeros((source, source), np.uint8)
    mask[7:30, 11:23] = 255
    Image.fromarray(mask).save(tmp_path / "img_mask.png")
    sample = Sample("c/test/spot/img", tmp_path / "img.png", tmp_path / "img_mask.png", 1, "spot")
    store = ImageStore(size, crop=crop)
    with Image.open(tmp_path / "img.png") as img:
        resized = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    reference = TF.center_crop(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1), [crop, crop])
    assert torch.equal(store.image(sample), reference)
    with Image.open(tmp_path / "img_mask.png") as img:
        resized_mask = torch.from_numpy(np.asarray(img.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 127)
    assert torch.equal(store.mask(sample), TF.center_crop(resized_mask[None], [crop, crop])[0])


@pytest.mark.slow
def test_the_method_and_the_replay_buffer_see_the_crop(synthetic_root: Path, tmp_path: Path) -> None:
    """crop_size reaches MethodContext.image_size (maps = masks = crop) and replay stores crop-sized images."""
    import json

    import pandas as pd

    from helpers import engine_run

    run = engine_run("padim", "replay", {"buffer_size": 4}, synthetic_root, tmp_path, image_size=64, crop_size=48,
                     method_params={"backbone": "resnet18", "n_features": 20})
    env = json.loads((run / "env.json").read_text())
    assert env["data"] | {"root": None} == {"root": None, "synthetic": False, "image_size": 64, "crop_size": 48, "eval_size": 48}
    memory = pd.read_csv(run / "memory.csv")
    replay = memory[(memory["component"] == "replay_buffer") & (memory["step"] == 1)]["bytes"].item()
    assert replay == 4 * 3 * 48 * 48
    assert pd.read_csv(run / "metrics.csv")["value"].notna().any()
