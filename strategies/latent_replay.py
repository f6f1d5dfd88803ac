"""Latent replay: a buffer of frozen-backbone features instead of images (Pellegrini et al. 2020).

Latent replay stores, for each kept training image, the activations at a "latent" layer below which the
network does not learn, and replays them through the trainable layers above it. In clbench that layer
is the frozen backbone of the methods whose trainable part reads nothing else: CFA's descriptor and
the flows of FastFlow and CAINNFlow (``AnomalyMethod.trains_on_frozen_features``). So:

* the storage policy and mixing are replay's (strategies/replay.py): the same images are kept
  (``balanced`` / ``reservoir``, same seed), and each training batch is the current task's B images
  plus B replayed rows; only what is stored differs: the image's features per backbone layer,
  flattened into one row (``LatentCodec``), by default in float16 (``dtype``), as the buffer's
  ``replay_buffer`` bytes in memory.csv;
* a replayed row reaches the method as ``Batch.latents``: its frozen backbone returns the stored
  features instead of computing them (``FrozenBackbone.features``), so the method's own loss trains
  on them unchanged. With ``dtype: float32`` this is replay exactly (tests/test_latent_replay.py);
* methods that train on pixels (STFPM's student, EfficientAD, DRAEM) or learn no weights (PaDiM,
  PatchCore) are refused with one line. STFPM's frozen network is its teacher, which gives the
  student's *targets*; the student itself starts from the image, so there is no frozen layer under
  what it learns (freezing the student's lower layers would be a different method, not done here).

Dense feature maps are not small: ResNet18's layers 1-3 are 7 values per input pixel (14 B in fp16)
against an image's 3 B, so a latent buffer costs about 5x an image buffer of the same count; the
report's CL-memory axis shows what that buys.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from clbench.data import Batch, SampleSet, collate
from clbench.features.backbones import cached_bytes_per_image
from clbench.params import ConfigError, Options, Param
from methods.base import AnomalyMethod, TrainStream
from strategies.base import STRATEGIES, Experience
from strategies.buffers import ItemCodec, ReplayBuffer
from strategies.replaying import ReplayBase

LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class LatentCodec:
    """Stores an image as its frozen-backbone features (``AnomalyMethod.latent_inputs``), flattened
    into one row; ``layout`` (backbone key, level, shape) turns rows back into per-layer maps."""

    def __init__(self, dtype: str) -> None:
        self.dtype = LATENT_DTYPES[dtype]
        self.method: AnomalyMethod | None = None
        self.layout: list[tuple[str, int, tuple[int, ...]]] = []

    def bind(self, method: AnomalyMethod) -> None:
        self.method = method

    def encode(self, samples: SampleSet, indices: Sequence[int]) -> torch.Tensor:
        if self.method is None:
            raise RuntimeError("latent replay: the codec encodes only once bound to the method")
        batch = collate([samples.samples[i] for i in indices], samples.store)
        with torch.no_grad():
            latents = self.method.latent_inputs(batch)
        layout = [(key, level, tuple(t.shape[1:])) for key in sorted(latents) for level, t in enumerate(latents[key])]
        if self.layout and layout != self.layout:
            raise ValueError(f"latent replay: features changed shape ({self.layout} -> {layout})")
        self.layout = layout
        return torch.cat([latents[key][level].flatten(1).to("cpu", self.dtype) for key, level, _ in layout], dim=1)

    def batch(self, items: torch.Tensor, keys: list[str]) -> Batch:
        latents: dict[str, list[torch.Tensor]] = {}
        offset = 0
        for key, _, shape in self.layout:
            size = math.prod(shape)
            latents.setdefault(key, []).append(items[:, offset:offset + size].reshape(len(keys), *shape))
            offset += size
        size = self.method.context.image_size if self.method is not None else 0
        return Batch(pixels=torch.empty(0, 3, size, size, dtype=torch.uint8), keys=keys,
                     labels=torch.zeros(len(keys), dtype=torch.int64),
                     masks=torch.zeros(len(keys), size, size, dtype=torch.bool), latents=latents)

    def state_dict(self) -> dict[str, Any]:
        return {"layout": [[key, level, list(shape)] for key, level, shape in self.layout]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.layout = [(str(key), int(level), tuple(int(d) for d in shape)) for key, level, shape in state.get("layout", [])]


def mix(current: Batch, current_latents: dict[str, list[torch.Tensor]], replayed: Batch) -> Batch:
    """The current images (pixels and features) followed by the replayed rows (features only)."""
    latents = {key: [torch.cat([cur, rep.to(cur.device, cur.dtype)]) for cur, rep in zip(levels, replayed.latents[key])]
               for key, levels in current_latents.items()}
    return Batch(pixels=current.pixels, keys=current.keys + replayed.keys,
                 labels=torch.cat([current.labels, replayed.labels]),
                 masks=torch.cat([current.masks, replayed.masks]), latents=latents)


class LatentReplayStream:
    """The current task's batches, each extended with as many stored feature rows."""

    def __init__(self, current: SampleSet, buffer: ReplayBuffer, method: AnomalyMethod) -> None:
        self.current = current
        self.buffer = buffer
        self.method = method

    def __len__(self) -> int:
        return len(self.current)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        for batch in self.current.batches(batch_size, shuffle=shuffle, seed=seed):
            if not len(self.buffer):
                yield batch
                continue
            yield mix(batch, self.method.latent_inputs(batch), self.buffer.sample(batch_size))


@STRATEGIES.register("latent_replay")
class LatentReplay(ReplayBase):
    """Replay of frozen-backbone features instead of images (module docstring)."""

    hyperparameters = {
        **ReplayBase.hyperparameters,  # plain defaults: their constraints are inherited (Parameterised)
        "dtype": Param("float16", Options(*LATENT_DTYPES), "precision of the stored features (float32: replay exactly)"),
    }

    def codec(self) -> ItemCodec:
        return LatentCodec(self.params["dtype"])

    def check_method(self, method: AnomalyMethod) -> None:
        if not method.trains_on_frozen_features:
            from methods.base import METHODS

            served = [name for name in METHODS.names() if METHODS.get(name).trains_on_frozen_features]
            raise ConfigError(f"strategy 'latent_replay' replays frozen-backbone features; '{method.name}' trains on "
                              f"images or learns no weights (latent replay serves {', '.join(served)}; use replay)")

    def before_step(self, method: AnomalyMethod, experience: Experience) -> None:
        """The buffer encodes and the stream mixes with this method's features (a combination's member too)."""
        self.buffer.codec.bind(method)

    def training_stream(self, experience: Experience, current: SampleSet) -> TrainStream:
        return LatentReplayStream(current, self.buffer, self.buffer.codec.method)

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int,
                        method: AnomalyMethod | None = None) -> dict[str, int]:
        """A full buffer of the ``method``'s frozen features (their shapes are its backbones'; 0 without it)."""
        p = cls.resolve_params(params)
        if method is None:
            return {"replay_buffer": 0}
        per_image = sum(cached_bytes_per_image(b.channels, b.reductions, image_size, p["dtype"]) for b in method.frozen_backbones())
        return {"replay_buffer": p["buffer_size"] * per_image}
