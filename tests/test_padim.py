"""PaDiM: streaming statistics vs numpy, continual averaging (seed 003 Alg. 1), Mahalanobis vs a
brute-force reference, resume of its state, and seed 003's 1541 MB."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clbench.backbones import BackbonePool
from clbench.data import Batch
from methods.base import MethodContext, TaskData
from methods.padim import PaDiM

P, D = 4, 3  # patches (2x2 grid), embedding dims


class FakeStream:
    """A train stream of fixed embeddings: each batch's key indexes the table."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        for start in range(0, self.n, batch_size):
            keys = [str(i) for i in range(start, min(start + batch_size, self.n))]
            yield Batch(torch.zeros(len(keys), 3, 2, 2, dtype=torch.uint8), keys, torch.zeros(len(keys)), torch.zeros(len(keys), 2, 2, dtype=torch.bool))


def make_padim(table: torch.Tensor, **params) -> PaDiM:
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=2, seed=0, progress=False)
    model = PaDiM(context, n_features=8, sigma=0.0, **params)
    model.embed = lambda batch: table[[int(k) for k in batch.keys]]  # (B, P, D)
    return model


def fit(model: PaDiM, table: torch.Tensor, batch_size: int) -> None:
    model.embed = lambda batch: table[[int(k) for k in batch.keys]]
    model.fit_task(TaskData(0, ("t",), FakeStream(len(table)), val=None))


def reference_stats(table: torch.Tensor, eps: float) -> tuple[np.ndarray, np.ndarray]:
    x = table.double().numpy()
    mean = x.mean(0)
    cov = np.stack([np.cov(x[:, p, :], rowvar=False) + eps * np.eye(D) for p in range(P)])
    return mean, cov


def test_streaming_statistics_match_numpy_across_batches() -> None:
    table = torch.randn(23, P, D) * 3 + 5
    model = make_padim(table, batch_size=5)  # 5 batches, last one of 3: exercises the merge
    fit(model, table, 5)
    mean, cov = reference_stats(table, 0.01)
    np.testing.assert_allclose(model.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.covariance.numpy(), cov, rtol=1e-4, atol=1e-4)


def test_continual_update_averages_mean_and_covariance() -> None:
    tasks = [torch.randn(10, P, D) + shift for shift in (0.0, 4.0, -2.0)]
    model = make_padim(tasks[0], batch_size=4)
    for t, table in enumerate(tasks, start=1):
        fit(model, table, 4)
        assert int(model.n_tasks) == t
    stats = [reference_stats(table, 0.01) for table in tasks]
    np.testing.assert_allclose(model.mean.numpy(), np.mean([s[0] for s in stats], axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.covariance.numpy(), np.mean([s[1] for s in stats], axis=0), rtol=1e-4, atol=1e-4)


def test_maps_are_mahalanobis_distances() -> None:
    table = torch.randn(30, P, D)
    model = make_padim(table, batch_size=8)
    fit(model, table, 8)
    test = torch.randn(3, P, D) * 2
    model.embed = lambda batch: test[[int(k) for k in batch.keys]]
    batch = next(FakeStream(3).batches(3))
    prediction = model.predict(batch)
    mean, cov = reference_stats(table, 0.01)
    diff = test.double().numpy() - mean
    expected = np.sqrt(np.einsum("bpd,pde,bpe->bp", diff, np.linalg.inv(cov), diff)).reshape(3, 2, 2)
    np.testing.assert_allclose(prediction.maps.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(prediction.scores.numpy(), expected.reshape(3, -1).max(1), rtol=1e-4)


def test_state_round_trip_rebuilds_the_inverse() -> None:
    table = torch.randn(12, P, D)
    model = make_padim(table, batch_size=4)
    fit(model, table, 4)
    state = model.state_dict()
    assert "precision" not in state and {"mean", "covariance", "n_tasks", "channel_index"} <= set(state)
    fresh = make_padim(table)
    fresh.load_method_state(state)
    batch = next(FakeStream(4).batches(4))
    assert torch.equal(fresh.predict(batch).maps, model.predict(batch).maps)
    memory = model.memory_components()
    assert memory["method_state"] == sum(t.numel() * t.element_size() for t in state.values())
    assert memory["method_cache"] == P * D * D * 4


def test_predict_before_fit_is_an_error() -> None:
    model = make_padim(torch.randn(2, P, D))
    with pytest.raises(RuntimeError, match="before any task"):
        model.predict(next(FakeStream(1).batches(1)))


def test_analytic_memory_reproduces_seed_003() -> None:
    memory = PaDiM.analytic_memory({"backbone": "wide_resnet50_2"}, 224)
    state = memory["method_state/mean"] + memory["method_state/covariance"]
    assert state == 3136 * (350 * 350 + 350) * 4 == 1_541_030_400  # "1541MB"
    small = PaDiM.analytic_memory({}, 64)  # resnet18: 100 dims on a 16x16 grid
    assert small["method_state/covariance"] == 256 * 100 * 100 * 4
