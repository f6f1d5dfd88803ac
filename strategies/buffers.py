"""Replay storage policies: which training images a replay buffer keeps (Avalanche's "storage policy").

Images are kept as uint8 tensors at the training resolution, so the buffer's memory is what its
tensors occupy (300 images at 224 px = 300*3*224*224 B = 45.2 MB, seed 003). What is stored per
kept image is the buffer's ``codec``: the image itself (``ImageCodec``, replay), or its frozen-backbone
features (latent replay's codec, strategies/latent_replay.py); the policies choose the same images either way.

Why not Avalanche's ``ExperienceBalancedBuffer`` / ``ReservoirSamplingBuffer``: they keep index
views of ``AvalancheDataset`` objects and update from an Avalanche strategy object
(``update(strategy)`` reads ``strategy.experience.dataset``); using them would mean wrapping our
tensors as Avalanche datasets and faking its strategy, and importing avalanche (3-7 s, many
packages) for ~60 lines of sampling logic. The policies below implement the same rules, seeded,
and their state is plain tensors that go into the run's checkpoint.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Protocol, Sequence

import torch

from clbench.data import Batch, SampleSet


class ItemCodec(Protocol):
    """What a buffer stores per kept training image, and how stored items become a training batch."""

    def encode(self, samples: SampleSet, indices: Sequence[int]) -> torch.Tensor: ...

    def batch(self, items: torch.Tensor, keys: list[str]) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class ImageCodec:
    """What an image replay buffer stores of a training image: its uint8 pixels (3, S, S)."""

    def encode(self, samples: SampleSet, indices: Sequence[int]) -> torch.Tensor:
        """The stored items (one row per sample) of ``samples.samples[i]`` for i in ``indices``."""
        return torch.stack([samples.store.image(samples.samples[i]) for i in indices])

    def batch(self, items: torch.Tensor, keys: list[str]) -> Batch:
        """Stored items as a training batch (good images: label 0, empty masks)."""
        size = items.shape[-1]
        return Batch(pixels=items, keys=keys, labels=torch.zeros(len(keys), dtype=torch.int64),
                     masks=torch.zeros(len(keys), size, size, dtype=torch.bool))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: an image needs no layout."""


class ReplayBuffer(ABC):
    """A fixed-capacity set of training images with their keys and tasks; ``items`` holds what the
    codec stores of each (by default the uint8 image, (N, 3, S, S))."""

    def __init__(self, capacity: int, seed: int = 0, codec: ItemCodec | None = None) -> None:
        self.capacity = capacity  # >= 0: checked with the strategy's parameters (Replay.hyperparameters)
        self.generator = torch.Generator().manual_seed(seed)
        self.codec = codec if codec is not None else ImageCodec()
        self.items = torch.empty(0, dtype=torch.uint8)
        self.keys: list[str] = []
        self.tasks: list[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    @abstractmethod
    def update(self, task: str, samples: SampleSet) -> None:
        """Offer one learned task's training images to the buffer."""

    def update_step(self, parts: Sequence[tuple[str, SampleSet]]) -> None:
        """Offer the tasks (categories) one step taught together, in stream order; a policy that
        balances over tasks counts each of them (``BalancedBuffer``)."""
        for task, samples in parts:
            self.update(task, samples)

    def _keep(self, rows: list[int]) -> None:
        self.items = self.items[rows].clone() if rows else self.items[:0]
        self.keys = [self.keys[i] for i in rows]
        self.tasks = [self.tasks[i] for i in rows]

    def _append(self, task: str, samples: SampleSet, indices: list[int]) -> None:
        if not indices:
            return
        new = self.codec.encode(samples, indices)
        self.items = new if len(self) == 0 else torch.cat([self.items, new])
        self.keys += [samples.samples[i].key for i in indices]
        self.tasks += [task] * len(indices)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for task in self.tasks:
            out[task] = out.get(task, 0) + 1
        return out

    def nbytes(self) -> int:
        return self.items.numel() * self.items.element_size()

    def sample(self, n: int) -> Batch:
        """n random stored items (without replacement, seeded) as a training batch."""
        return self.batch(torch.randperm(len(self), generator=self.generator)[: min(n, len(self))].tolist())

    def batch(self, rows: Sequence[int]) -> Batch:
        """The stored items at ``rows`` as a training batch (the codec's: images, or latents)."""
        return self.codec.batch(self.items[list(rows)], [self.keys[i] for i in rows])

    def state_dict(self) -> dict[str, Any]:
        return {"items": self.items, "keys": list(self.keys), "tasks": list(self.tasks),
                "generator": self.generator.get_state(), "codec": self.codec.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.items = state["items"] if "items" in state else state["pixels"]  # "pixels": checkpoints before latent replay
        self.codec.load_state_dict(state.get("codec", {}))
        self.keys = list(state["keys"])
        self.tasks = list(state["tasks"])
        self.generator.set_state(state["generator"])

    def _random_subset(self, n_total: int, k: int) -> list[int]:
        return sorted(torch.randperm(n_total, generator=self.generator)[:k].tolist())


class BalancedBuffer(ReplayBuffer):
    """The benchmark paper's policy: after task t every learned task holds capacity // t images;
    older tasks are re-subsampled at random (a subset of what they held), the new task's images
    are a random subset of its training images.

    A task is a *category*: a step that teaches several (a protocol's) adds each of them, so after
    it every learned category holds capacity // (categories learned) images. The paper's code
    balances per learned task, and there a task is one category; balancing per step instead would
    give a 10-category base step as many images as a later one-category step, its categories
    each a tenth as many."""

    def __init__(self, capacity: int, seed: int = 0, codec: ItemCodec | None = None) -> None:
        super().__init__(capacity, seed, codec)
        self.learned: list[str] = []  # tracked apart from the contents: a task may hold 0 images

    def update(self, task: str, samples: SampleSet) -> None:
        self.update_step([(task, samples)])

    def update_step(self, parts: Sequence[tuple[str, SampleSet]]) -> None:
        """Add every task of the step, then re-split: one re-subsampling of the older tasks, at the
        step's final quota (one task: the paper's update exactly, random draws included)."""
        if not parts:
            return
        old_tasks = list(self.learned)
        self.learned += [task for task, _ in parts]
        quota = self.capacity // len(self.learned)
        keep: list[int] = []
        for old in old_tasks:
            rows = [i for i, t in enumerate(self.tasks) if t == old]
            keep += [rows[j] for j in self._random_subset(len(rows), quota)]
        self._keep(sorted(keep))
        for task, samples in parts:
            self._append(task, samples, self._random_subset(len(samples), quota))


    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"learned": list(self.learned)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.learned = list(state["learned"])


class ReservoirBuffer(ReplayBuffer):
    """Reservoir sampling over every training image seen: each is kept with probability
    capacity / seen (Vitter's algorithm R), so the buffer is a uniform sample of the stream."""

    def __init__(self, capacity: int, seed: int = 0, codec: ItemCodec | None = None) -> None:
        super().__init__(capacity, seed, codec)
        self.seen = 0

    def update(self, task: str, samples: SampleSet) -> None:
        for index in range(len(samples)):
            self.seen += 1
            if len(self) < self.capacity:
                self._append(task, samples, [index])
                continue
            slot = int(torch.randint(0, self.seen, (1,), generator=self.generator))
            if slot < self.capacity:
                sample = samples.samples[index]
                self.items[slot] = self.codec.encode(samples, [index])[0]
                self.keys[slot] = sample.key
                self.tasks[slot] = task

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen = int(state["seen"])


POLICIES: dict[str, type[ReplayBuffer]] = {"balanced": BalancedBuffer, "reservoir": ReservoirBuffer}


def replay_bytes(buffer_size: int, image_size: int, channels: int = 3) -> int:
    """Analytic size of a full buffer of uint8 images."""
    return buffer_size * channels * image_size * image_size
