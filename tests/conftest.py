"""Shared fixtures: one intra-op thread, a tiny hand-made MVTec-layout dataset and the built-in
synthetic one. Helpers that are not fixtures (``write_category``, ``engine_run``, in-memory images
and streams) are in helpers.py: tests import them from there, never from this file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import write_category


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Tests use small tensors: on 2 cores one intra-op thread is several times faster for them
    and immune to oversubscription (measured: a 5-epoch DRAEM fit 29 s with 2 threads on a loaded
    machine, 1.7 s with 1). Subprocess tests set OMP_NUM_THREADS themselves if they need to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_category(root, "alpha")
    write_category(root, "beta", gray=True, seed=1)
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Four small categories of the built-in synthetic dataset, generated once per test session."""
    from clbench.data.synth import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, categories=4, size=64, seed=0, n_train=12, n_test_good=4, n_test_per_defect=2)
    return root
