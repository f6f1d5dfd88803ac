"""CFA: the soft-boundary loss (seed 003's formula, also with K != J) and softmin score against hand
computations, the bank's ``weighting`` (task: seed 003 Algorithm 3; batch: the paper's code) against
independent numpy references, replayed images left out of the bank, ``optimizer_state``, no early
stopping by default, state round trip, seed 003's 22.5 MB bank. Parity with anomalib:
tests/test_parity_cfa.py; runs under every strategy, resume and memory: tests/test_contract.py."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench.features.backbones import BackbonePool
from clbench.data import Batch, ImageStore, SampleSet, load_category
from methods.base import MethodContext, TaskData
from methods.cfa import CFA, cfa_loss, softmin_score, squared_distances
from helpers import InMemoryStream, smooth_batch

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


def stream_task(step: int, batch: Batch) -> TaskData:
    return TaskData(step, (batch.keys[0].split("/")[0],), InMemoryStream(batch), SampleSet((), ImageStore(32)), seed=step)


# three tasks of 8, 4 and 12 images: 2, 1 and 3 batches of 4, so the two weightings differ
TASK_SIZES = {"t0": 8, "t1": 4, "t2": 12}


def reference_banks(outputs: list[np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Independent numpy references from the raw per-task descriptor outputs (n_i, P, d)."""
    # seed 003 Algorithm 3: C <- C * i / (i + 1) + C_i / (i + 1), C_i the task's mean
    task = np.zeros_like(outputs[0][0], dtype=np.float64)
    for i, out in enumerate(outputs):
        task = task * i / (i + 1) + out.astype(np.float64).mean(0) / (i + 1)
    # the paper's code, DSVDD._update_centroid: D <- (D * j + batch mean) / (j + 1), j = i + total_num_batches,
    # over a drop_last loader, total_num_batches += batches of the task
    d, total = np.zeros_like(task), 0
    for out in outputs:
        k = 0
        for i, start in enumerate(range(0, len(out) - len(out) % batch_size, batch_size)):
            j = i + total
            d = (d * j + out[start : start + batch_size].astype(np.float64).mean(0)) / (j + 1)
            k = i
        total += k + 1
    return {"task": task, "batch": d}


@pytest.mark.parametrize("weighting", ["task", "batch"])
@pytest.mark.slow
def test_bank_weighting_matches_independent_reference(weighting: str) -> None:
    """With lr 0 the descriptor is fixed, so the bank after three tasks is an exact function of the raw
    descriptor outputs: Algorithm 3 (task) or the paper's code's running mean over batches (batch)."""
    data = [smooth_batch(n, seed, 32, task=name) for seed, (name, n) in enumerate(TASK_SIZES.items())]
    make = lambda: make_cfa(lr=0.0, weight_decay=0.0, learn_radius=False, max_epochs=1, weighting=weighting)
    model = make()
    with torch.no_grad():
        outputs = [model.describe(batch).numpy() for batch in data]  # raw (n_i, P, d)
    expected = reference_banks(outputs, batch_size=4)
    assert not np.allclose(expected["task"], expected["batch"], rtol=1e-3, atol=1e-4)  # the test can tell them apart
    model.fit_task(stream_task(0, data[0]))
    model.fit_task(stream_task(1, data[1]))
    resumed = make()  # a resumed run continues with the same bank weights (bank_batches is state)
    resumed.load_method_state(model.state_dict())
    for m in (model, resumed):
        m.fit_task(stream_task(2, data[2]))
        np.testing.assert_allclose(m.memory_bank.numpy(), expected[weighting], rtol=1e-5, atol=1e-6)
        assert int(m.n_tasks) == 3 and int(m.bank_batches) == 6 == m.fit_info["bank_batches"]


def test_bank_leaves_out_replayed_images_and_is_a_per_image_mean() -> None:
    own, other = smooth_batch(6, seed=1, size=32, task="t1"), smooth_batch(4, seed=0, size=32, task="t0")
    model = make_cfa()
    mixed = Batch(torch.cat([own.pixels, other.pixels]), own.keys + other.keys,
                  torch.cat([own.labels, other.labels]), torch.cat([own.masks, other.masks]))
    bank, batches = model.task_bank(TaskData(1, ("t1",), InMemoryStream(mixed), SampleSet((), ImageStore(32))))
    with torch.no_grad():
        per_image = model.describe(own).mean(0)  # 6 images: batches of 4 + 2, merged by size
    torch.testing.assert_close(bank, per_image, atol=1e-6, rtol=1e-5)
    assert batches == 1  # the paper's drop_last loader: floor(6 / 4)


@pytest.mark.parametrize("state", ["reset", "keep"])
def test_optimizer_state(state: str) -> None:
    model = make_cfa(max_epochs=1, optimizer_state=state)
    model.fit_task(stream_task(0, smooth_batch(8, seed=0, size=32, task="t0")))
    first = model._kept_optimiser
    model.fit_task(stream_task(1, smooth_batch(8, seed=1, size=32, task="t1")))
    if state == "reset":
        assert first is None and model._kept_optimiser is None and model.training_state() == {}
    else:  # one AdamW for the stream: 2 steps per task, moments carried
        steps = {int(s["step"]) for s in model._kept_optimiser.state.values()}
        assert model._kept_optimiser is first and steps == {4}
        assert "optimizer" in model.training_state()


def test_unknown_weighting_is_one_line() -> None:
    with pytest.raises(ValueError, match="weighting='images' is not one of task, batch"):
        make_cfa(weighting="images")


@pytest.mark.slow
def test_short_training_lowers_loss_gives_finite_maps_and_round_trips(synthetic_root: Path) -> None:
    (category,) = categories(synthetic_root, 1, val_fraction=0.2)
    store = ImageStore(64)
    model = make_cfa(image_size=64, max_epochs=4)
    model.fit_task(task(0, category, store))
    info = model.fit_info
    # seed 003: 30 epochs, no early stopping, even with held-out images
    assert info["epochs_run"] == 4 and info["best_epoch"] == -1 and math.isnan(info["val_loss_best"])
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
    assert memory["method_state"] == 16 * 16 * 448 * 4 + 16  # bank (P=16x16, d=448) + task and batch counters


def test_analytic_memory_is_seed_003_bank() -> None:
    memory = CFA.analytic_memory({}, 224)
    state = sum(v for k, v in memory.items() if k.startswith("method_state"))
    assert state == 56 * 56 * 1792 * 4 == 22_478_848
