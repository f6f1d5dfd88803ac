"""Parallel decoding (ImageStore's worker threads, prefetch of the next batch) changes nothing a run
sees: the same pixels, masks, batch order, warnings and errors as the serial decode, each image once."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clbench.data.dataset as dataset
from clbench.data import DatasetError, ImageStore, SampleSet, load_category
from clbench.engine import config as cfg
from clbench.engine.evaluation import _test_batches
from helpers import write_category


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_category(tmp_path, "alpha", n_train=7, size=48)
    write_category(tmp_path, "beta", n_train=5, size=48, gray=True, seed=1)
    return tmp_path


def everything(root: Path) -> tuple:
    cats = [load_category(root, name, val_fraction=0.2) for name in ("alpha", "beta")]
    return tuple(s for c in cats for s in c.train + c.val + c.test)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("crop", [None, 32])
def test_parallel_and_serial_stores_give_identical_tensors_and_batches(root: Path, crop: int | None) -> None:
    samples = everything(root)
    serial, parallel = ImageStore(40, crop, decode_workers=0), ImageStore(40, crop, decode_workers=3)
    assert parallel.decode_workers == 3 and serial.decode_workers == 0
    a = list(SampleSet(samples, serial).batches(4, shuffle=True, seed=2))
    b = list(SampleSet(samples, parallel).batches(4, shuffle=True, seed=2))
    assert [x.keys for x in a] == [y.keys for y in b] and len(a) == -(-len(samples) // 4)
    for x, y in zip(a, b):
        assert torch.equal(x.pixels, y.pixels) and torch.equal(x.masks, y.masks) and torch.equal(x.labels, y.labels)
    assert any(y.masks.any() for y in b)  # the defect masks were compared, not only empty ones
    for s in samples:  # and one by one, from the cache
        assert torch.equal(serial.image(s), parallel.image(s)) and torch.equal(serial.mask(s), parallel.mask(s))
    cat = load_category(root, "alpha")
    evaluated = [b for b in _test_batches(cat, ImageStore(40, crop, decode_workers=2), 3, 1)]
    assert [b.keys for b in evaluated] == [[s.key for s in cat.test[:3]], [s.key for s in cat.test[3:]]]
    assert all(torch.equal(b.task_index, torch.full((len(b),), 1)) for b in evaluated)


@pytest.mark.parametrize("workers", [0, 4])
def test_each_image_is_decoded_once(root: Path, monkeypatch, workers: int) -> None:
    calls: list[Path] = []
    real = dataset.load_rgb8

    def counting(path: Path, size: int) -> np.ndarray:
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(dataset, "load_rgb8", counting)
    samples = everything(root)
    store = ImageStore(32, decode_workers=workers)
    next(SampleSet(samples[::-1], store).batches(2))  # a generator left after one batch (the next one prefetched)
    for seed in range(3):  # epochs: the same images in other orders, one asked for while it may be under way
        for _ in SampleSet(samples, store).batches(3, shuffle=True, seed=seed):
            store.image(samples[-3])
    assert sorted(calls) == sorted(s.image for s in samples)


def test_a_corrupt_image_raises_the_same_error_from_a_worker(root: Path) -> None:
    bad = root / "alpha" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:200])  # the header survives (the scan passes), the pixels do not
    cat = load_category(root, "alpha")
    messages = []
    for workers in (0, 4):
        with pytest.raises(DatasetError) as info:
            list(SampleSet(cat.train + cat.test, ImageStore(32, decode_workers=workers)).batches(4))
        messages.append(str(info.value))
    assert messages[0] == messages[1] and str(bad) in messages[1] and "corrupt" in messages[1]
    store = ImageStore(32, decode_workers=4)
    batches = _test_batches(cat, store, 1, None)
    assert next(batches).keys == [cat.test[0].key]  # the batch before the corrupt one still comes
    with pytest.raises(DatasetError, match="001.png"):
        next(batches)


def test_the_empty_mask_warning_is_emitted_once_with_the_same_text(root: Path, caplog) -> None:
    empty = root / "alpha" / "ground_truth" / "spot" / "001_mask.png"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(empty)
    cat = load_category(root, "alpha")
    seen = []
    for workers in (0, 4):
        caplog.clear()
        store = ImageStore(32, decode_workers=workers)
        with caplog.at_level(logging.WARNING, logger="clbench"):
            for _ in range(2):
                list(_test_batches(cat, store, 3, None))
                list(SampleSet(cat.test, store).batches(1))
        seen.append(warnings_of(caplog))
    assert len(seen[1]) == 1 and seen[0] == seen[1] and str(empty) in seen[1][0]
    assert "defect mask is empty" in seen[1][0]


def test_decode_workers_is_checked_and_defaults_to_a_few_threads() -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_mapping({"decode_workers": -1})
    assert "decode_workers=-1" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(cfg.ConfigError, match="decode_workers"):
        cfg.from_mapping({"decode_workers": 2.5})
    assert cfg.from_mapping({"decode_workers": 0}).decode_workers == 0
    assert ImageStore(32).decode_workers == dataset.default_decode_workers("cpu")


@pytest.mark.parametrize("device, cores, torch_threads, expected", [
    ("cuda", 16, 16, 4), ("cuda", 2, 2, 2), ("cuda", 1, 1, 0),  # the GPU computes: the cores are free
    ("cpu", 2, 2, 0), ("cpu", 16, 16, 0), ("cpu", 16, 8, 4), ("cpu", 4, 1, 3), ("cpu", 4, 3, 0),  # spare cores only
])
def test_default_decode_workers_uses_only_cores_nobody_computes_on(monkeypatch, device: str, cores: int,
                                                                   torch_threads: int, expected: int) -> None:
    monkeypatch.setattr(dataset.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(dataset.torch, "get_num_threads", lambda: torch_threads)
    assert dataset.default_decode_workers(device) == expected
    with pytest.raises(ValueError, match="decode_workers"):
        ImageStore(32, decode_workers=-2)


@pytest.mark.parametrize("workers", [0, 3])
def test_the_image_cache_keeps_at_most_its_bytes_least_recently_used_first(root: Path, monkeypatch, workers: int) -> None:
    """``image_cache_gb``: past the cap the least recently used image goes and is decoded again when
    asked for, with the same pixels; 0 keeps none. An uncapped store is the reference."""
    calls: list[str] = []
    real = dataset.load_rgb8
    monkeypatch.setattr(dataset, "load_rgb8", lambda path, size: calls.append(path.as_posix()) or real(path, size))
    samples = everything(root)
    a, b, c, d = samples[:4]
    reference = ImageStore(32, decode_workers=0)
    one = 3 * 32 * 32
    store = ImageStore(32, decode_workers=workers, cache_bytes=3 * one + one // 2)
    for s in (a, b, c, a, d):  # a is used again before d arrives: b is the least recently used
        assert torch.equal(store.image(s), reference.image(s))
    assert list(store._images) == [c.key, a.key, d.key] and store._image_bytes == 3 * one
    calls.clear()
    assert torch.equal(store.image(b), reference.image(b)) and calls == [b.image.as_posix()]  # decoded again
    assert torch.equal(store.image(d), reference.image(d)) and len(calls) == 1  # still cached
    for batch, expected in zip(SampleSet(samples, store).batches(4, shuffle=True, seed=1),
                               SampleSet(samples, reference).batches(4, shuffle=True, seed=1)):
        assert torch.equal(batch.pixels, expected.pixels) and store._image_bytes <= 3 * one + one // 2
    nothing = ImageStore(32, decode_workers=workers, cache_bytes=0)
    calls.clear()
    for _ in range(2):
        assert torch.equal(nothing.image(a), reference.image(a))
    assert len(calls) == 2 and not nothing._images


def test_image_cache_gb_is_checked_and_a_run_does_not_depend_on_it(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_mapping({"image_cache_gb": -1})
    assert "image_cache_gb" in str(info.value) and "\n" not in str(info.value)
    from helpers import engine_run

    runs = [engine_run("stfpm", "replay", {"buffer_size": 4}, synthetic_root, tmp_path / name, image_cache_gb=gb)
            for name, gb in (("default", 2.0), ("none", 0.0))]
    tables = [(run / "metrics.csv").read_text() for run in runs]
    assert tables[0] == tables[1] and len(tables[0].splitlines()) > 2
