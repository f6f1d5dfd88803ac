"""EfficientAD: hard-feature loss on a worked example, PDN/autoencoder shapes and seed 003's parameter
counts, cached teacher distillation and ``distill-teacher``'s provenance, the teacher paths (a file
loaded with weights_only, a stand-in distilled on generic images only, with a warning, refused
under require_pretrained), a short training run (loss down, finite maps), map quantiles from the
held-out good images only (of every task at a joint step), optimizer_state keep, state round trip.
Parity with anomalib: ``test_parity_efficientad.py``; runs under every strategy, resume and memory:
``test_contract.py``.

Kept fast (2 shared CPU cores): 64 px, a small synthetic dataset of its own (2 categories, 6
training images each), a tiny teacher distilled once from resnet18 on 4 images, 1-2 epochs,
4 penalty images, 64 teacher channels."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.features.backbones import BackbonePool
from clbench.engine.config import RunConfig
from clbench.data import ImageStore, SampleSet, load_category
from clbench.engine.runner import run_experiment
from methods.base import MethodContext, TaskData
from methods.efficientad.model import EfficientAD, hard_feature_loss
from methods.efficientad.distill import distill_teacher, images_digest, provenance_path
from methods.efficientad.networks import AutoEncoder, build_pdn, count_parameters, load_pdn_weights, pdn_output_size
from methods.efficientad.penalty import folder_images, procedural_images

SIZE = 64
FAST = {"penalty_images": 4, "standin_images": 4, "backbone": "resnet18", "out_channels": 64}  # 64 channels: 2x faster


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two synthetic categories: 6 good training images, 2 good + 1 per defect type for testing."""
    from clbench.data.synth import generate

    out = tmp_path_factory.mktemp("efficientad-data")
    generate(out, categories=2, size=SIZE, seed=0, n_train=6, n_test_good=2, n_test_per_defect=1, workers=1)
    return out


def context(max_epochs: int = 2, require_pretrained: bool = False) -> MethodContext:
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    return MethodContext(pool, torch.device("cpu"), image_size=SIZE, seed=0, progress=False, max_epochs=max_epochs,
                         require_pretrained=require_pretrained)


def category(root: Path, name: str | None = None, val_fraction: float = 0.34):
    name = name or sorted(p.name for p in root.iterdir())[0]
    return name, load_category(root, name, val_fraction=val_fraction)


class CountingSet(SampleSet):
    """A SampleSet that counts the images it yields (which data a method reads, and how often)."""

    def __init__(self, samples, store) -> None:
        super().__init__(samples, store)
        self.images_read = 0

    def batches(self, *args, **kwargs):
        for batch in super().batches(*args, **kwargs):
            self.images_read += len(batch)
            yield batch


@pytest.fixture(scope="module")
def teacher_file(root: Path, tmp_path_factory) -> Path:
    """A tiny distilled teacher (resnet18 features, 4 images, 1 epoch), written once per module."""
    _, cat = category(root)
    store = ImageStore(SIZE)
    pixels = torch.stack([store.image(s) for s in cat.train])
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    result = distill_teacher("resnet18", pixels, out, out_channels=64, weights="none", epochs=1, batch_size=4)
    assert not result.reused
    return out


def test_hard_feature_loss_keeps_only_the_top_tenth_percent() -> None:
    distances = torch.randperm(2000).float().view(2, 10, 10, 10) / 10  # distinct values 0.0 .. 199.9
    distances.requires_grad_(True)
    loss = hard_feature_loss(distances, 0.999)
    # quantile 0.999 of 2000 values lies between the 3rd and 2nd largest: the two largest count
    assert float(loss.detach()) == pytest.approx((199.9 + 199.8) / 2)
    loss.backward()
    assert int((distances.grad != 0).sum()) == 2
    assert float(hard_feature_loss(torch.ones(1, 4, 3, 3))) == pytest.approx(1.0)  # ties: all count


@pytest.mark.slow
def test_networks_shapes_and_seed003_parameter_counts() -> None:
    # seed 003: teacher 8.0M, student 11.6M, autoencoder 1.1M parameters: EfficientAD-M at 256 px
    assert round(count_parameters(build_pdn("medium", 384)) / 1e6, 1) == 8.0
    assert round(count_parameters(build_pdn("medium", 768)) / 1e6, 1) == 11.6
    assert round(count_parameters(AutoEncoder(384, 256, pdn_output_size(256))) / 1e6, 1) == 1.1
    for size, padding, side in ((256, False, 56), (256, True, 64), (64, False, 8), (64, True, 16)):
        assert pdn_output_size(size, padding) == side
        assert build_pdn("small", 8, padding)(torch.zeros(1, 3, size, size)).shape == (1, 8, side, side)
    assert AutoEncoder(384, SIZE, 8)(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 384, 8, 8)


@pytest.mark.slow
def test_distillation_writes_weights_and_provenance_and_is_cached(teacher_file: Path, root: Path) -> None:
    provenance = json.loads(provenance_path(teacher_file).read_text())
    assert provenance["backbone"] == "resnet18" and provenance["pretrained"] is False
    assert provenance["weights_source"] == "none" and provenance["num_images"] == 4
    assert provenance["epochs"] == 1 and provenance["seed"] == 0 and provenance["model_size"] == "small"
    assert load_pdn_weights(build_pdn("small", 64), teacher_file)["images_sha256"] == provenance["images_sha256"]
    _, cat = category(root)
    store = ImageStore(SIZE)
    pixels = torch.stack([store.image(s) for s in cat.train])
    mtime = teacher_file.stat().st_mtime_ns
    again = distill_teacher("resnet18", pixels, teacher_file, out_channels=64, weights="none", epochs=1, batch_size=4)
    assert again.reused and teacher_file.stat().st_mtime_ns == mtime  # loaded, not retrained
    first = build_pdn("small", 64)
    load_pdn_weights(first, teacher_file)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.model.state_dict().values()))
    other = distill_teacher("resnet18", pixels[:2], None, cache_dir=teacher_file.parent / "cache",
                            out_channels=64, weights="none", epochs=1, batch_size=4)
    assert not other.reused and other.path.parent.name == "cache" and provenance_path(other.path).is_file()


def test_distill_teacher_command(root: Path, tmp_path: Path, capsys) -> None:
    import argparse

    from methods.efficientad.distill import add_distill_parser

    parser = argparse.ArgumentParser(prog="clbench")
    add_distill_parser(parser.add_subparsers(dest="command"))
    name, _ = category(root)
    out = tmp_path / "teacher.pt"
    argv = ["distill-teacher", "--backbone", "resnet18", "--images", str(root / name / "train" / "good"),
            "--out", str(out), "--weights", "none", "--image-size", str(SIZE), "--epochs", "1",
            "--out-channels", "64", "--max-images", "3", "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0 and out.is_file() and provenance_path(out).is_file()
    provenance = json.loads(provenance_path(out).read_text())
    assert provenance["num_images"] == 3 and provenance["images"] == str((root / name / "train" / "good").resolve())
    assert provenance["backbone"] == "resnet18" and provenance["pretrained"] is False
    assert "random-init" in capsys.readouterr().out  # says it is not a pretrained teacher
    args = parser.parse_args(argv)
    assert args.func(args) == 0 and "reused" in capsys.readouterr().out


@pytest.fixture(scope="module")
def fitted(root: Path, tmp_path_factory):
    """A model fitted for 2 epochs (batch 2) on 4 images without teacher_weights: a stand-in teacher
    distilled on 4 procedural images (cached in tmp)."""
    name, cat = category(root)
    store = ImageStore(SIZE)
    val = CountingSet(cat.val, store)
    train = CountingSet(cat.train, store)
    params = dict(FAST, teacher_cache=str(tmp_path_factory.mktemp("cache")), distill_epochs=1, lr=1e-3, batch_size=2)
    with pytest.warns(UserWarning, match="no teacher_weights"):
        model = EfficientAD(context(max_epochs=2), **params)
    model.fit_task(TaskData(0, (name,), train, val, seed=3))
    return model, params, cat, store, val, train


@pytest.mark.slow
def test_short_training_lowers_loss_and_gives_finite_maps(fitted) -> None:
    model, _, cat, store, _, _ = fitted
    info = model.fit_info
    assert info["teacher_source"] == 1.0 and info["teacher_standin"] == 1.0 and info["teacher_pretrained_backbone"] == 0.0
    assert info["penalty_procedural"] == 1.0
    assert info["epochs_run"] == 2 and info["iterations"] == 2 * 2 and len(cat.train) == 4
    assert info["train_loss_last"] < info["train_loss_first"]
    batch = next(SampleSet(cat.test, store).batches(5))
    prediction = model.predict(batch)
    assert prediction.maps.shape == (5, SIZE, SIZE) and torch.isfinite(prediction.maps).all()
    assert torch.equal(prediction.scores, prediction.maps.flatten(1).amax(1))


@pytest.mark.slow
def test_standin_teacher_is_distilled_on_generic_images_never_the_task_data(fitted, root: Path) -> None:
    model, params, cat, store, _, train = fitted
    teacher = model.teacher_info
    assert teacher["kind"] == "stand-in" and teacher["backbone"] == "resnet18" and teacher["pretrained"] is False
    assert teacher["source_images"].startswith("procedural") and bool(model.teacher_ready)
    # distilled on the procedural images, not on the task's: their hash is in the provenance
    assert teacher["distillation"]["images_sha256"] == images_digest(procedural_images(4, SIZE, seed=0))
    # the training stream was read for the teacher statistics (1 pass) and 2 epochs only (before:
    # one more pass to distil the teacher on it)
    assert train.images_read == len(cat.train) * (1 + model.fit_info["epochs_run"])
    # another task gives the same teacher: the cached one (its identity includes the images' hash)
    other_name = sorted(p.name for p in root.iterdir())[1]
    _, other = category(root, other_name)
    with pytest.warns(UserWarning, match="no teacher_weights"):
        second = EfficientAD(context(max_epochs=1), **params)
    second.fit_task(TaskData(0, (other_name,), SampleSet(other.train[:1], store), SampleSet((), store)))
    assert second.fit_info["teacher_source"] == 2.0 and second.teacher_info["file"] == teacher["file"]
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.state_dict().values(), second.teacher.state_dict().values()))


def test_standin_teacher_uses_penalty_dir_when_given(root: Path, tmp_path: Path) -> None:
    name, _ = category(root, sorted(p.name for p in root.iterdir())[1])
    generic = tmp_path / "generic"  # stands for Imagenette: any folder of images that are not task data
    generic.mkdir()
    for i, path in enumerate(sorted((root / name / "test").rglob("*.png"))[:3]):
        (generic / f"{i}.png").write_bytes(path.read_bytes())
    params = dict(FAST, penalty_dir=str(generic), teacher_cache=str(tmp_path / "cache"), distill_epochs=1)
    with pytest.warns(UserWarning, match=f"penalty_dir '{generic}'"):
        model = EfficientAD(context(max_epochs=1), **params)
    model._distil_standin()
    teacher = model.teacher_info
    assert teacher["kind"] == "stand-in" and str(generic) in teacher["source_images"]
    assert teacher["distillation"]["images_sha256"] == images_digest(folder_images(generic, 4, SIZE, seed=0))
    assert model._teacher_fit_info()["teacher_distill_images"] == 3.0


def test_missing_teacher_weights_warns_and_logs_what_to_pass(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="clbench"):
        with pytest.warns(UserWarning, match=r"--param teacher_weights=PATH.*clbench distill-teacher --backbone wide_resnet50_2"):
            EfficientAD(context(), **FAST)
    assert any("stand-in teacher" in r.getMessage() and "distill-teacher" in r.getMessage() for r in caplog.records)


def test_require_pretrained_refuses_a_missing_or_random_init_teacher(teacher_file: Path, tmp_path: Path) -> None:
    strict = context(require_pretrained=True)
    with pytest.raises(ValueError, match=r"teacher_weights is required.*clbench distill-teacher") as err:
        EfficientAD(strict, **FAST)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="random-init backbone"):  # teacher_file's provenance: weights none
        EfficientAD(strict, teacher_weights=str(teacher_file), **FAST)
    # no provenance at all (e.g. anomalib's pretrained_teacher_small.pth): accepted, recorded as unknown
    plain = tmp_path / "plain.pth"
    torch.save(build_pdn("small", 64).state_dict(), plain)
    model = EfficientAD(strict, teacher_weights=str(plain), **FAST)
    assert model.teacher_info["pretrained"] == "unknown" and model.teacher_info["kind"] == "file"
    assert math.isnan(model._teacher_fit_info()["teacher_pretrained_backbone"])
    assert model._teacher_fit_info()["teacher_standin"] == 0.0


def test_teacher_file_is_loaded_with_weights_only(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match=f"teacher_weights: '{garbage}'") as err:
        EfficientAD(context(), teacher_weights=str(garbage), **FAST)
    assert "\n" not in str(err.value)
    pickled = tmp_path / "module.pth"  # a whole pickled module needs weights_only=False: refused
    torch.save(build_pdn("small", 64), pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        EfficientAD(context(), teacher_weights=str(pickled), **FAST)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        EfficientAD(context(), teacher_weights=str(tmp_path / "missing.pth"), **FAST)


@pytest.mark.slow
def test_optimizer_state_keep_reuses_one_optimiser_across_tasks(root: Path, teacher_file: Path) -> None:
    name, cat = category(root)
    store = ImageStore(SIZE)
    data = TaskData(0, (name,), SampleSet(cat.train[:1], store), SampleSet((), store))
    model = EfficientAD(context(max_epochs=1), teacher_weights=str(teacher_file), optimizer_state="keep", **FAST)
    model.fit_task(data)
    first = model._kept_optimiser
    model.fit_task(data)
    assert model._kept_optimiser is first
    assert int(next(iter(first.state.values()))["step"]) == 2  # one iteration per task, moments carried
    # the per-task StepLR dropped 1e-4 to 1e-5 after the single iteration of each task, from 1e-4 again
    # at the second task (not 1e-6)
    assert first.param_groups[0]["lr"] == pytest.approx(1e-5)
    reset = EfficientAD(context(max_epochs=1), teacher_weights=str(teacher_file), **FAST)
    reset.fit_task(data)
    assert reset._kept_optimiser is None and reset.training_state() == {}


@pytest.mark.slow
def test_quantiles_come_from_held_out_good_images_only(fitted) -> None:
    model, _, cat, store, val, train = fitted
    assert model.fit_info["quantiles_from_val"] == 1.0
    assert model.fit_info["quantile_images"] == len(cat.val)
    assert train.images_read > 0
    # val: one early-stopping pass per epoch + one pass for the quantiles
    assert val.images_read == len(cat.val) * (model.fit_info["epochs_run"] + 1)
    with torch.no_grad():
        local, global_ = model.raw_maps(next(SampleSet(cat.val, store).batches(len(cat.val))).normalized())
        q = torch.tensor([0.9, 0.995])
        expected = torch.stack([torch.quantile(local.flatten(), q), torch.quantile(global_.flatten(), q)])
        on_train = model.raw_maps(next(SampleSet(cat.train, store).batches(len(cat.train))).normalized())[0]
    assert torch.allclose(model.quantiles, expected, rtol=1e-5)
    assert not torch.allclose(model.quantiles[0], torch.quantile(on_train.flatten(), q), rtol=1e-3)


@pytest.mark.slow
def test_state_round_trip_gives_identical_predictions(fitted) -> None:
    model, params, cat, store, _, _ = fitted
    with pytest.warns(UserWarning, match="no teacher_weights"):
        fresh = EfficientAD(context(), **params)
    fresh.load_method_state(model.state_dict())
    assert bool(fresh.teacher_ready) and fresh.teacher_info == model.teacher_info
    batch = next(SampleSet(cat.test, store).batches(4))
    a, b = model.predict(batch), fresh.predict(batch)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    memory = model.memory_components()
    assert memory["model_trainable"] > 0 and memory["model_frozen"] > 0 and memory["method_state"] > 0


def test_without_held_out_images_quantiles_fall_back_to_training_images(root: Path, teacher_file: Path) -> None:
    name, cat = category(root)
    store = ImageStore(SIZE)
    model = EfficientAD(context(max_epochs=1), teacher_weights=str(teacher_file), **FAST)
    model.fit_task(TaskData(0, (name,), SampleSet(cat.train[:1], store), SampleSet((), store)))
    info = model.fit_info
    assert info["quantiles_from_val"] == 0.0 and info["quantile_images"] == 1
    assert info["teacher_source"] == 0.0 and info["best_epoch"] == -1 and info["epochs_run"] == 1
    assert model.teacher_info["source"] == "file"


def test_non_finite_loss_raises(root: Path, teacher_file: Path, monkeypatch) -> None:
    name, cat = category(root)
    store = ImageStore(SIZE)
    model = EfficientAD(context(max_epochs=1), teacher_weights=str(teacher_file), **FAST)
    nan = torch.tensor(float("nan"), requires_grad=True)
    monkeypatch.setattr(model, "training_losses", lambda *a: {"st": nan, "penalty": nan * 0, "ae": nan * 0, "stae": nan * 0})
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        model.fit_task(TaskData(0, (name,), SampleSet(cat.train[:1], store), SampleSet(cat.val, store)))


@pytest.mark.slow
def test_joint_quantiles_come_from_every_tasks_held_out_images(root: Path, teacher_file: Path, tmp_path: Path) -> None:
    """Through the engine: the joint step's map quantiles are computed on the held-out good images of
    both tasks (and nothing else). Runs under every strategy, resume, memory: tests/test_contract.py."""
    config = RunConfig(method="efficientad", strategy="joint", data_root=str(root), synthetic=False, tasks=2,
                       image_size=SIZE, weights="none", output_dir=str(tmp_path), device="cpu", max_epochs=1,
                       val_fraction=0.5, method_params={"teacher_weights": str(teacher_file), "batch_size": 3, **FAST})
    run_dir = run_experiment(config, progress=False)
    training = pd.read_csv(run_dir / "training.csv")
    logged = dict(zip(training.key, training.value))
    assert {"q_a_local", "q_b_local", "q_a_global", "q_b_global"} <= set(logged)
    held_out = json.loads((run_dir / "env.json").read_text())["held_out"]["counts"]
    assert len(held_out) == 2 and all(n > 0 for n in held_out.values())
    assert float(logged["quantiles_from_val"]) == 1.0 and float(logged["quantile_images"]) == sum(held_out.values())
