"""DRAEM: Perlin masks are binary, seeded and non-empty on average; the simulator blends as DRAEM;
focal loss and SSIM match reference computations; training lowers the loss, maps are finite at
input size; state round trip; seeded augmentations; runs under sequential, replay and joint."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clbench.backbones import BackbonePool
from clbench.data import ImageStore, SampleSet, load_category
from methods.base import MethodContext, TaskData
from methods.draem import DRAEM, draem_filter_size, focal_loss, gaussian_window, ssim
from methods.perlin import AnomalySource, default_max_scale, perlin_mask, procedural_texture, synthesize_anomalies
from conftest import STRATEGY_CASES, engine_run

SMALL = {"base_width": 4, "disc_base_width": 4}


def make_draem(image_size: int = 32, max_epochs: int = 2, **params) -> DRAEM:
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=image_size, seed=0, progress=False, max_epochs=max_epochs)
    return DRAEM(context, **(SMALL | params))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- simulator -----------------------------------------------------------------------------------
def test_perlin_masks_are_binary_seeded_and_non_empty_on_average() -> None:
    for size in (32, 64, 100):
        mask = perlin_mask(size, generator(3))
        assert mask.dtype == torch.bool and mask.shape == (size, size)
        assert torch.equal(mask, perlin_mask(size, generator(3)))
    masks = torch.stack([perlin_mask(64, generator(seed)) for seed in range(40)])
    assert not all(torch.equal(masks[0], m) for m in masks[1:])  # seeds differ
    fractions = masks.float().mean(dim=(1, 2))
    assert (fractions > 0).float().mean() > 0.5 and 0.005 < fractions.mean() < 0.5
    assert default_max_scale(256) == 6 and default_max_scale(64) == 4 and default_max_scale(32) == 3


def test_simulator_blends_as_draem_and_is_seeded(tmp_path: Path) -> None:
    images = torch.rand(6, 3, 32, 32)
    source = AnomalySource(None, 32)
    assert source.procedural
    augmented, masks = synthesize_anomalies(images, source, generator(0), p_anomalous=1.0)
    again, masks_again = synthesize_anomalies(images, source, generator(0), p_anomalous=1.0)
    assert torch.equal(augmented, again) and torch.equal(masks, masks_again)
    assert masks.shape == (6, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    outside = (masks == 0).expand_as(images)
    assert torch.equal(augmented[outside], images[outside])  # untouched outside the mask
    assert (augmented[~outside] != images[~outside]).any()
    clean, clean_masks = synthesize_anomalies(images, source, generator(0), p_anomalous=0.0)
    assert torch.equal(clean, images) and clean_masks.sum() == 0
    texture = procedural_texture(32, generator(1))
    assert texture.shape == (3, 32, 32) and 0 <= texture.min() and texture.max() <= 1
    assert torch.equal(texture, procedural_texture(32, generator(1)))
    # a folder source: its images, resized to the training resolution
    folder = tmp_path / "dtd" / "sub"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((20, 30, 3), 60 * i + 50, np.uint8)).save(folder / f"{i}.png")
    folder_source = AnomalySource(tmp_path / "dtd", 32)
    assert not folder_source.procedural and len(folder_source.paths) == 2
    assert folder_source.sample(generator(0)).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="anomaly_source"):
        AnomalySource(tmp_path / "missing", 32)


# -- losses --------------------------------------------------------------------------------------
def test_focal_loss_matches_reference() -> None:
    logits = torch.randn(2, 2, 3, 4)
    target = torch.randint(0, 2, (2, 3, 4))
    assert float(focal_loss(logits, target, gamma=0.0)) == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-6)
    expected = 0.0
    p = torch.softmax(logits, dim=1)
    for b, y, x in np.ndindex(2, 3, 4):
        p_t = float(p[b, target[b, y, x], y, x])
        expected += -0.25 * (1 - p_t) ** 2 * math.log(p_t)
    assert float(focal_loss(logits, target, gamma=2.0, alpha=0.25)) == pytest.approx(expected / 24, rel=1e-5)


def test_ssim_matches_reference() -> None:
    a = torch.rand(1, 2, 9, 8, dtype=torch.float64)
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-12)
    # reference: per-pixel Gaussian-weighted statistics over a zero-padded 5x5 window
    w = gaussian_window(5, 1.5).double()
    pa, pb = F.pad(a, (2, 2, 2, 2)), F.pad(b, (2, 2, 2, 2))
    values = []
    for c, y, x in np.ndindex(2, 9, 8):
        u, v = pa[0, c, y : y + 5, x : x + 5], pb[0, c, y : y + 5, x : x + 5]
        mu_u, mu_v = (w * u).sum(), (w * v).sum()
        var_u = (w * u * u).sum() - mu_u**2
        var_v = (w * v * v).sum() - mu_v**2
        cov = (w * u * v).sum() - mu_u * mu_v
        c1, c2 = 0.01**2, 0.03**2
        values.append(((2 * mu_u * mu_v + c1) * (2 * cov + c2)) / ((mu_u**2 + mu_v**2 + c1) * (var_u + var_v + c2)))
    assert float(ssim(a, b, window_size=5)) == pytest.approx(float(torch.stack(values).mean()), rel=1e-9)
    assert float(ssim(a, b)) < 1.0
    assert [draem_filter_size(s) for s in (32, 64, 224, 256)] == [3, 5, 19, 21]


# -- training ------------------------------------------------------------------------------------
def test_short_training_lowers_loss_gives_finite_maps_and_round_trips(synthetic_root: Path) -> None:
    name = sorted(p.name for p in synthetic_root.iterdir())[0]
    category = load_category(synthetic_root, name, val_fraction=0.0)
    store = ImageStore(32)
    data = TaskData(0, (name,), SampleSet(category.train, store), SampleSet((), store), seed=5)
    model = make_draem(max_epochs=4, lr=1e-3)
    model.fit_task(data)
    info = model.fit_info
    assert info["epochs_run"] == 4 and info["anomaly_source_procedural"] == 1.0
    assert info["train_loss_last"] < info["train_loss_first"]
    assert info["synthetic_anomalous_fraction"] > 0
    batch = next(SampleSet(category.test, store).batches(5))
    prediction = model.predict(batch)
    assert prediction.maps.shape == (5, 32, 32) and torch.isfinite(prediction.maps).all()
    assert ((prediction.maps >= 0) & (prediction.maps <= 1)).all()
    smoothed = F.avg_pool2d(prediction.maps.unsqueeze(1), 3, stride=1, padding=1)
    torch.testing.assert_close(prediction.scores, smoothed.flatten(1).amax(1))
    # state round trip: a fresh instance gives identical predictions
    fresh = make_draem(max_epochs=4, lr=1e-3)
    fresh.load_method_state(model.state_dict())
    again = fresh.predict(batch)
    assert torch.equal(again.maps, prediction.maps) and torch.equal(again.scores, prediction.scores)
    # seeded augmentations: the same step from the same state trains identically
    twin = make_draem(max_epochs=4, lr=1e-3)
    twin.fit_task(data)
    assert twin.fit_info["train_loss_last"] == info["train_loss_last"]
    assert all(torch.equal(x, y) for x, y in zip(twin.state_dict().values(), model.state_dict().values()))


def test_non_multiple_of_32_sizes_are_padded() -> None:
    model = make_draem(image_size=40)
    model.eval()
    reconstruction, logits = model(torch.rand(2, 3, 40, 40))
    assert reconstruction.shape == (2, 3, 40, 40) and logits.shape == (2, 2, 40, 40)
    memory = DRAEM.analytic_memory(SMALL, 40)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable += sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory["model_trainable/reconstructive"] + memory["model_trainable/discriminative"] == trainable
    assert model.memory_components()["model_trainable"] == trainable and model.memory_components()["method_state"] == 0


@pytest.mark.parametrize("strategy, params", STRATEGY_CASES)
def test_draem_under_each_strategy(synthetic_root: Path, tmp_path: Path, strategy: str, params: dict) -> None:
    run_dir = engine_run("draem", strategy, params, synthetic_root, tmp_path, image_size=32, method_params=dict(SMALL))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics[metrics.metric == "pixel_auroc"].value.notna().all()
    training = pd.read_csv(run_dir / "training.csv")
    assert set(training.key) >= {"epochs_run", "train_loss_first", "train_loss_last", "anomaly_source_procedural"}
    memory = pd.read_csv(run_dir / "memory.csv")
    assert (memory[memory.component == "model_trainable"].bytes > 0).all()
