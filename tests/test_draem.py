"""DRAEM: Perlin masks are binary, seeded, non-empty on average, at DRAEM's lattice scales; the
simulator blends as DRAEM; DRAEM's rotation of 30 % of the normal images (real rotations, before
the simulation, off with p_rotate=0); sharpness as PIL's; training lowers the loss, maps are finite
at input size; state round trip; seeded augmentations; optimizer_state keep. (Loss terms and
outputs vs anomalib, kornia and DRAEM's code: tests/test_parity_draem.py; runs under every
strategy, resume and memory: tests/test_contract.py.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clbench.features.backbones import BackbonePool
from clbench.data import ImageStore, SampleSet, load_category
from methods.base import MethodContext, TaskData
import methods.draem.model as draem_module
from methods.draem.model import DRAEM, draem_filter_size
from methods.draem.simulator import (
    AnomalySource, SOURCE_AUGMENTATIONS, default_max_scale, perlin_mask, perlin_scales, procedural_texture,
    rotate_normal_images, synthesize_anomalies,
)

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
    assert default_max_scale(256) == 5 and default_max_scale(64) == 3 and default_max_scale(32) == 2


def test_perlin_lattice_scales_are_draems() -> None:
    """DRAEM (and the benchmark paper's copy, and anomalib) draw each lattice exponent with
    ``torch.randint(0, 6, (1,))``: 0..5, the bound is exclusive (the old code drew 0..6)."""
    exponents = []
    for seed in range(60):
        reference = generator(seed)
        draem_x = 2 ** int(torch.randint(0, 6, (1,), generator=reference))
        draem_y = 2 ** int(torch.randint(0, 6, (1,), generator=reference))
        assert perlin_scales(256, generator(seed)) == (draem_x, draem_y)
        exponents += [draem_x.bit_length() - 1, draem_y.bit_length() - 1]
    assert set(exponents) == set(range(6))
    # smaller images keep DRAEM's finest cell of 8 px: 64 px -> at most 2^3 cells
    assert max(max(perlin_scales(64, generator(seed))) for seed in range(60)) == 8


def test_sharpness_augmentation_is_pils() -> None:
    """imgaug's pillike.EnhanceSharpness = PIL ImageEnhance.Sharpness, factor U[0, 2]."""
    from PIL import ImageEnhance

    sharpness = next(f for f in SOURCE_AUGMENTATIONS if f.__name__ == "_sharpness")
    assert len(SOURCE_AUGMENTATIONS) == 10  # DRAEM's list
    pixels = torch.randint(0, 256, (3, 12, 10), generator=generator(0), dtype=torch.uint8)
    out = sharpness(pixels.float() / 255, generator(4)).clamp(0, 1)
    factor = float(torch.rand((), generator=generator(4)) * 2)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    expected = torch.from_numpy(np.array(ImageEnhance.Sharpness(pil).enhance(factor))).permute(2, 0, 1).float() / 255
    assert (out - expected).abs().max() <= 2.5 / 255  # PIL rounds its smoothed image to uint8
    assert (out - pixels.float() / 255).abs().max() > 10 / 255


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


# -- DRAEM's rotation of the normal training images ----------------------------------------------
def test_rotate_normal_images_rotates_30_percent_by_real_rotations() -> None:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    pixels = torch.randint(50, 256, (600, 3, 16, 16), generator=generator(0), dtype=torch.uint8)
    rotated, angles = rotate_normal_images(pixels, generator(1))
    again, angles_again = rotate_normal_images(pixels, generator(1))
    assert torch.equal(rotated, again) and torch.equal(angles.nan_to_num(999), angles_again.nan_to_num(999))
    done = ~angles.isnan()
    assert 0.26 < float(done.float().mean()) < 0.34  # DRAEM: torch.rand(1) > 0.7
    assert torch.equal(rotated[~done], pixels[~done])
    assert angles[done].abs().max() <= 90 and angles[done].min() < -75 and angles[done].max() > 75
    for i in done.nonzero().flatten()[:40].tolist():  # torchvision's bilinear rotation, uint8 rounding
        expected = TF.rotate(pixels[i], float(angles[i]), interpolation=InterpolationMode.BILINEAR)
        assert (rotated[i].int() - expected.int()).abs().max() <= 1
        if 20 < abs(float(angles[i])) < 70:  # corners filled with black (imgaug's cval 0)
            assert (rotated[i][:, [0, 0, -1, -1], [0, -1, 0, -1]] == 0).all()
    # p = 0: nothing drawn, nothing changed
    g = generator(2)
    state = g.get_state()
    same, none = rotate_normal_images(pixels[:5], g, p=0.0)
    assert same is pixels[:5] or torch.equal(same, pixels[:5])
    assert none.isnan().all() and torch.equal(g.get_state(), state)


def _recording_fit(monkeypatch, data: TaskData, **params) -> tuple[DRAEM, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """Fit, recording each batch's simulator input and masks, and the reconstruction target."""
    synthesized: list[tuple[torch.Tensor, torch.Tensor]] = []
    targets: list[torch.Tensor] = []
    real = draem_module.synthesize_anomalies

    def synthesize(images, *args, **kwargs):
        augmented, masks = real(images, *args, **kwargs)
        synthesized.append((images.clone(), masks.clone()))
        return augmented, masks

    monkeypatch.setattr(draem_module, "synthesize_anomalies", synthesize)
    model = make_draem(max_epochs=2, **params)
    loss = model.loss

    def recording_loss(images, *args):
        targets.append(images.detach().clone())
        return loss(images, *args)

    monkeypatch.setattr(model, "loss", recording_loss)
    model.fit_task(data)
    return model, synthesized, targets


def test_training_rotates_normal_images_before_the_simulation(synthetic_root: Path, monkeypatch) -> None:
    name = sorted(p.name for p in synthetic_root.iterdir())[0]
    category = load_category(synthetic_root, name, val_fraction=0.0)
    store = ImageStore(32)
    data = TaskData(0, (name,), SampleSet(category.train, store), SampleSet((), store), seed=3)
    originals = {store.image(s).numpy().tobytes() for s in category.train}

    def is_original(image: torch.Tensor) -> bool:
        return (image * 255).round().to(torch.uint8).numpy().tobytes() in originals

    model, synthesized, targets = _recording_fit(monkeypatch, data)  # defaults: p_rotate 0.3
    inputs = torch.cat([images for images, _ in synthesized])
    assert torch.equal(torch.cat(targets), inputs)  # the rotated image is also the reconstruction target
    rotated = sum(not is_original(image) for image in inputs)
    assert 0 < rotated < len(inputs)  # fails on the old code: it never rotated
    assert model.fit_info["rotated_fraction"] == pytest.approx(rotated / len(inputs))

    _, plain, plain_targets = _recording_fit(monkeypatch, data, p_rotate=0.0)
    assert all(is_original(image) for images, _ in plain for image in images)
    assert torch.equal(torch.cat(plain_targets), torch.cat([images for images, _ in plain]))
    # the rotation has its own random stream: the simulated masks are the same with or without it
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(synthesized, plain))


def test_optimizer_state_keep_carries_adam_across_tasks(synthetic_root: Path) -> None:
    name = sorted(p.name for p in synthetic_root.iterdir())[0]
    category = load_category(synthetic_root, name, val_fraction=0.0)
    store = ImageStore(32)
    data = TaskData(0, (name,), SampleSet(category.train, store), SampleSet((), store), seed=1)
    steps_per_task = -(-len(category.train) // 4)
    kept = make_draem(max_epochs=1, optimizer_state="keep")
    kept.fit_task(data)
    assert int(kept.training_state()["optimizer"]["state"][0]["step"]) == steps_per_task
    kept.fit_task(data)
    assert int(kept.training_state()["optimizer"]["state"][0]["step"]) == 2 * steps_per_task
    reset = make_draem(max_epochs=1)
    reset.fit_task(data)
    assert reset.training_state() == {}
    with pytest.raises(ValueError, match="optimizer_state='sometimes' is not one of reset, keep"):
        make_draem(optimizer_state="sometimes")


# -- training ------------------------------------------------------------------------------------
@pytest.mark.slow
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
    assert [draem_filter_size(s) for s in (32, 64, 224, 256)] == [3, 5, 19, 21]
    model = make_draem(image_size=40)
    model.eval()
    reconstruction, logits = model(torch.rand(2, 3, 40, 40))
    assert reconstruction.shape == (2, 3, 40, 40) and logits.shape == (2, 2, 40, 40)
    memory = DRAEM.analytic_memory(SMALL, 40)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable += sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory["model_trainable/reconstructive"] + memory["model_trainable/discriminative"] == trainable
    assert model.memory_components()["model_trainable"] == trainable and model.memory_components()["method_state"] == 0
