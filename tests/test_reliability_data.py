"""Issue 11, the data faults: synthetic data only where asked, safe `data synth`, image and mask
decoding (16-bit, palette, alpha, CMYK, 0/1 masks), empty masks, duplicate stems, decompression
bombs, hidden entries, folders without train/good, symlink loops, unclear task errors and a
`data check` that reports each of them. Tests are named after the case ids of
shared/reliability/cases-2026-11-30.tsv; each case is rebuilt here on tiny images."""
from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clbench.data import synth
from clbench.data.synth import writer
from clbench.cli import main
from clbench.engine.config import RunConfig
from clbench.data import DatasetError, ImageStore, Sample, list_categories, load_category
from clbench.data.root import ensure_dataset
from helpers import write_category

RUN = ["run", "--method", "padim", "--image-size", "32", "--weights", "none", "--device", "cpu", "--no-progress"]
SMALL = dict(size=32, n_train=3, n_test_good=1, n_test_per_defect=1)


# -- helpers -------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes): what must stay untouched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (grey HxW or RGB HxWx3), independent of Pillow's encoder."""
    h, w = array.shape[:2]
    color_type = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _bomb_png(side: int = 20000) -> bytes:
    """Only a header claiming side x side pixels: Pillow refuses it on open as a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _decoded(path: Path, size: int) -> np.ndarray:
    """What a run sees of an image at its own size (no resize): HxWx3 uint8."""
    sample = Sample("c/train/good/x", path, None, 0, "good")
    return ImageStore(size).image(sample).permute(1, 2, 0).numpy()


def _mask(path: Path, size: int, label: int = 1) -> np.ndarray:
    sample = Sample("c/test/spot/x", path, path, label, "spot")
    return ImageStore(size).mask(sample).numpy()


def _run(capsys, root: Path, out: Path, *args: str) -> tuple[int, str, str]:
    code = main([*RUN, "--data-root", str(root), "--output", str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clbench: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def two(tmp_path: Path) -> Path:
    """Two valid 32 px categories, alpha and beta."""
    root = tmp_path / "ds"
    write_category(root, "alpha", size=32)
    write_category(root, "beta", size=32, seed=1)
    return root


# -- 1. synthetic data only where asked (D01, D22, D23) ----------------------------------------------


def test_D01_mistyped_data_root_is_an_error_not_synthetic_data(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, Path("nonexistent_root"), Path("out"), "--tasks", "2", "--name", "d01")
    line = _one_line_error(err)
    assert code == 2 and "data_root: nonexistent_root not found" in line
    assert not Path("nonexistent_root").exists() and not Path("out").exists()  # nothing generated or created


def test_D01_yaml_with_synthetic_auto_does_not_generate_at_another_root(tmp_path: Path, capsys, monkeypatch) -> None:
    """The shipped configs say `synthetic: auto`: with a mistyped --data-root they stop too."""
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    code = main(["run", "--config", str(config), "--data-root", "data/synthtic", "--output", "out"])
    assert code == 2 and "data/synthtic not found" in _one_line_error(capsys.readouterr().err)
    assert not Path("data").exists()


def test_D01_synthetic_data_is_generated_at_the_default_root_or_when_asked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ensure_dataset(RunConfig(tasks=1, image_size=32))  # the quickstart's default root: auto generates
    assert list_categories("data/synthetic") == [sorted(synth.CATEGORY_NAMES)[0]]
    ensure_dataset(RunConfig(data_root="elsewhere", synthetic=True, tasks=["wood"], image_size=32))  # asked for
    assert list_categories("elsewhere") == ["wood"]
    with pytest.raises(DatasetError, match="data_root: other not found .*synthetic: false"):
        ensure_dataset(RunConfig(data_root="other", synthetic=False, tasks=1))


def test_synthetic_auto_is_a_valid_value_and_others_are_not() -> None:
    from clbench.engine.config import ConfigError, from_mapping

    assert from_mapping({"synthetic": "auto"}).synthetic == "auto"
    assert RunConfig().synthetic == "auto"
    with pytest.raises(ConfigError, match="synthetic='yes' is not one of auto, true, false"):
        from_mapping({"synthetic": "yes"})


def _legacy_marked_root(root: Path, n: int = 4) -> None:
    """What the old runner left: generated categories and a marker without a category list."""
    synth.generate(root, n, workers=1, **SMALL)
    (root / ".clbench-synthetic.json").write_text(json.dumps({"generator": "clbench.synth", "size": 32, "seed": 0}))


def test_D22_marked_dataset_that_has_the_tasks_is_never_written(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "d22"
    _legacy_marked_root(root)
    before = _tree(root)

    def no_generation(*args, **kwargs):
        raise AssertionError("generated into a dataset that has every category the tasks need")

    monkeypatch.setattr(writer, "generate", no_generation)
    os.chmod(root, 0o555)
    try:
        for synthetic in (True, "auto"):
            assert ensure_dataset(RunConfig(data_root=str(root), synthetic=synthetic, tasks=2, image_size=32)) == root
    finally:
        os.chmod(root, 0o755)
    assert _tree(root) == before


def test_D22_only_the_missing_categories_the_tasks_need_are_generated(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "d22"
    _legacy_marked_root(root, n=1)  # stripes
    calls = []
    real = synth.generate

    def counting(out, categories, *args, **kwargs):
        calls.append(list(categories))
        return real(out, categories, *args, **kwargs)

    monkeypatch.setattr(writer, "generate", counting)
    ensure_dataset(RunConfig(data_root=str(root), synthetic=True, tasks=2, image_size=32))
    assert calls == [[sorted(synth.CATEGORY_NAMES)[0]]]  # one more for a count of 2, not 14


def test_D22_a_failed_write_is_one_line_naming_the_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "d22"
    _legacy_marked_root(root, n=1)
    config = tmp_path / "c.yaml"
    config.write_text("synthetic: true\n")

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("clbench.engine.atomic.write_json", read_only)
    code, _, err = _run(capsys, root, tmp_path / "out", "--config", str(config), "--tasks", "3", "--name", "d22")
    line = _one_line_error(err)
    assert code == 2 and "cannot write the synthetic dataset (Permission denied)" in line and str(root) in line


def test_D23_data_synth_refuses_a_folder_of_the_users(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d23"
    write_category(out, "capsule", size=32)  # the user's category, named like a synthetic one
    before = _tree(out)
    code = main(["data", "synth", "--out", str(out), "--categories", "4", "--size", "32"])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and str(out) in line and "not writing into it" in line
    assert _tree(out) == before


def test_D23_a_users_category_in_a_clbench_folder_is_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    assert synth.synthesize(out, ["stripes"], workers=1, **SMALL) == ["stripes"]
    write_category(out, "wood", size=32)  # the user adds a category of their own to it
    before = _tree(out / "wood")
    with pytest.raises(ValueError, match=r"wood: exists and was not generated by clbench"):
        synth.synthesize(out, ["stripes", "wood"], workers=1, **SMALL)
    with pytest.raises(ValueError, match=r"wood: exists and was not generated by clbench"):
        synth.generate(out, ["wood"], workers=1, **SMALL)
    assert _tree(out / "wood") == before


def test_D23_an_empty_folder_is_claimed_and_a_clbench_folder_completed(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    synth.synthesize(out, ["stripes"], workers=1, **SMALL)
    first = _tree(out / "stripes")
    synth.synthesize(out, ["stripes", "nut"], workers=1, **SMALL)
    assert list_categories(out) == ["nut", "stripes"] and _tree(out / "stripes") == first
    marker = json.loads((out / synth.MARKER).read_text())
    assert set(marker["categories"]) == {"stripes", "nut"} and marker["categories"]["nut"]["size"] == 32


def test_D23_data_synth_into_a_file_is_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "file"
    path.write_text("mine")
    assert main(["data", "synth", "--out", str(path), "--categories", "1", "--size", "32"]) == 2
    assert "is a file" in _one_line_error(capsys.readouterr().err) and path.read_text() == "mine"


# -- 2. image decoding (D13) -------------------------------------------------------------------------


def test_D13_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32768], [40000, 65280, 65534, 65535]], np.uint16)
    expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)  # round(v * 255 / 65535)
    path = tmp_path / "grey16.png"
    path.write_bytes(_png16(np.kron(values, np.ones((16, 8), np.uint16))))  # 32x32: decoded without resize
    decoded = _decoded(path, 32)
    assert np.array_equal(decoded[..., 0], np.kron(expected, np.ones((16, 8), np.uint8)))
    assert np.array_equal(decoded[..., 0], decoded[..., 2])
    assert len(np.unique(decoded)) == len(np.unique(expected)) == 7  # not all white (65534 rounds to 255)


def _outside_loaders():
    """The image loaders outside the dataset (EfficientAD's distillation and penalty folders,
    DRAEM's texture folder), each as folder -> uint8 (N, 3, 32, 32)."""
    from methods.efficientad.distill import load_images
    from methods.efficientad.penalty import folder_images
    from methods.draem.simulator import AnomalySource

    def textures(folder: Path):
        source = AnomalySource(folder, 32)
        return np.stack([source._image(i).numpy() for i in range(len(source.paths))])

    return {"pdn.load_images": lambda folder: load_images(folder, 32).numpy(),
            "penalty.folder_images": lambda folder: folder_images(folder, 5, 16).numpy(),
            "perlin.AnomalySource": textures}


@pytest.mark.parametrize("loader", ["pdn.load_images", "penalty.folder_images", "perlin.AnomalySource"])
def test_D13_outside_loaders_scale_16_bit_and_name_bad_files(tmp_path: Path, loader: str) -> None:
    """They used convert("RGB"): a 16-bit mid-grey image came out white."""
    load = _outside_loaders()[loader]
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "grey16.png").write_bytes(_png16(np.full((32, 32), 32768, np.uint16)))
    assert np.all(load(folder) == 128)  # round(32768 / 257), not 255
    for name, payload in (("bomb.png", _bomb_png()), ("broken.png", b"\x89PNG\r\n\x1a\n not an image")):
        bad = folder / name
        bad.write_bytes(payload)
        with pytest.raises(DatasetError, match=f"^{re.escape(str(bad))}: ") as err:
            load(folder)
        assert "\n" not in str(err.value)
        bad.unlink()


def test_D13_16_bit_grey_tiff_too(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)
    path = tmp_path / "grey16.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    assert np.array_equal(_decoded(path, 32)[..., 1], np.floor(values / 257.0 + 0.5).astype(np.uint8))


def test_D13_48_bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    path = tmp_path / "rgb48.png"
    path.write_bytes(_png16(values))
    decoded = _decoded(path, 32).astype(int)
    assert np.abs(decoded - values / 257.0).max() <= 1.0  # Pillow keeps the high byte: within one level


def _palette_image(transparency: bool) -> tuple[Image.Image, np.ndarray]:
    palette = np.array([[0, 0, 0], [255, 0, 0], [10, 20, 30], [200, 150, 100]], np.uint8)
    index = np.tile(np.arange(4, dtype=np.uint8), (32, 8))
    img = Image.fromarray(index, "P")
    img.putpalette(palette.ravel().tolist())
    if transparency:
        img.info["transparency"] = 1
    return img, palette[index]


@pytest.mark.parametrize("transparency", [False, True])
def test_D13_palette_images_take_their_palette_colours(tmp_path: Path, transparency: bool) -> None:
    img, expected = _palette_image(transparency)
    path = tmp_path / "p.png"
    img.save(path, **({"transparency": 1} if transparency else {}))
    with Image.open(path) as check:
        assert check.mode == "P" and ("transparency" in check.info) == transparency
    assert np.array_equal(_decoded(path, 32), expected)


def test_D13_rgba_and_la_drop_alpha(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((32, 32)) < 0.5, 0, 255)  # fully transparent pixels keep their colour
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(_decoded(tmp_path / "rgba.png", 32), rgba[..., :3])
    la = rng.integers(0, 256, (32, 32, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(_decoded(tmp_path / "la.png", 32), np.repeat(la[..., :1], 3, axis=2))


def test_D13_cmyk_jpeg_converts_with_the_standard_formula(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    cmyk = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, "CMYK").save(path, quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
        stored = np.asarray(img).astype(float)  # what the JPEG holds after compression
    c, m, y, k = (stored[..., i] for i in range(4))
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], axis=-1) / 255.0
    assert np.abs(_decoded(path, 32).astype(float) - expected).max() <= 1.0


def test_D13_one_bit_images_are_0_and_255(tmp_path: Path) -> None:
    bits = np.random.default_rng(3).random((32, 32)) < 0.5
    Image.fromarray(bits).save(tmp_path / "bits.png")
    with Image.open(tmp_path / "bits.png") as img:
        assert img.mode == "1"
    assert np.array_equal(_decoded(tmp_path / "bits.png", 32), np.repeat(bits[..., None], 3, axis=2).astype(np.uint8) * 255)


def test_D13_float_images_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((32, 32), np.float32)).save(path)
    with pytest.raises(DatasetError, match="float.tif: 32-bit float pixels have no defined range"):
        _decoded(path, 32)


def test_D13_8_bit_grey_and_rgb_decode_exactly_as_before(tmp_path: Path) -> None:
    """The common case is untouched: convert("RGB") then resize, bit for bit."""
    rng = np.random.default_rng(4)
    for name, array in (("l.png", rng.integers(0, 256, (40, 40), dtype=np.uint8)),
                        ("rgb.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))):
        Image.fromarray(array).save(tmp_path / name)
        with Image.open(tmp_path / name) as img:
            reference = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
        store = ImageStore(32)
        assert np.array_equal(store.image(Sample("c/x/y/" + name, tmp_path / name, None, 0, "good")).permute(1, 2, 0).numpy(),
                              reference)


# -- 3. masks (D11, D12) -------------------------------------------------------------------------------


def _square(value: int = 1, dtype=np.uint8) -> np.ndarray:
    mask = np.zeros((32, 32), dtype)
    mask[4:12, 20:28] = value
    return mask


@pytest.mark.parametrize("kind", ["0/1", "0/255", "16-bit 0/1", "16-bit 0/65535", "1-bit", "palette", "rgb"])
def test_D12_any_non_zero_mask_value_is_a_defect(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "m.png"
    if kind == "0/1":
        Image.fromarray(_square(1)).save(path)
    elif kind == "0/255":
        Image.fromarray(_square(255)).save(path)
    elif kind.startswith("16-bit"):
        path.write_bytes(_png16(_square(1 if kind.endswith("0/1") else 65535, np.uint16)))
    elif kind == "1-bit":
        Image.fromarray(_square(1).astype(bool)).save(path)
    elif kind == "palette":
        img = Image.fromarray(_square(1), "P")
        img.putpalette([0, 0, 0, 255, 255, 255])
        img.save(path)
    else:
        rgb = np.zeros((32, 32, 3), np.uint8)
        rgb[4:12, 20:28, 0] = 128  # a red defect
        Image.fromarray(rgb).save(path)
    assert np.array_equal(_mask(path, 32), _square(1).astype(bool))


@pytest.mark.slow
def test_D12_zero_one_masks_give_pixel_metrics(tmp_path: Path, capsys) -> None:
    """As VisA ships them: the run's pixel AUROC of that task is a number, not NaN."""
    root = tmp_path / "d12"
    write_category(root, "alpha", size=32)
    write_category(root, "beta", size=32, seed=1)
    for path in (root / "alpha" / "ground_truth" / "spot").iterdir():
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(path)  # 0/255 -> 0/1
    code, _, err = _run(capsys, root, tmp_path / "out", "--tasks", "2", "--name", "d12")
    assert code == 0, err
    metrics = pd.read_csv(tmp_path / "out" / "d12" / "metrics.csv")
    pixel = metrics[(metrics["metric"] == "pixel_auroc") & (metrics["eval_task"] == "alpha")]["value"]
    assert len(pixel) == 2 and pixel.notna().all()


def test_D11_an_empty_defect_mask_is_one_warning_naming_it(tmp_path: Path, caplog) -> None:
    path = tmp_path / "000_mask.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    with caplog.at_level(logging.WARNING, logger="clbench"):
        assert not _mask(path, 32).any()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and str(path) in lines[0] and "defect mask is empty" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clbench"):
        _mask(path, 32, label=0)  # a good image's (absent) mask is empty by definition: no warning
    assert not caplog.records


def test_D11_a_defect_that_vanishes_at_the_run_resolution_is_one_warning(tmp_path: Path, caplog) -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[2, 2] = 255  # nearest 40 -> 32 samples rows/columns 0, 1, 3, 4, ...: never 2
    path = tmp_path / "001_mask.png"
    Image.fromarray(mask).save(path)
    with caplog.at_level(logging.WARNING, logger="clbench"):
        store = ImageStore(32)
        assert not store.mask(Sample("c/test/spot/001", path, path, 1, "spot")).any()
        store.mask(Sample("c/test/spot/001", path, path, 1, "spot"))  # cached: decoded and warned once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(path) in lines[0] and "1 pixels vanish" in lines[0] and "32x32" in lines[0]
    assert ImageStore(40).mask(Sample("c/test/spot/001", path, path, 1, "spot")).sum() == 1


@pytest.mark.slow
def test_D11_a_run_warns_about_an_empty_mask(two: Path, tmp_path: Path, capsys, caplog) -> None:
    empty = two / "alpha" / "ground_truth" / "spot" / "000_mask.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(empty)
    with caplog.at_level(logging.WARNING, logger="clbench"):
        code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", "2", "--name", "d11")
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records if str(empty) in r.getMessage()]


# -- 4. files: duplicate stems, hidden entries, bombs, folders without train/good ----------------------


def test_D18_two_images_with_one_stem_are_refused_naming_both(two: Path, tmp_path: Path, capsys) -> None:
    folder = two / "alpha" / "test" / "spot"
    Image.open(folder / "000.png").convert("RGB").save(folder / "000.jpg")
    with pytest.raises(DatasetError, match=r"spot: 000.jpg and 000.png share the name '000'"):
        load_category(two, "alpha")
    code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", "2", "--name", "d18")
    line = _one_line_error(err)
    assert code == 2 and "000.jpg and 000.png" in line and str(folder) in line


def test_hidden_folders_and_files_are_never_data(two: Path) -> None:
    checkpoints = two / "alpha" / "test" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    Image.new("RGB", (32, 32)).save(checkpoints / "000-checkpoint.png")
    (two / "alpha" / "train" / "good" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    hidden_category = two / ".trash"
    write_category(hidden_category.parent, hidden_category.name, size=32)
    category = load_category(two, "alpha")
    assert category.defects == ("spot",)
    assert all(".ipynb" not in str(s.image) and "._" not in s.image.name for s in category.train + category.val + category.test)
    assert list_categories(two) == ["alpha", "beta"]


def test_D16_decompression_bomb_is_one_line_naming_the_file(two: Path, tmp_path: Path, capsys) -> None:
    bomb = two / "alpha" / "train" / "good" / "bomb.png"
    bomb.write_bytes(_bomb_png())
    code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", "2", "--name", "d16")
    line = _one_line_error(err)
    assert code == 2 and str(bomb) in line and "decompression bomb" in line


def test_D26_data_check_reports_the_bomb(two: Path, capsys) -> None:
    bomb = two / "beta" / "test" / "spot" / "001.png"
    bomb.write_bytes(_bomb_png())
    assert main(["data", "check", str(two)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and str(bomb) in captured.err and "decompression bomb" in captured.err
    assert "OK" not in captured.out


def test_D03b_a_named_folder_without_train_good_says_so(two: Path, tmp_path: Path, capsys) -> None:
    (two / "capsule" / "test" / "good").mkdir(parents=True)
    code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", "capsule,alpha", "--name", "d03b")
    line = _one_line_error(err)
    assert code == 2 and f"category 'capsule' in {two} has no train/good folder" in line and "unknown" not in line


def test_D03b_a_counted_folder_without_train_good_is_a_warning_naming_it(two: Path, caplog) -> None:
    (two / "capsule" / "test" / "good").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="clbench"):
        ensure_dataset(RunConfig(data_root=str(two), synthetic=False, tasks="all"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "capsule" in lines[0] and "without train/good" in lines[0] and str(two) in lines[0]


# -- 5. unclear task errors (C43, C44, D28, D28b) ------------------------------------------------------


@pytest.mark.slow
def test_C43_one_category_name_runs_one_task(two: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", "alpha", "--name", "c43")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "c43" / "summary.json").read_text())["tasks"] == ["alpha"]


def test_C44_a_count_with_spaces_is_a_count(two: Path) -> None:
    ensure_dataset(RunConfig(data_root=str(two), synthetic=False, tasks=" 2"))
    from clbench.engine.tasks import resolve_tasks

    assert resolve_tasks(" 2", list_categories(two)) == ["alpha", "beta"]


@pytest.mark.parametrize("tasks", ["2", "all"])
def test_D28_an_empty_root_is_named_as_empty(tmp_path: Path, capsys, tasks: str) -> None:
    root = tmp_path / "emptyroot"
    root.mkdir()
    code, _, err = _run(capsys, root, tmp_path / "out", "--tasks", tasks, "--name", "d28")
    line = _one_line_error(err)
    assert code == 2 and f"no categories in {root}" in line and "1..0" not in line


def test_a_count_too_large_names_the_root_and_its_categories(two: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", "5", "--name", "x")
    assert code == 2 and f"count 5 out of range 1..2 (categories in {two}: alpha, beta)" in _one_line_error(err)


# -- beyond the list: symlinks, categories named like presets, unreadable folders -------------------------


def test_symlink_loops_are_one_line_and_never_hang(two: Path, tmp_path: Path, capsys) -> None:
    loop = two / "alpha" / "train" / "good" / "loop.png"
    os.symlink("loop.png", loop)  # a link to itself
    code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", "2", "--name", "s1")
    assert code == 2 and f"{loop}: broken symbolic link" in _one_line_error(err)
    loop.unlink()
    os.symlink("../test", two / "alpha" / "test" / "up")  # a folder link back to its parent
    code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", "2", "--name", "s2")
    assert code == 2 and f"{two / 'alpha' / 'test' / 'up'}: no images" in _one_line_error(err)
    (two / "alpha" / "test" / "up").unlink()
    os.symlink("b_loop", two / "a_loop")  # two links pointing at each other at the root
    os.symlink("a_loop", two / "b_loop")
    ensure_dataset(RunConfig(data_root=str(two), synthetic=False, tasks=2))  # counted: a warning, the run goes on
    with pytest.raises(ValueError, match="category 'a_loop' .* has no train/good folder"):
        ensure_dataset(RunConfig(data_root=str(two), synthetic=False, tasks=["a_loop"]))
    assert main(["data", "check", str(two)]) == 2
    assert "a_loop: not a category" in capsys.readouterr().err


def test_symlinked_images_and_categories_work(two: Path) -> None:
    os.symlink(two / "alpha", two / "alpha_link")
    assert list_categories(two) == ["alpha", "alpha_link", "beta"]
    assert len(load_category(two, "alpha_link").test) == 4


@pytest.mark.parametrize("name", ["mvtec", "paper10", "all"])
def test_a_category_named_like_a_preset_is_refused_as_ambiguous(two: Path, tmp_path: Path, capsys, name: str) -> None:
    write_category(two, name, size=32)
    code, _, err = _run(capsys, two, tmp_path / "out", "--tasks", name, "--name", "p")
    assert code == 2 and f"'{name}' is both a keyword and a category in {two}" in _one_line_error(err)
    ensure_dataset(RunConfig(data_root=str(two), synthetic=False, tasks=[name]))  # the list form is the category


def test_a_root_that_is_one_category_says_so(two: Path) -> None:
    with pytest.raises(DatasetError, match=f"data_root: {two / 'alpha'} is one category .*give its parent folder"):
        ensure_dataset(RunConfig(data_root=str(two / "alpha"), synthetic=False, tasks="all"))


def test_an_unreadable_folder_is_one_line(two: Path, monkeypatch) -> None:
    real = Path.iterdir
    blocked = two / "alpha" / "test"

    def iterdir(self):
        if self == blocked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DatasetError, match=f"{blocked}: cannot list the folder \\(Permission denied\\)"):
        load_category(two, "alpha")


# -- 6. data check reports every data fault (D24) ------------------------------------------------------


def test_D24_data_check_reports_each_fault(tmp_path: Path, capsys) -> None:
    root = tmp_path / "d24"
    for name, seed in (("ones", 0), ("wide", 1), ("dup", 2), ("empty", 3), ("fine", 4), ("small", 5)):
        write_category(root, name, size=32, seed=seed)
    for path in (root / "ones" / "ground_truth" / "spot").iterdir():  # 0/1 masks (VisA)
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(path)
    (root / "wide" / "train" / "good" / "000.png").write_bytes(_png16(np.full((32, 32), 40000, np.uint16)))
    spot = root / "dup" / "test" / "spot"
    Image.open(spot / "001.png").convert("RGB").save(spot / "001.jpg")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "empty" / "ground_truth" / "spot" / "000_mask.png")
    tiny = np.zeros((32, 32), np.uint8)
    tiny[1, 1] = 255  # Pillow's nearest 32 -> 24 never samples row/column 1
    Image.fromarray(tiny).save(root / "small" / "ground_truth" / "spot" / "001_mask.png")
    (root / "fine" / "test" / ".ipynb_checkpoints").mkdir()
    (root / "orphan" / "test" / "good").mkdir(parents=True)
    (root / "fine" / "train" / "good" / "005.png").write_bytes(b"not an image")

    assert main(["data", "check", str(root), "--image-size", "24"]) == 2
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    table = out.splitlines()[0]
    assert "masks" in table
    row = {line.split()[0]: line for line in out.splitlines()[1:7]}
    assert "0/1" in row["ones"] and "0/255" in row["fine"]
    assert f"{root / 'ones'}: masks 0/1: every non-zero pixel is a defect" in out
    assert f"{root / 'wide'}: 1 images with 16 bits per channel" in out
    assert "001.jpg and 001.png share the name '001'" in err
    assert f"{root / 'empty' / 'ground_truth' / 'spot' / '000_mask.png'}: defect mask is empty" in out
    assert f"{root / 'small' / 'ground_truth' / 'spot' / '001_mask.png'}: the defect's 1 pixels vanish" in out
    assert f"{root / 'orphan'}: not a category, no train/good folder" in err
    assert f"{root / 'fine' / 'train' / 'good' / '005.png'}: unreadable or corrupt image" in err
    assert ".ipynb_checkpoints" in out and "hidden entries ignored" in out
    assert "categories OK" not in out and out.splitlines()[-1].startswith("6 categories checked: 3 errors, 2 warnings")
    assert all(line.startswith("clbench: error: ") for line in err.splitlines())


def test_D24_other_mask_values_are_a_warning(two: Path, capsys) -> None:
    path = two / "alpha" / "ground_truth" / "spot" / "000_mask.png"
    soft = np.zeros((32, 32), np.uint8)
    soft[5:15, 5:15] = 255
    soft[5, 5:15] = 128  # an anti-aliased edge
    Image.fromarray(soft).save(path)
    assert main(["data", "check", str(two)]) == 0
    out = capsys.readouterr().out
    assert "1 masks with values other than 0/255 or 0/1" in out and "values 0, 128, 255" in out


def test_data_check_of_a_missing_or_empty_root(tmp_path: Path, capsys) -> None:
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    assert "dataset root not found" in _one_line_error(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["data", "check", str(tmp_path / "empty")]) == 2
    assert "no categories" in _one_line_error(capsys.readouterr().err)
