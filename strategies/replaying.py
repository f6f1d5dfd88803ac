"""Replay's machinery: a buffer mixed into every batch (strategies/replay.py registers it as "replay";
strategies/der.py builds on it). See strategies/replay.py for the rules."""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch

from clbench.data import Batch, SampleSet
from clbench.engine import seeding
from clbench.params import NON_NEGATIVE_INT, Options, Param
from methods.base import AnomalyMethod
from strategies.base import Experience, Strategy
from strategies.buffers import POLICIES, ItemCodec, ReplayBuffer, replay_bytes


def concat(a: Batch, b: Batch) -> Batch:
    return Batch(
        pixels=torch.cat([a.pixels, b.pixels]),
        keys=a.keys + b.keys,
        labels=torch.cat([a.labels, b.labels]),
        masks=torch.cat([a.masks, b.masks]),
    )


def by_category(experience: Experience, current: SampleSet) -> list[tuple[str, SampleSet]]:
    """A step's training images split by category (a sample's key starts with ``<category>/``), in
    the step's order; a one-category step is its whole set."""
    if len(experience.task_names) == 1:
        return [(experience.task_names[0], current)]
    groups: dict[str, list] = {name: [] for name in experience.task_names}
    for sample in current.samples:
        category = sample.key.split("/", 1)[0]
        if category not in groups:
            raise ValueError(f"replay: training image {sample.key} is of none of the step's categories "
                             f"({', '.join(experience.task_names)})")
        groups[category].append(sample)
    return [(name, SampleSet(samples, current.store)) for name, samples in groups.items()]


class ReplayStream:
    """The current task's batches, each extended with as many images drawn from the buffer."""

    def __init__(self, current: SampleSet, buffer: ReplayBuffer) -> None:
        self.current = current
        self.buffer = buffer

    def __len__(self) -> int:
        return len(self.current)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        for batch in self.current.batches(batch_size, shuffle=shuffle, seed=seed):
            yield concat(batch, self.buffer.sample(batch_size)) if len(self.buffer) else batch


class ReplayBase(Strategy):
    """Replay's behaviour, unregistered, so replay-based strategies (der) share it without importing
    another strategy's module (a run imports its own strategy only)."""

    hyperparameters = {
        "buffer_size": Param(100, NON_NEGATIVE_INT, "images kept across tasks; 0: sequential training"),
        "policy": Param("balanced", Options(*POLICIES), "storage policy (strategies.buffers)"),
    }

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        self.buffer = POLICIES[self.params["policy"]](self.params["buffer_size"], seeding.buffer_seed(seed), self.codec())

    def codec(self) -> ItemCodec | None:
        """What the buffer stores per kept image (None: the image, ``buffers.ImageCodec``)."""
        return None

    def experiences(self, tasks: Sequence[Any]) -> list[Experience]:
        return Experience.stream(tasks)

    def training_stream(self, experience: Experience, current: SampleSet):
        return ReplayStream(current, self.buffer)

    def after_step(self, experience: Experience, current: SampleSet, method: AnomalyMethod | None = None) -> None:
        """The step's categories are offered one by one (the balanced policy balances per category)."""
        self.buffer.update_step(by_category(experience, current))

    def memory_components(self) -> dict[str, int]:
        return {"replay_buffer": self.buffer.nbytes()}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int,
                        method: AnomalyMethod | None = None) -> dict[str, int]:
        """A full buffer: ``buffer_size`` stored items (uint8 images here)."""
        size = cls.resolve_params(params)["buffer_size"]
        return {"replay_buffer": replay_bytes(size, image_size)}
