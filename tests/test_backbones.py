"""Backbone weights resolution (offline, fast) and the frozen-feature cache."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from clbench.backbones import FeatureCache, FrozenBackbone, create_feature_model, resolve_weights
from clbench.data import Batch


def test_auto_decides_fast_without_network(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="random init"):
        info = resolve_weights("resnet18", "auto")
    assert time.perf_counter() - start < 1.0
    assert (info.source, info.pretrained) == ("none", False)
    assert resolve_weights("resnet18", "none").pretrained is False


def test_auto_uses_a_torch_hub_cache_hit(tmp_path: Path, monkeypatch) -> None:
    import timm

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = timm.models.get_pretrained_cfg("resnet18").url
    cached = tmp_path / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save(timm.create_model("resnet18").state_dict(), cached)
    info = resolve_weights("resnet18", "auto")
    assert (info.source, info.pretrained, info.file) == ("cache", True, str(cached))


def test_local_file_weights_are_loaded(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(123)
    reference = timm.create_model("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    info = resolve_weights("resnet18", str(path))
    assert info.pretrained and info.source == "file"
    model = create_feature_model("resnet18", ["layer1"], info, seed=0)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    random = create_feature_model("resnet18", ["layer1"], resolve_weights("resnet18", "none"), seed=0)
    assert not torch.equal(random.conv1.weight, reference.conv1.weight)
    assert all(not p.requires_grad for p in model.parameters())


def test_bad_weights_and_layers() -> None:
    with pytest.raises(ValueError, match="neither one of"):
        resolve_weights("resnet18", "/does/not/exist.pth")
    with pytest.raises(ValueError, match="'layer9' is not a feature layer"):
        create_feature_model("resnet18", ["layer9"], resolve_weights("resnet18", "none"))
    with pytest.raises(ValueError, match="unknown timm model"):
        create_feature_model("resnet_nonexistent", ["layer1"], resolve_weights("resnet18", "none"))


def _batch(keys: list[str], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (len(keys), 3, 32, 32), dtype=torch.uint8, generator=g)
    return Batch(pixels, keys, torch.zeros(len(keys), dtype=torch.long), torch.zeros(len(keys), 32, 32, dtype=torch.bool))


def test_each_image_is_forwarded_once_and_cache_spills_to_disk(tmp_path: Path) -> None:
    backbone = FrozenBackbone(
        "resnet18", ["layer1", "layer2"], resolve_weights("resnet18", "none"), torch.device("cpu"),
        cache_bytes=40_000, spill_dir=tmp_path / "spill",
    )
    batch = _batch(["a", "b", "c"])
    first = backbone.features(batch)
    again = backbone.features(batch)
    assert backbone.images_forwarded == 3
    assert [f.shape for f in first] == [(3, 64, 8, 8), (3, 128, 4, 4)]
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    assert any((tmp_path / "spill").iterdir())  # budget of 40 kB forced a spill
    mixed = backbone.features(_batch(["c", "d"], seed=0))
    assert backbone.images_forwarded == 4
    assert torch.equal(mixed[0][0], first[0][2])


def test_feature_cache_memory_budget(tmp_path: Path) -> None:
    cache = FeatureCache(max_memory_bytes=100, spill_dir=tmp_path)
    cache.put("x/y", [torch.zeros(10)])  # 40 bytes, in memory
    cache.put("x/z", [torch.ones(30)])  # 120 bytes, spilled
    assert cache.memory_bytes == 40 and "x/z" in cache
    assert torch.equal(cache.get("x/z")[0], torch.ones(30))
