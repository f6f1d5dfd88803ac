"""Frozen timm backbones as a shared service: weight resolution without network, and a feature cache.

Weights (``weights`` in the config):
  ``none``      random init (seeded) — what tests, CI and the quickstart use here.
  ``imagenet``  timm's ImageNet weights: loaded from the local cache if present, else downloaded.
  ``<path>``    a local weights file (safetensors or torch checkpoint) for the same architecture.
  ``auto``      a local file/cache hit -> pretrained, otherwise random init with one warning.
                Decides from the file system only (milliseconds), never waits on download retries.

Every run records which weights it used (``WeightsInfo``) in env.json.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

WEIGHT_CHOICES = ("auto", "none", "imagenet")


@dataclass(frozen=True)
class WeightsInfo:
    """What a backbone was initialised from: recorded with every run."""

    requested: str
    source: str  # "none" | "cache" | "file" | "download"
    pretrained: bool
    file: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def cached_weights_file(model_name: str) -> Path | None:
    """The local copy of timm's default weights for ``model_name``, if any (HF hub or torch hub cache)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo = cfg.hf_hub_id.split("@")[0]
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                hit = try_to_load_from_cache(repo_id=repo, filename=filename)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(model_name: str, weights: str) -> WeightsInfo:
    """Decide where weights come from, from the file system alone (no network)."""
    if weights == "none":
        return WeightsInfo(weights, "none", False)
    if weights in ("auto", "imagenet"):
        hit = cached_weights_file(model_name)
        if hit is not None:
            return WeightsInfo(weights, "cache", True, str(hit))
        if weights == "imagenet":
            return WeightsInfo(weights, "download", True)
        warnings.warn(
            f"backbone '{model_name}': no local pretrained weights found (cache or file); "
            "using random init (weights: auto). Pass --weights PATH to use a local file.",
            stacklevel=2,
        )
        return WeightsInfo(weights, "none", False)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"weights: '{weights}' is neither one of {', '.join(WEIGHT_CHOICES)} nor an existing file")
    return WeightsInfo(weights, "file", True, str(path.resolve()))


def out_indices(model_name: str, layers: Sequence[str | int]) -> tuple[int, ...]:
    """Map layer names (e.g. 'layer2') or indices to timm ``out_indices``."""
    probe = timm.create_model(model_name, pretrained=False, features_only=True)
    names = [info["module"] for info in probe.feature_info.info]
    indices = []
    for layer in layers:
        if isinstance(layer, int):
            if not 0 <= layer < len(names):
                raise ValueError(f"layers: index {layer} out of range for '{model_name}' (0..{len(names) - 1})")
            indices.append(layer)
        elif layer in names:
            indices.append(names.index(layer))
        else:
            raise ValueError(f"layers: '{layer}' is not a feature layer of '{model_name}' (available: {', '.join(names)})")
    return tuple(indices)


def create_feature_model(
    model_name: str, layers: Sequence[str | int], weights: WeightsInfo, seed: int = 0
) -> nn.Module:
    """A timm ``features_only`` model returning the requested layers, frozen, in eval mode."""
    if not timm.is_model(model_name.split(".")[0]):
        raise ValueError(f"backbone: unknown timm model '{model_name}' (see timm.list_models())")
    indices = out_indices(model_name, layers)
    kwargs: dict = dict(features_only=True, out_indices=indices)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weights.source == "none":
            model = timm.create_model(model_name, pretrained=False, **kwargs)
        elif weights.source in ("cache", "file"):
            model = timm.create_model(
                model_name, pretrained=True, pretrained_cfg_overlay=dict(file=weights.file), **kwargs
            )
        else:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def trainable_feature_model(model_name: str, layers: Sequence[str | int], seed: int = 0) -> nn.Module:
    """A randomly initialised (seeded) ``features_only`` model to train, e.g. a student network."""
    if not timm.is_model(model_name.split(".")[0]):
        raise ValueError(f"backbone: unknown timm model '{model_name}' (see timm.list_models())")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices(model_name, layers))


class FeatureCache:
    """Per-image feature maps kept in RAM up to a byte budget, spilled to disk beyond it.

    Keys are the dataset's image keys, so an image's features are computed once per run
    whatever the number of evaluation steps or training epochs.
    """

    def __init__(self, max_memory_bytes: int, spill_dir: Path | None) -> None:
        self.max_memory_bytes = max_memory_bytes
        self.spill_dir = spill_dir
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._on_disk: set[str] = set()
        self.memory_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._on_disk

    def _disk_path(self, key: str) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / (key.replace("/", "__") + ".pt")

    def get(self, key: str) -> list[torch.Tensor]:
        if key in self._memory:
            return self._memory[key]
        return torch.load(self._disk_path(key), weights_only=True)

    def put(self, key: str, features: list[torch.Tensor]) -> None:
        size = sum(f.numel() * f.element_size() for f in features)
        if self.memory_bytes + size <= self.max_memory_bytes or self.spill_dir is None:
            self._memory[key] = features
            self.memory_bytes += size
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        torch.save(features, self._disk_path(key))
        self._on_disk.add(key)


class FrozenBackbone:
    """A frozen feature extractor shared by a run; each distinct image goes through it once.

    Not an ``nn.Module`` on purpose: methods hold it without it entering their ``state_dict``
    (it is rebuilt from name, layers, weights and seed on resume).
    """

    def __init__(
        self,
        model_name: str,
        layers: Sequence[str | int],
        weights: WeightsInfo,
        device: torch.device,
        seed: int = 0,
        cache_bytes: int = 4 << 30,
        spill_dir: Path | None = None,
    ) -> None:
        self.model_name = model_name
        self.layers = tuple(layers)
        self.weights = weights
        self.device = device
        self.model = create_feature_model(model_name, layers, weights, seed).to(device)
        self.cache = FeatureCache(cache_bytes, spill_dir)
        self.images_forwarded = 0
        self.forward_seconds = 0.0

    @property
    def channels(self) -> list[int]:
        return list(self.model.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        return list(self.model.feature_info.reduction())

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Features of a normalised float batch, uncached (for augmented or synthetic inputs)."""
        start = time.perf_counter()
        outputs = [out.float() for out in self.model(images.to(self.device))]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.forward_seconds += time.perf_counter() - start
        self.images_forwarded += images.shape[0]
        return outputs

    @torch.no_grad()
    def features(self, batch) -> list[torch.Tensor]:
        """Features of a ``Batch`` on the backbone's device, computed only for images not seen before."""
        missing = [i for i, key in enumerate(batch.keys) if key not in self.cache]
        if missing:
            pixels = batch.pixels[missing]
            from .data import normalize

            outputs = self.forward(normalize(pixels.to(self.device)))
            for row, i in enumerate(missing):
                self.cache.put(batch.keys[i], [out[row].to("cpu", copy=True) for out in outputs])
        per_image = [self.cache.get(key) for key in batch.keys]
        return [torch.stack([f[level] for f in per_image]).to(self.device) for level in range(len(self.layers))]


class BackbonePool:
    """Creates frozen backbones on request and shares identical ones within a run."""

    def __init__(self, weights: str, device: torch.device, seed: int, cache_bytes: int, spill_dir: Path | None) -> None:
        self.weights = weights
        self.device = device
        self.seed = seed
        self.cache_bytes = cache_bytes
        self.spill_dir = spill_dir
        self._backbones: dict[tuple, FrozenBackbone] = {}

    def get(self, model_name: str, layers: Sequence[str | int]) -> FrozenBackbone:
        key = (model_name, tuple(layers))
        if key not in self._backbones:
            info = resolve_weights(model_name, self.weights)
            spill = None if self.spill_dir is None else self.spill_dir / f"{model_name}-{len(self._backbones)}"
            self._backbones[key] = FrozenBackbone(
                model_name, layers, info, self.device, self.seed, self.cache_bytes, spill
            )
        return self._backbones[key]

    @property
    def backbones(self) -> list[FrozenBackbone]:
        return list(self._backbones.values())


def feature_info(model_name: str, layers: Sequence[str | int]) -> tuple[list[int], list[int]]:
    """(channels, reductions) of the requested layers, from the architecture alone (no weights)."""
    model = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices(model_name, layers))
    return list(model.feature_info.channels()), list(model.feature_info.reduction())
