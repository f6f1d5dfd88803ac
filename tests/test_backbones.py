"""Backbone weights resolution (offline, fast) and the frozen-feature cache."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from clbench.features.backbones import FeatureCache, FrozenBackbone, create_feature_model, feature_info, resolve_weights
from clbench.engine.config import ConfigError
from clbench.data import Batch


def test_auto_decides_fast_without_network(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="random init"):
        info = resolve_weights("resnet18", "auto")
    assert time.perf_counter() - start < 1.0
    assert (info.source, info.pretrained) == ("none", False)
    assert resolve_weights("resnet18", "none").pretrained is False


def test_bare_names_resolve_to_the_torchvision_tag(tmp_path: Path, monkeypatch) -> None:
    """timm >= 1.0 defaults resnet18 / wide_resnet50_2 to a1_in1k / racm_in1k; the references used
    torchvision's weights, which timm has as .tv_in1k: imagenet/auto take that tag, an explicit tag is kept."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for name in ("resnet18", "wide_resnet50_2"):
        info = resolve_weights(name, "imagenet")
        assert (info.tag, info.resolved_name, info.source) == ("tv_in1k", f"{name}.tv_in1k", "download")
    explicit = resolve_weights("resnet18.a1_in1k", "imagenet")
    assert (explicit.tag, explicit.resolved_name) == ("a1_in1k", "resnet18.a1_in1k")
    none = resolve_weights("resnet18", "none")
    assert (none.tag, none.resolved_name, none.pretrained) == (None, "resnet18", False)
    assert resolve_weights("efficientnet_b0", "imagenet").tag == "ra_in1k"  # no tv weights: timm's default


def _fake_hf_cache(cache: Path, repo: str, payload: bytes = b"weights") -> Path:
    """A file where huggingface_hub.try_to_load_from_cache looks for ``repo``'s model.safetensors."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    file = folder / "snapshots" / "0123abcd" / "model.safetensors"
    file.parent.mkdir(parents=True)
    file.write_bytes(payload)
    return file


def test_hf_cache_hit_is_the_tv_file_and_records_its_tag(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _fake_hf_cache(tmp_path / "hf", "timm/resnet18.a1_in1k")  # timm's default tag: not torchvision's weights
    with pytest.warns(UserWarning, match="resnet18.tv_in1k"):
        info = resolve_weights("resnet18", "auto")
    assert (info.source, info.pretrained) == ("none", False)
    hit = _fake_hf_cache(tmp_path / "hf", "timm/resnet18.tv_in1k")
    info = resolve_weights("resnet18", "auto")
    assert (info.source, info.pretrained, info.file, info.tag) == ("cache", True, str(hit), "tv_in1k")
    assert info.as_dict()["tag"] == "tv_in1k"  # what env.json records


def test_torch_hub_cache_hit_is_loaded_as_tv_weights(tmp_path: Path, monkeypatch) -> None:
    """torchvision's own download (checkpoints/resnet18-f37072fd.pth) is the tv_in1k file; timm's
    default-tag file beside it is not taken."""
    import timm

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(7)
    reference = timm.create_model("resnet18")
    torch.save(reference.state_dict(), checkpoints / Path(timm.models.get_pretrained_cfg("resnet18.a1_in1k").url).name)
    with pytest.warns(UserWarning, match="random init"):
        assert resolve_weights("resnet18", "auto").source == "none"
    cached = checkpoints / Path(timm.models.get_pretrained_cfg("resnet18.tv_in1k").url).name
    assert cached.name == "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), cached)
    info = resolve_weights("resnet18", "auto")
    assert (info.source, info.pretrained, info.file, info.tag) == ("cache", True, str(cached), "tv_in1k")
    model = create_feature_model("resnet18", ["layer1"], info, seed=0)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_feature_info_from_the_architecture_alone() -> None:
    state = torch.random.get_rng_state()
    assert feature_info("wide_resnet50_2", ["layer1", "layer2", "layer3"]) == ([256, 512, 1024], [4, 8, 16])
    assert feature_info("resnet18.tv_in1k", ["layer2", "layer3"]) == ([128, 256], [8, 16])
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    with pytest.raises(ValueError, match="unknown timm model"):
        feature_info("resnet_nonexistent", ["layer1"])


def test_require_pretrained_refuses_a_random_init_backbone() -> None:
    from clbench.features.backbones import BackbonePool
    from clbench.engine.config import ConfigError

    pool = BackbonePool("none", torch.device("cpu"), 0, 1 << 20, None, require_pretrained=True)
    with pytest.raises(ConfigError, match=r"backbone 'resnet18'.*random init.*--weights PATH.*--allow-random-init"):
        pool.get("resnet18", ["layer1"])


@pytest.mark.slow
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


@pytest.mark.slow
def test_weights_file_of_another_model_is_refused(tmp_path: Path) -> None:
    """timm loads a features_only model's file non-strictly: another model's state dict used to leave
    the backbone random (or fail with a paragraph) while env.json said a file was used."""
    import timm

    resnet18 = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), resnet18)
    with pytest.raises(ConfigError, match=r"resnet18\.pth: not weights for backbone 'wide_resnet50_2'.*layer1") as err:
        create_feature_model("wide_resnet50_2", ["layer1", "layer2"], resolve_weights("wide_resnet50_2", str(resnet18)))
    assert "\n" not in str(err.value)
    foreign = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, foreign)  # no shared names: loaded silently before
    with pytest.raises(ConfigError, match=r"other\.pth: .*'conv1\.weight' missing"):
        create_feature_model("resnet18", ["layer1"], resolve_weights("resnet18", str(foreign)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a torch file")
    with pytest.raises(ConfigError, match=r"garbage\.pth: not a weights file"):
        create_feature_model("resnet18", ["layer1"], resolve_weights("resnet18", str(garbage)))


@pytest.mark.slow
def test_matching_weights_file_loads_every_feature_tensor(tmp_path: Path) -> None:
    """A file saved from a timm model of the same architecture (safetensors, or a training
    checkpoint's wrapper with DataParallel names; a classifier head is extra) gives its weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    reference = timm.create_model("resnet18").state_dict()
    safetensors_file = tmp_path / "r18.safetensors"
    save_file(reference, safetensors_file)
    wrapped = tmp_path / "r18-checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.items()}}, wrapped)
    for path in (safetensors_file, wrapped):
        model = create_feature_model("resnet18", ["layer1", "layer2"], resolve_weights("resnet18", str(path)), seed=0)
        loaded = model.state_dict()
        assert "fc.weight" not in loaded and "layer2.0.conv1.weight" in loaded
        for key, tensor in loaded.items():
            assert torch.equal(tensor, reference[key]), key


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
