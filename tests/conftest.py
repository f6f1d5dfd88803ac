"""Shared fixtures: a tiny hand-made MVTec-layout dataset and the built-in synthetic one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Tests use small tensors: on 2 cores one intra-op thread is several times faster for them
    and immune to oversubscription (measured: a 5-epoch DRAEM fit 29 s with 2 threads on a loaded
    machine, 1.7 s with 1). Subprocess tests set OMP_NUM_THREADS themselves if they need to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_category(root: Path, name: str, *, n_train: int = 6, size: int = 40, gray: bool = False, seed: int = 0) -> Path:
    """A minimal valid category: flat noisy images, one 'spot' defect type with masks."""
    rng = np.random.default_rng(seed)
    folder = root / name
    shape = (size, size) if gray else (size, size, 3)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(90, 110, shape, dtype=np.uint8))

    for split, count in (("train/good", n_train), ("test/good", 2), ("test/spot", 2)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image().save(folder / split / f"{i:03d}.png")
    (folder / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        mask = np.zeros((size, size), np.uint8)
        mask[5:15, 5:15] = 255
        Image.fromarray(mask).save(folder / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return folder


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_category(root, "alpha")
    write_category(root, "beta", gray=True, seed=1)
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Four small categories of the built-in synthetic dataset, generated once per test session."""
    from clbench.synth import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, categories=4, size=64, seed=0, n_train=12, n_test_good=4, n_test_per_defect=2)
    return root


# The three strategies every method must run under, as (strategy, strategy_params).
STRATEGY_CASES = [("sequential", {}), ("replay", {"buffer_size": 4}), ("joint", {})]


def engine_run(method: str, strategy: str, strategy_params: dict, data_root: Path, out: Path, **overrides) -> Path:
    """One short run through the engine (2 tasks, 1 epoch, random init, CPU): the run folder."""
    from clbench.config import RunConfig
    from clbench.runner import run_experiment

    settings = dict(method=method, strategy=strategy, strategy_params=strategy_params, data_root=str(data_root),
                    synthetic=False, tasks=2, image_size=64, weights="none", output_dir=str(out),
                    device="cpu", max_epochs=1)
    settings.update(overrides)
    return run_experiment(RunConfig(**settings), progress=False)
