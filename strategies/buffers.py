"""Replay storage policies: which training images a replay buffer keeps (Avalanche's "storage policy").

Images are kept as uint8 tensors at the training resolution, so the buffer's memory is what its
tensors occupy (300 images at 224 px = 300*3*224*224 B = 45.2 MB, seed 003).

Why not Avalanche's ``ExperienceBalancedBuffer`` / ``ReservoirSamplingBuffer``: they keep index
views of ``AvalancheDataset`` objects and update from an Avalanche strategy object
(``update(strategy)`` reads ``strategy.experience.dataset``); using them would mean wrapping our
tensors as Avalanche datasets and faking its strategy, and importing avalanche (3-7 s, many
packages) for ~60 lines of sampling logic. The policies below implement the same rules, seeded,
and their state is plain tensors that go into the run's checkpoint.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import torch

from clbench.data import Batch, SampleSet


class ReplayBuffer(ABC):
    """A fixed-capacity set of training images (uint8, (N, 3, S, S)) with their keys and tasks."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity  # >= 0: checked with the strategy's parameters (Replay.hyperparameters)
        self.generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.empty(0, dtype=torch.uint8)
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
        self.pixels = self.pixels[rows].clone() if rows else self.pixels[:0]
        self.keys = [self.keys[i] for i in rows]
        self.tasks = [self.tasks[i] for i in rows]

    def _append(self, task: str, samples: SampleSet, indices: list[int]) -> None:
        if not indices:
            return
        new = torch.stack([samples.store.image(samples.samples[i]) for i in indices])
        self.pixels = new if len(self) == 0 else torch.cat([self.pixels, new])
        self.keys += [samples.samples[i].key for i in indices]
        self.tasks += [task] * len(indices)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for task in self.tasks:
            out[task] = out.get(task, 0) + 1
        return out

    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()

    def sample(self, n: int) -> Batch:
        """n random stored images (without replacement, seeded) as a training batch."""
        return self.batch(torch.randperm(len(self), generator=self.generator)[: min(n, len(self))].tolist())

    def batch(self, rows: Sequence[int]) -> Batch:
        """The stored images at ``rows`` as a training batch (good images: label 0, empty masks)."""
        size = self.pixels.shape[-1]
        return Batch(
            pixels=self.pixels[list(rows)],
            keys=[self.keys[i] for i in rows],
            labels=torch.zeros(len(rows), dtype=torch.int64),
            masks=torch.zeros(len(rows), size, size, dtype=torch.bool),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"pixels": self.pixels, "keys": list(self.keys), "tasks": list(self.tasks),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pixels = state["pixels"]
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

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
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

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
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
                self.pixels[slot] = samples.store.image(sample)
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
