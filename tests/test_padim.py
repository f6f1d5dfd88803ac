"""PaDiM: streaming statistics vs numpy, the three continual updates (covariance, precision, pooled)
vs numpy references, pooled == joint, Mahalanobis vs a brute-force reference, resume of each
mode's state, memory accounting per mode, seed 003's 1541 MB, and a pooled run through the engine."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clbench.features.backbones import BackbonePool
from clbench.data import Batch
from helpers import engine_run
from methods.base import MethodContext, TaskData
from methods.padim import PaDiM

P, D = 4, 3  # patches (2x2 grid), embedding dims
EPS = 0.01


class FakeStream:
    """A train stream of fixed embeddings: each batch's key indexes the table."""

    def __init__(self, n: int, offset: int = 0) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        for start in range(0, self.n, batch_size):
            keys = [str(self.offset + i) for i in range(start, min(start + batch_size, self.n))]
            yield Batch(torch.zeros(len(keys), 3, 2, 2, dtype=torch.uint8), keys, torch.zeros(len(keys)), torch.zeros(len(keys), 2, 2, dtype=torch.bool))


POOL = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)  # one resnet18 for all


def make_padim(table: torch.Tensor, **params) -> PaDiM:
    context = MethodContext(POOL, torch.device("cpu"), image_size=2, seed=0, progress=False)
    model = PaDiM(context, n_features=8, sigma=0.0, **params)
    model.embed = lambda batch: table[[int(k) for k in batch.keys]]  # (B, P, D)
    return model


def fit(model: PaDiM, table: torch.Tensor) -> None:
    """One step on every row of ``table`` (B, P, D)."""
    model.embed = lambda batch: table[[int(k) for k in batch.keys]]
    model.fit_task(TaskData(0, ("t",), FakeStream(len(table)), val=None))


def reference_stats(x: np.ndarray, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean (P, D) and np.cov + eps I (P, D, D) of raw embeddings (N, P, D)."""
    cov = np.stack([np.cov(x[:, p, :], rowvar=False) + eps * np.eye(D) for p in range(P)])
    return x.mean(0), cov


def mahalanobis(test: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    diff = test - mean
    return np.sqrt(np.einsum("bpd,pde,bpe->bp", diff, precision, diff))


def tasks(seed: int = 0) -> list[torch.Tensor]:
    """Two tasks of different sizes, means and spreads (so every mode gives a different answer)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(11, P, D, generator=g) * 1.5, torch.randn(17, P, D, generator=g) * 0.5 + 3.0]


def test_streaming_statistics_match_numpy_across_batches() -> None:
    table = torch.randn(23, P, D) * 3 + 5
    model = make_padim(table, batch_size=5)  # 5 batches, last one of 3: exercises the merge
    fit(model, table)
    mean, cov = reference_stats(table.double().numpy())
    np.testing.assert_allclose(model.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.covariance.numpy(), cov, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("average", ["covariance", "precision", "pooled"])
def test_two_tasks_match_numpy_reference(average: str) -> None:
    """After two tasks each mode holds what its definition says, computed from the raw embeddings
    with np.cov and float64 inverses (not from clbench's formulas)."""
    first, second = tasks()
    model = make_padim(first, batch_size=4, average=average)
    fit(model, first)
    fit(model, second)
    assert int(model.n_tasks) == 2
    x1, x2 = first.double().numpy(), second.double().numpy()
    (m1, c1), (m2, c2) = reference_stats(x1), reference_stats(x2)
    if average == "covariance":  # seed 003 Alg. 1: both averaged with weights 1/2, 1/2
        mean, precision = (m1 + m2) / 2, np.linalg.inv((c1 + c2) / 2)
        np.testing.assert_allclose(model.covariance.numpy(), (c1 + c2) / 2, rtol=1e-4, atol=1e-5)
    elif average == "precision":  # clad: means and inverses averaged
        mean, precision = (m1 + m2) / 2, (np.linalg.inv(c1) + np.linalg.inv(c2)) / 2
    else:  # the union's statistics
        mean, cov = reference_stats(np.concatenate([x1, x2]))
        precision = np.linalg.inv(cov)
        assert int(model.n_images) == 28
    np.testing.assert_allclose(model.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.precision.numpy(), precision, rtol=1e-4, atol=1e-4)
    test = torch.randn(3, P, D) * 2 + 1
    model.embed = lambda batch: test[[int(k) for k in batch.keys]]
    prediction = model.predict(next(FakeStream(3).batches(3)))
    expected = mahalanobis(test.double().numpy(), mean, precision).reshape(3, 2, 2)
    np.testing.assert_allclose(prediction.maps.numpy(), expected, rtol=1e-4)


def test_the_three_modes_differ_after_two_tasks() -> None:
    """The option is not cosmetic: with different task spreads the three precisions differ."""
    first, second = tasks(seed=1)
    precisions = []
    for average in ("covariance", "precision", "pooled"):
        model = make_padim(first, average=average)
        fit(model, first)
        fit(model, second)
        precisions.append(model.precision)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (precisions[i] - precisions[j]).abs().max() > 0.1


def test_pooled_after_three_tasks_equals_a_joint_fit() -> None:
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(n, P, D, generator=g) * s + c for n, s, c in ((9, 1.0, 0.0), (14, 0.3, 2.0), (6, 2.0, -1.0))]
    sequential = make_padim(parts[0], batch_size=4, average="pooled")
    for part in parts:
        fit(sequential, part)
    joint = make_padim(parts[0], batch_size=4, average="covariance")  # one step: every mode is the same
    fit(joint, torch.cat(parts))
    torch.testing.assert_close(sequential.mean, joint.mean, rtol=1e-5, atol=1e-5)
    pooled_covariance = sequential.scatter / (int(sequential.n_images) - 1) + EPS * torch.eye(D)
    torch.testing.assert_close(pooled_covariance, joint.covariance, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequential.precision, joint.precision, rtol=1e-4, atol=1e-4)


def test_one_step_is_the_same_in_every_mode() -> None:
    table = torch.randn(15, P, D)
    precisions = []
    for average in ("covariance", "precision", "pooled"):
        model = make_padim(table, batch_size=4, average=average)
        fit(model, table)
        precisions.append(model.precision)
    torch.testing.assert_close(precisions[0], precisions[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(precisions[0], precisions[2], rtol=1e-5, atol=1e-5)


def test_maps_are_mahalanobis_distances_and_image_scores() -> None:
    table = torch.randn(30, P, D)
    model = make_padim(table, batch_size=8)
    fit(model, table)
    test = torch.randn(3, P, D) * 2
    model.embed = lambda batch: test[[int(k) for k in batch.keys]]
    batch = next(FakeStream(3).batches(3))
    prediction = model.predict(batch)
    mean, cov = reference_stats(table.double().numpy())
    expected = mahalanobis(test.double().numpy(), mean, np.linalg.inv(cov)).reshape(3, 2, 2)
    np.testing.assert_allclose(prediction.maps.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(prediction.scores.numpy(), expected.reshape(3, -1).max(1), rtol=1e-4)
    model.params["image_score"] = "patch"  # sigma 0 here: the same maximum (see the parity test)
    np.testing.assert_allclose(model.predict(batch).scores.numpy(), expected.reshape(3, -1).max(1), rtol=1e-4)


@pytest.mark.parametrize("average, state_keys, matrix", [
    ("covariance", {"mean", "covariance", "n_tasks", "channel_index"}, "covariance"),
    ("precision", {"mean", "precision", "n_tasks", "channel_index"}, "precision"),
    ("pooled", {"mean", "scatter", "n_images", "n_tasks", "channel_index"}, "scatter"),
])
def test_state_round_trip_and_memory_per_mode(average: str, state_keys: set[str], matrix: str) -> None:
    first, second = tasks()
    model = make_padim(first, batch_size=4, average=average)
    fit(model, first)
    fit(model, second)
    state = model.state_dict()
    assert set(state) == state_keys
    fresh = make_padim(second, batch_size=4, average=average)  # scores the same rows as ``model`` now does
    fresh.load_method_state(state)
    batch = next(FakeStream(4).batches(4))
    assert torch.equal(fresh.predict(batch).maps, model.predict(batch).maps)
    fit(model, first)  # a third task after the resume continues the same way
    fit(fresh, first)
    assert torch.equal(fresh.precision, model.precision) and int(fresh.n_tasks) == 3
    memory = model.memory_components()
    assert memory["method_state"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert memory["method_cache"] == (0 if average == "precision" else P * D * D * 4)
    analytic = PaDiM.analytic_memory({"average": average}, 64)  # resnet18: 100 dims on a 16x16 grid
    assert analytic[f"method_state/{matrix}"] == 256 * 100 * 100 * 4 and analytic["method_state/mean"] == 256 * 100 * 4
    assert analytic.get("method_cache/precision", 0) == (0 if average == "precision" else 256 * 100 * 100 * 4)


def test_a_state_of_another_mode_does_not_load() -> None:
    table = torch.randn(6, P, D)
    model = make_padim(table, average="precision")
    fit(model, table)
    with pytest.raises(RuntimeError, match="precision"):
        make_padim(table, average="covariance").load_method_state(model.state_dict())


def test_bad_choices_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="average='mean' is not one of covariance, precision, pooled"):
        make_padim(torch.randn(2, P, D), average="mean")
    with pytest.raises(ValueError, match="image_score='avg' is not one of map, patch"):
        PaDiM.analytic_memory({"image_score": "avg"}, 64)


def test_predict_before_fit_is_an_error() -> None:
    model = make_padim(torch.randn(2, P, D))
    with pytest.raises(RuntimeError, match="before any task"):
        model.predict(next(FakeStream(1).batches(1)))


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
@pytest.mark.parametrize("average", ["covariance", "precision", "pooled"])
def test_a_later_step_holds_the_state_plus_one_matrix(average: str) -> None:
    """Issue 14's memory target: a step after the first allocates one (P, d, d) matrix (the step's
    scatter) beyond the state; the covariance, the inverse and Chan's merge work in place. Before,
    a step held up to four more (per-batch scatter, regularised copy, new inverse beside the old)."""
    patches, dims = 4096, 64  # one (P, d, d) float32 matrix = 64 MiB, far above the allocator's noise
    matrix = patches * dims * dims * 4
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(24, patches, dims, generator=g) + shift for shift in (0.0, 1.0, 2.0)]
    model = make_padim(steps[0], batch_size=8, average=average)
    fit(model, steps[0])
    fit(model, steps[1])
    precision = model.precision.data_ptr()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _rss_bytes("VmRSS")
    fit(model, steps[2])
    extra = _rss_bytes("VmHWM") - before
    assert extra < 1.5 * matrix, f"step 3 peaked {extra / matrix:.2f} matrices above the state"
    if average != "precision":  # the derived inverse is rewritten where it was
        assert model.precision.data_ptr() == precision


def test_analytic_memory_reproduces_seed_003() -> None:
    memory = PaDiM.analytic_memory({"backbone": "wide_resnet50_2"}, 224)
    state = memory["method_state/mean"] + memory["method_state/covariance"]
    assert state == 3136 * (350 * 350 + 350) * 4 == 1_541_030_400  # "1541MB"


@pytest.mark.slow
def test_pooled_padim_through_the_engine_counts_replayed_images(synthetic_root: Path, tmp_path: Path) -> None:
    """Pooled state survives the engine's checkpoint; under replay a replayed image counts again.
    (Default-mode runs under each strategy: tests/test_runner.py and the sweep tests.)"""
    run_dir = engine_run("padim", "replay", {"buffer_size": 4}, synthetic_root, tmp_path, image_size=32,
                         method_params={"average": "pooled"})
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics[metrics.metric == "pixel_auroc"].value.between(0, 1).all()
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    assert "covariance" not in saved and "precision" not in saved
    held_out = json.loads((run_dir / "env.json").read_text())["held_out"]["counts"]
    trained = sum(len(list((synthetic_root / c / "train" / "good").iterdir())) - n for c, n in held_out.items())
    assert trained < int(saved["n_images"]) <= trained + 4  # the second task's batch + up to 4 replayed
