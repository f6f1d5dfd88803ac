"""CFA: the soft-boundary loss and softmin score against hand computations, the memory bank update
of seed 003's Algorithm 3, training lowers the loss, state round trip, seed 003's 22.5 MB bank, and
runs under sequential, replay and joint."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.backbones import BackbonePool
from clbench.data import ImageStore, SampleSet, load_category
from methods.base import MethodContext, TaskData
from methods.cfa import CFA, cfa_loss, softmin_score, squared_distances
from conftest import STRATEGY_CASES, engine_run

SMALL = {"backbone": "resnet18", "batch_size": 4}


def make_cfa(image_size: int = 32, max_epochs: int = 2, **params) -> CFA:
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=image_size, seed=0, progress=False, max_epochs=max_epochs)
    return CFA(context, **(SMALL | params))


def categories(root: Path, n: int = 2, val_fraction: float = 0.0):
    names = sorted(p.name for p in root.iterdir())[:n]
    return [load_category(root, name, val_fraction=val_fraction) for name in names]


def task(step: int, category, store: ImageStore) -> TaskData:
    return TaskData(step, (category.name,), SampleSet(category.train, store), SampleSet(category.val, store), seed=step)


def test_loss_and_score_match_hand_computation() -> None:
    # one image, two patches, six memorised features: squared distances given directly
    d = torch.tensor([[[0.30, 0.05, 0.90, 0.20, 0.40, 0.01], [2.0, 1.5, 0.6, 3.0, 0.02, 1.0]]])
    r, k, j, alpha, nu = 0.5, 2, 3, 0.1, 0.01
    expected_att = expected_rep = 0.0
    for row in d[0].tolist():
        s = sorted(row)
        expected_att += sum(max(0.0, x - r * r) for x in s[:k])
        expected_rep += sum(max(0.0, r * r - x - alpha) for x in s[k : k + j])
    expected = (expected_att / (2 * k) + expected_rep / (2 * j)) / nu
    got = cfa_loss(d, torch.tensor([r]), k, j, alpha, nu)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # the radius gets a gradient when learnable (attraction pulls it up)
    radius = torch.tensor([r], requires_grad=True)
    cfa_loss(d, radius, k, j, alpha, nu).backward()
    assert radius.grad is not None and float(radius.grad) != 0.0
    # score: softmin over the K nearest Euclidean distances, weight of the nearest x nearest
    scores = softmin_score(d, 3)
    for p, row in enumerate(d[0].tolist()):
        e = sorted(math.sqrt(x) for x in row)[:3]
        weights = [math.exp(-x) for x in e]
        assert float(scores[0, p]) == pytest.approx(weights[0] / sum(weights) * e[0], rel=1e-5)
    # squared distances: the matmul expansion agrees with cdist
    f, c = torch.randn(2, 5, 4), torch.randn(7, 4)
    torch.testing.assert_close(squared_distances(f, c), torch.cdist(f, c.expand(2, 7, 4)) ** 2, atol=1e-4, rtol=1e-4)


def test_bank_update_follows_algorithm_3(synthetic_root: Path) -> None:
    """With lr 0 the descriptor is fixed, so C after two tasks is exactly (C_0 + C_1) / 2."""
    first, second = categories(synthetic_root)
    store = ImageStore(32)
    model = make_cfa(lr=0.0, weight_decay=0.0, learn_radius=False, max_epochs=1)
    model.fit_task(task(0, first, store))
    bank_0 = model.task_bank(task(0, first, store))
    torch.testing.assert_close(model.memory_bank, bank_0)
    model.fit_task(task(1, second, store))
    bank_1 = model.task_bank(task(1, second, store))
    torch.testing.assert_close(model.memory_bank, bank_0 * 0.5 + bank_1 * 0.5)
    assert int(model.n_tasks) == 2 and model.fit_info["bank_tasks"] == 2
    # the bank is an exact per-image mean, and replayed images of other tasks are left out of C_i
    mixed = TaskData(1, (second.name,), SampleSet(first.train + second.train, store), SampleSet((), store))
    torch.testing.assert_close(model.task_bank(mixed), bank_1)
    per_image = torch.cat([model.describe(b) for b in SampleSet(second.train, store).batches(5)]).mean(0)
    torch.testing.assert_close(bank_1, per_image, atol=1e-5, rtol=1e-5)


def test_short_training_lowers_loss_gives_finite_maps_and_round_trips(synthetic_root: Path) -> None:
    (category,) = categories(synthetic_root, 1, val_fraction=0.2)
    store = ImageStore(64)
    model = make_cfa(image_size=64, max_epochs=4)
    model.fit_task(task(0, category, store))
    info = model.fit_info
    assert info["epochs_run"] == 4 and 0 <= info["best_epoch"] < 4
    assert info["train_loss_last"] < info["train_loss_first"]
    assert info["radius"] > 1e-5  # learnable radius moved
    batch = next(SampleSet(category.test, store).batches(5))
    prediction = model.predict(batch)
    assert prediction.maps.shape == (5, 64, 64) and torch.isfinite(prediction.maps).all()
    assert torch.equal(prediction.scores, prediction.maps.flatten(1).amax(1))
    # state round trip into a fresh instance: identical predictions
    fresh = make_cfa(image_size=64, max_epochs=4)
    fresh.load_method_state(model.state_dict())
    again = fresh.predict(batch)
    assert torch.equal(again.maps, prediction.maps) and torch.equal(again.scores, prediction.scores)
    memory = model.memory_components()
    assert memory["method_state"] == 16 * 16 * 448 * 4 + 8  # bank (P=16x16, d=448) + task counter


def test_analytic_memory_is_seed_003_bank() -> None:
    memory = CFA.analytic_memory({}, 224)
    state = sum(v for k, v in memory.items() if k.startswith("method_state"))
    assert state == 56 * 56 * 1792 * 4 == 22_478_848


@pytest.mark.parametrize("strategy, params", STRATEGY_CASES)
def test_cfa_under_each_strategy(synthetic_root: Path, tmp_path: Path, strategy: str, params: dict) -> None:
    run_dir = engine_run("cfa", strategy, params, synthetic_root, tmp_path, image_size=32, method_params=dict(SMALL))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics[metrics.metric == "pixel_auroc"].value.notna().all()
    training = pd.read_csv(run_dir / "training.csv")
    assert set(training.key) >= {"epochs_run", "train_loss_first", "train_loss_last"}
    memory = pd.read_csv(run_dir / "memory.csv")
    state = memory[memory.component == "method_state"].bytes
    assert (state == 8 * 8 * 448 * 4 + 8).all()  # fixed-size bank whatever the number of tasks
