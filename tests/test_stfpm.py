"""STFPM: a short training lowers the loss, maps are finite at input size, early stopping reads only
the held-out good images, ``optimizer_state``. Parity with anomalib (maps, scores, loss, SGD step):
tests/test_parity_stfpm.py; runs under every strategy, resume and memory: tests/test_contract.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clbench.features.backbones import BackbonePool
from clbench.data import ImageStore, SampleSet, load_category
from methods.base import MethodContext, TaskData
from methods.stfpm import STFPM, layer_distances, stfpm_loss


def make_stfpm(max_epochs: int = 3, image_size: int = 64, **params) -> STFPM:
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=image_size, seed=0, progress=False, max_epochs=max_epochs)
    return STFPM(context, **params)


def test_loss_is_zero_for_identical_features() -> None:
    t = [torch.randn(2, 4, 3, 3), torch.randn(2, 5, 2, 2)]
    assert float(stfpm_loss(t, [x.clone() for x in t])) == pytest.approx(0.0, abs=1e-6)
    assert [d.shape for d in layer_distances(t, [torch.randn_like(x) for x in t])] == [(2, 3, 3), (2, 2, 2)]


@pytest.mark.parametrize("state, builds", [("reset", 2), ("keep", 1)])
def test_optimizer_state(synthetic_root: Path, state: str, builds: int) -> None:
    """reset: a fresh SGD per task; keep: one SGD (and its momentum) for the whole stream."""
    names = sorted(p.name for p in synthetic_root.iterdir())[:2]
    store = ImageStore(32)
    model = make_stfpm(max_epochs=1, image_size=32, batch_size=8, optimizer_state=state)
    built = []
    build = model.build_optimiser
    model.build_optimiser = lambda: built.append(build()) or built[-1]
    for step, name in enumerate(names):
        category = load_category(synthetic_root, name, val_fraction=0.0)
        model.fit_task(TaskData(step, (name,), SampleSet(category.train, store), SampleSet((), store), seed=step))
    assert len(built) == builds
    if state == "keep":
        assert model._kept_optimiser is built[0] and "optimizer" in model.training_state()
        assert all("momentum_buffer" in s for s in built[0].state.values())


class ValOnlySet(SampleSet):
    """Counts how often the held-out set is read (early stopping must use it, and only it)."""

    reads = 0

    def batches(self, *args, **kwargs):
        type(self).reads += 1
        return super().batches(*args, **kwargs)


def test_short_training_lowers_loss_and_gives_finite_maps(synthetic_root: Path) -> None:
    name = sorted(p.name for p in synthetic_root.iterdir())[0]
    category = load_category(synthetic_root, name, val_fraction=0.2)
    store = ImageStore(64)
    model = make_stfpm(max_epochs=4, batch_size=4)
    val = ValOnlySet(category.val, store)
    model.fit_task(TaskData(0, (name,), SampleSet(category.train, store), val))
    info = model.fit_info
    assert info["train_loss_last"] < info["train_loss_first"]
    assert info["epochs_run"] == 4 and 0 <= info["best_epoch"] < 4
    assert ValOnlySet.reads == 5  # one validation pass per epoch + one after restoring the best weights
    batch = next(SampleSet(category.test, store).batches(5))
    prediction = model.predict(batch)
    assert prediction.maps.shape == (5, 64, 64) and torch.isfinite(prediction.maps).all()
    assert torch.equal(prediction.scores, prediction.maps.flatten(1).amax(1))


def test_without_held_out_images_all_epochs_run(synthetic_root: Path) -> None:
    name = sorted(p.name for p in synthetic_root.iterdir())[0]
    category = load_category(synthetic_root, name, val_fraction=0.0)
    model = make_stfpm(max_epochs=2, batch_size=8)
    store = ImageStore(64)
    model.fit_task(TaskData(0, (name,), SampleSet(category.train, store), SampleSet((), store)))
    assert model.fit_info["epochs_run"] == 2 and model.fit_info["best_epoch"] == -1
