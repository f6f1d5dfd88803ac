"""The seeding helper: its streams are the ones earlier versions drew (values recorded before
``clbench.engine.seeding`` existed, so results stay bit-identical), and the streams of one run do
not share a seed, except where ``KNOWN_COINCIDENCES`` says."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from clbench.data import ImageStore, Sample, SampleSet
from clbench.engine import seeding
from methods.base import AnomalyMethod, MethodContext
from methods.training import fit_epochs
from strategies.base import Experience
from strategies.replay import Replay
from strategies.sequential import Sequential


class FakeStore(ImageStore):
    """Images whose pixels encode their index, without files."""

    def image(self, sample: Sample) -> torch.Tensor:
        return torch.full((3, self.size, self.size), int(sample.key.split("/")[-1]) % 256, dtype=torch.uint8)


def task_set(task: str, n: int) -> SampleSet:
    return SampleSet([Sample(f"{task}/train/good/{i}", Path("x"), None, 0, "good") for i in range(n)], FakeStore(4))


# -- values recorded before the helper existed (the quickstart's seed 0, and seed 2) ------------------
RECORDED_BUFFERS = {
    "balanced": (["a/train/good/5", "a/train/good/7", "b/train/good/2", "b/train/good/8", "c/train/good/7", "c/train/good/9"],
                 ["c/train/good/7", "c/train/good/9", "a/train/good/7"]),
    "reservoir": (["a/train/good/9", "a/train/good/1", "b/train/good/7", "b/train/good/8", "a/train/good/6", "a/train/good/5"],
                  ["b/train/good/7", "a/train/good/9", "b/train/good/8"]),
}


def test_replay_buffers_of_seed_0_keep_and_replay_the_recorded_images() -> None:
    for policy, (kept, replayed) in RECORDED_BUFFERS.items():
        replay = Replay(seed=0, buffer_size=6, policy=policy)
        for task in "abc":
            replay.after_step(Experience(0, task, (task,)), task_set(task, 10))
        assert replay.buffer.keys == kept, policy
        assert replay.buffer.sample(3).keys == replayed, policy


class Recorder(AnomalyMethod):
    """A one-weight method that records the step seeds and the batches the trainer gives it."""

    name = "recorder"

    def __init__(self, context: MethodContext) -> None:
        super().__init__(context)
        self.weight = nn.Parameter(torch.zeros(1))
        self.seeds: list[int] = []
        self.batches: list[list[str]] = []

    def fit_task(self, data) -> None:
        self.seeds.append(data.seed)

        def loss(batch):
            self.batches.append(list(batch.keys))
            return (self.weight - 1).pow(2).sum()

        self.fit_info = fit_epochs(self, data, loss, torch.optim.SGD([self.weight], lr=0.1), epochs=2, batch_size=4, patience=None)

    def predict(self, batch):  # pragma: no cover - not used
        raise NotImplementedError


RECORDED_STEPS = {
    0: ([0, 1], [
        ["a/train/good/2", "a/train/good/5", "a/train/good/3", "a/train/good/0"], ["a/train/good/1", "a/train/good/4"],
        ["a/train/good/1", "a/train/good/5", "a/train/good/2", "a/train/good/0"], ["a/train/good/3", "a/train/good/4"],
        ["b/train/good/1", "b/train/good/5", "b/train/good/0", "b/train/good/2"], ["b/train/good/3", "b/train/good/4"],
        ["b/train/good/5", "b/train/good/3", "b/train/good/1", "b/train/good/2"], ["b/train/good/4", "b/train/good/0"],
    ]),
    2: ([2000006, 2000007], [
        ["a/train/good/2", "a/train/good/3", "a/train/good/4", "a/train/good/0"], ["a/train/good/5", "a/train/good/1"],
        ["a/train/good/5", "a/train/good/0", "a/train/good/3", "a/train/good/1"], ["a/train/good/2", "a/train/good/4"],
        ["b/train/good/0", "b/train/good/5", "b/train/good/2", "b/train/good/4"], ["b/train/good/3", "b/train/good/1"],
        ["b/train/good/5", "b/train/good/0", "b/train/good/4", "b/train/good/1"], ["b/train/good/2", "b/train/good/3"],
    ]),
}


def test_step_seeds_and_epoch_shuffles_are_the_recorded_ones() -> None:
    for run_seed, (seeds, batches) in RECORDED_STEPS.items():
        strategy = Sequential(seed=run_seed)
        strategy.progress = False
        method = Recorder(MethodContext(None, torch.device("cpu"), 8, seed=run_seed))  # type: ignore[arg-type]
        for step, task in enumerate("ab"):
            strategy.train(method, Experience(step, task, (task,)), task_set(task, 6), task_set(task, 0))
        assert method.seeds == seeds and method.batches == batches, run_seed


def test_derived_seeds_are_the_frozen_values() -> None:
    """Literal values of the arithmetic the earlier code spelled out (runner, trainer, PatchCore,
    DRAEM, STFPM, replay): a change here changes every run's results."""
    step = seeding.step_seed(3, 2)
    assert step == 3000011
    assert seeding.epoch_seed(step, 4) == 3000011004
    assert seeding.bank_seed(step, 1) == 3000020000034
    assert seeding.simulation_seed(step, 4, 5) == 3000020400050
    assert seeding.rotation_seed(step, 4, 5) == 4611689018447787954
    assert seeding.student_seed(3) == 1000006
    assert seeding.buffer_seed(3) == 3
    assert seeding.bank_seed(2**62, 0) < 2**62  # a valid torch.Generator seed for any step seed


# -- distinct streams ------------------------------------------------------------------------------
def run_streams(run_seed: int, steps: int, epochs: int) -> dict[int, set[tuple]]:
    """Seed -> the streams of one run that use it: step, epoch (trainer), replay buffer, student."""
    used: dict[int, set[tuple]] = defaultdict(set)
    used[seeding.buffer_seed(run_seed)].add(("buffer",))
    used[seeding.student_seed(run_seed)].add(("student",))
    for t in range(steps):
        step = seeding.step_seed(run_seed, t)
        used[step].add(("step", t))
        for e in range(epochs):
            used[seeding.epoch_seed(step, e)].add(("epoch", t, e))
    return used


def step_streams(step: int, epochs: int, batches: int) -> dict[int, set[tuple]]:
    """Seed -> the per-batch streams of one step: DRAEM's simulation and rotation, PatchCore's banks."""
    used: dict[int, set[tuple]] = defaultdict(set)
    for e in range(epochs):
        for b in range(batches):
            used[seeding.simulation_seed(step, e, b)].add(("simulation", e, b))
            used[seeding.rotation_seed(step, e, b)].add(("rotation", e, b))
    for j in range(batches):
        used[seeding.bank_seed(step, j)].add(("bank", j))
    return used


def shared(used: dict[int, set[tuple]]) -> list[set[tuple]]:
    return [streams for streams in used.values() if len(streams) > 1]


def test_streams_of_one_run_never_share_a_seed() -> None:
    for run_seed in (2, 3, 17, 12345):
        assert shared(run_streams(run_seed, steps=20, epochs=1000)) == [], run_seed


def test_per_batch_streams_of_one_step_never_share_a_seed_except_bank_and_epoch_0() -> None:
    """PatchCore's bank j and DRAEM's epoch-0 batch j coincide (KNOWN_COINCIDENCES): different
    methods, never in one run. Nothing else coincides within a step, nor with the run's streams."""
    for run_seed in (2, 5):
        run = run_streams(run_seed, steps=3, epochs=50)
        for t in range(3):
            used = step_streams(seeding.step_seed(run_seed, t), epochs=20, batches=300)
            assert all({kind for kind, *_ in s} == {"bank", "simulation"} and len(s) == 2 for s in shared(used))
            assert not set(used) & set(run)


def test_draem_simulation_streams_of_two_steps_meet_only_after_10_epochs() -> None:
    for run_seed in (2, 7):
        seeds: dict[int, set[tuple]] = defaultdict(set)
        for t in range(4):
            step = seeding.step_seed(run_seed, t)
            for e in range(10):
                for b in range(200):
                    seeds[seeding.simulation_seed(step, e, b)].add((t, e, b))
        assert shared(seeds) == []
    step, next_step = seeding.step_seed(2, 0), seeding.step_seed(2, 1)  # the documented coincidence
    assert seeding.simulation_seed(step, 10, 0) == seeding.simulation_seed(next_step, 0, 27)


def test_run_seeds_0_and_1_share_only_the_documented_seeds() -> None:
    """Seed 0 (the quickstart's): step 0's seed is 0, so step t, epoch t of step 0 and the replay
    buffer (step 0) coincide; seed 1: STFPM's student and step 1. Kept to keep results."""
    found = {frozenset(s) for s in shared(run_streams(0, steps=20, epochs=100))}
    expected = {frozenset({("step", 0), ("epoch", 0, 0), ("buffer",)})}
    expected |= {frozenset({("step", t), ("epoch", 0, t)}) for t in range(1, 20)}
    assert found == expected
    assert [set(s) for s in shared(run_streams(1, steps=20, epochs=100))] == [{("step", 1), ("student",)}]
    assert len(seeding.KNOWN_COINCIDENCES) == 5  # the docstring's list: update it with this test
