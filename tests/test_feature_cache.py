"""The feature cache stores what the methods need: float16 storage (half the bytes, scores within a
stated tolerance), per-layer channel selection (PaDiM's cache holds only its random channels, results
bit-identical), and pinned, non-blocking host-to-device copies on CUDA only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clbench.engine.config import ConfigError, RunConfig, validate
from clbench.features import backbones
from clbench.features.backbones import BackbonePool, cached_bytes_per_image, feature_info
from helpers import InMemoryStream, smooth_batch
from methods.base import MethodContext, TaskData
from methods.padim import PaDiM
from methods.patchcore import PatchCore

SIZE = 64
LAYERS = ["layer1", "layer2", "layer3"]
# fp16 storage vs fp32 (random-init resnet18, 64 px, 10 training / 6 test images, seeds 0-3): image
# scores moved by at most 2.2e-4 of their value, maps by at most 4.4e-4 of their range; stated tolerance:
FP16_TOLERANCE = 1e-3


def make_pool(dtype: str = "float32") -> BackbonePool:
    return BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None, cache_dtype=dtype)


def context(pool: BackbonePool) -> MethodContext:
    return MethodContext(pool, torch.device("cpu"), image_size=SIZE, seed=0, progress=False)


def fit_predict(method, train, test):
    method.fit_task(TaskData(0, ("alpha",), InMemoryStream(train), val=None))
    return method.predict(test)


@pytest.fixture(scope="module")
def images():
    return smooth_batch(10, 0, SIZE, noise=0.3), smooth_batch(6, 100, SIZE, task="beta", noise=0.3)


# -- storage dtype -------------------------------------------------------------------------------
def test_fp16_cache_halves_the_bytes_and_returns_float32(images) -> None:
    train, _ = images
    full, half = make_pool("float32").get("resnet18", LAYERS), make_pool("float16").get("resnet18", LAYERS)
    a, b = full.features(train), half.features(train)
    assert all(level.dtype == torch.float32 for level in b)
    assert full.cache.memory_bytes == 2 * half.cache.memory_bytes > 0
    assert full.cache.get(train.keys[0])[0].dtype == torch.float32 and half.cache.get(train.keys[0])[0].dtype == torch.float16
    for x, y in zip(a, b):  # rounding to fp16: half an ulp, 2**-11 relative
        assert torch.allclose(x, y, rtol=2**-11, atol=1e-6) and not torch.equal(x, y)


@pytest.mark.parametrize("cls, params", [
    (PaDiM, dict(n_features=50, batch_size=5)),
    (PatchCore, dict(backbone="resnet18", budget=200, batch_size=5)),
], ids=["padim", "patchcore"])
def test_fp16_cache_moves_scores_and_maps_within_tolerance(images, cls, params) -> None:
    train, test = images
    ref, pool = fit_predict(cls(context(make_pool()), **params), train, test), make_pool("float16")
    got = fit_predict(cls(context(pool), **params), train, test)
    assert ((got.scores - ref.scores).abs() <= FP16_TOLERANCE * ref.scores.abs()).all()
    assert (got.maps - ref.maps).abs().max() <= FP16_TOLERANCE * (ref.maps.max() - ref.maps.min())
    assert not torch.equal(got.scores, ref.scores)  # the fp16 path was taken
    assert all(b.cache_dtype == torch.float16 for b in pool.backbones)


def test_cache_dtype_is_a_run_setting() -> None:
    assert RunConfig().feature_cache_dtype == "float32"  # the default leaves every result unchanged
    with pytest.raises(ConfigError, match="feature_cache_dtype"):
        validate(RunConfig(feature_cache_dtype="bfloat16"))
    with pytest.raises(ValueError, match="feature_cache_dtype: 'float64'"):
        make_pool("float64")


# -- channel selection ---------------------------------------------------------------------------
def test_channel_selection_caches_only_the_kept_channels(images) -> None:
    train, _ = images
    pool = make_pool()
    full = pool.get("resnet18", LAYERS)
    keep = [[3, 0, 17], [], [255, 1]]
    sliced = pool.get("resnet18", LAYERS, channels=keep)
    assert sliced is not full and sliced.model is full.model  # one network, two caches
    assert pool.get("resnet18", LAYERS, channels=[(3, 0, 17), (), (255, 1)]) is sliced
    assert sliced.channels == [3, 0, 2] and full.channels == [64, 128, 256]
    for whole, part, kept in zip(full.features(train), sliced.features(train), keep):
        assert part.shape[-2:] == whole.shape[-2:]  # an empty selection still gives the layer's grid
        assert torch.equal(part, whole[:, kept])
    assert sliced.cache.memory_bytes == len(train) * 4 * (3 * 16 * 16 + 2 * 4 * 4)
    assert [x.shape[1] for x in sliced.forward(torch.zeros(1, 3, SIZE, SIZE))] == [3, 0, 2]  # uncached: the same selection


def test_channel_selection_is_checked() -> None:
    pool = make_pool()
    with pytest.raises(ValueError, match="layer 'layer2' is outside 0..127"):
        pool.get("resnet18", LAYERS, channels=[None, [128], None])
    with pytest.raises(ValueError, match="2 selections for the 3 layers"):
        pool.get("resnet18", LAYERS, channels=[None, None])


def unsliced_embed(method: PaDiM, backbone):
    """PaDiM's embedding as it was before channel selection at the cache: every channel cached,
    ``channel_index`` selected afterwards."""
    def embed(batch):
        features = backbone.features(batch)
        grid = features[0].shape[-2:]
        levels = [F.interpolate(f, size=grid, mode="nearest") if f.shape[-2:] != grid else f for f in features]
        return torch.cat(levels, dim=1).index_select(1, method.channel_index).flatten(2).transpose(1, 2)
    return embed


def test_padim_with_a_sliced_cache_equals_the_unsliced_path(images) -> None:
    train, test = images
    ours = PaDiM(context(make_pool()), n_features=60, batch_size=4)
    theirs = PaDiM(context(make_pool()), n_features=60, batch_size=4)
    full = theirs.context.backbones.get("resnet18", LAYERS)
    theirs.embed = unsliced_embed(theirs, full)
    a, b = fit_predict(ours, train, test), fit_predict(theirs, train, test)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert sum(ours.backbone.channels) == 60 and ours.backbone.cache.memory_bytes < full.cache.memory_bytes / 4


def test_padim_refuses_a_state_of_another_channel_selection() -> None:
    method = PaDiM(context(make_pool()), n_features=20)
    state = method.state_dict()
    state["channel_index"] = state["channel_index"] + 1
    with pytest.raises(ValueError, match="channel_index"):
        method.load_method_state(state)


# -- bytes per image -----------------------------------------------------------------------------
def test_bytes_per_image_match_what_the_cache_holds(images) -> None:
    train, _ = images
    for dtype in ("float32", "float16"):
        backbone = make_pool(dtype).get("resnet18", LAYERS, channels=[[0, 1], None, [5]])
        backbone.features(train)
        assert backbone.cache_bytes_per_image(SIZE) * len(train) == backbone.cache.memory_bytes
    channels, reductions = feature_info("wide_resnet50_2", LAYERS)  # 256, 512, 1024 channels at 56, 28, 14
    assert cached_bytes_per_image(channels, reductions, 224) == 4 * (256 * 56**2 + 512 * 28**2 + 1024 * 14**2)


# -- host-to-device copies -------------------------------------------------------------------------
def test_pinned_non_blocking_copies_on_cuda_only(images, monkeypatch) -> None:
    train, _ = images
    pinned: list[tuple[torch.dtype, tuple[int, ...]]] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append((self.dtype, tuple(self.shape))) or self)
    backbone = make_pool().get("resnet18", LAYERS)
    backbone.features(train)
    assert pinned == []  # CPU: the tensors are used where they are
    monkeypatch.setattr(backbones, "uses_pinned_memory", lambda device: True)  # as on CUDA
    backbone.features(smooth_batch(2, 7, SIZE))
    assert pinned[0] == (torch.uint8, (2, 3, SIZE, SIZE))  # the uint8 batch, before normalisation
    # (here the normalised batch is still on the host, so forward pins it too; on CUDA it is not)
    assert [shape[1] for _, shape in pinned[-3:]] == [64, 128, 256]  # each level read back from the cache
