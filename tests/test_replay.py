"""Replay buffers: balanced quotas N // t, reservoir capacity, B+B batch mixing, checkpointed state,
and the replay bytes in the memory log equal to the stored tensors."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.engine.config import RunConfig
from clbench.data import ImageStore, Sample, SampleSet
from clbench.engine.runner import run_experiment
from strategies.buffers import BalancedBuffer, ReservoirBuffer, replay_bytes
from strategies.replay import Replay, ReplayStream


class FakeStore(ImageStore):
    """Images whose pixels encode their index, without files."""

    def image(self, sample: Sample) -> torch.Tensor:
        return torch.full((3, self.size, self.size), int(sample.key.split("/")[-1]) % 256, dtype=torch.uint8)


def task_set(task: str, n: int, store: ImageStore) -> SampleSet:
    samples = [Sample(f"{task}/train/good/{i}", Path("x"), None, 0, "good") for i in range(n)]
    return SampleSet(samples, store)


def test_balanced_buffer_holds_n_over_t_per_task() -> None:
    store = FakeStore(8)
    buffer = BalancedBuffer(12, seed=0)
    previous: dict[str, set[str]] = {}
    for t, task in enumerate(["a", "b", "c", "d", "e"], start=1):
        buffer.update(task, task_set(task, 10, store))
        counts = buffer.counts()
        assert counts == {name: min(12 // t, 10) for name in "abcde"[:t]}  # 10 images per task
        assert buffer.nbytes() == buffer.items.numel() == len(buffer) * 3 * 8 * 8
        for name, keys in previous.items():  # older tasks are re-subsampled, never refilled
            now = {k for k, owner in zip(buffer.keys, buffer.tasks) if owner == name}
            assert now <= keys
        previous = {name: {k for k, owner in zip(buffer.keys, buffer.tasks) if owner == name} for name in counts}
    for key, pixels in zip(buffer.keys, buffer.items):
        assert int(pixels[0, 0, 0]) == int(key.split("/")[-1])  # stored images belong to their keys


def test_balanced_buffer_keeps_counting_tasks_that_hold_nothing() -> None:
    store = FakeStore(4)
    buffer = BalancedBuffer(2, seed=0)
    buffer.update("a", task_set("a", 5, store))
    buffer.update("b", task_set("b", 5, store))
    assert buffer.counts() == {"a": 1, "b": 1}
    for task in "c":
        buffer.update(task, task_set(task, 5, store))
    assert len(buffer) == 0  # 2 // 3 == 0 for every task
    buffer.update("d", task_set("d", 5, store))
    assert len(buffer) == 0  # 2 // 4 == 0: still four learned tasks, not one


def test_reservoir_respects_capacity_and_is_seeded() -> None:
    store = FakeStore(4)
    a, b = ReservoirBuffer(7, seed=3), ReservoirBuffer(7, seed=3)
    for task in "abc":
        a.update(task, task_set(task, 10, store))
        b.update(task, task_set(task, 10, store))
    assert len(a) == 7 and a.keys == b.keys and a.seen == 30
    assert len(set(a.keys)) == 7


def test_replay_stream_mixes_b_plus_b_and_state_round_trips() -> None:
    store = FakeStore(4)
    strategy = Replay(seed=0, buffer_size=6)
    strategy.buffer.update("old", task_set("old", 10, store))
    stream = ReplayStream(task_set("new", 7, store), strategy.buffer)
    batches = list(stream.batches(3))
    assert [len(b) for b in batches] == [6, 6, 4]  # 3 current + 3 replayed; last: 1 + 3
    for batch in batches:
        replayed = [k for k in batch.keys if k.startswith("old/")]
        assert len(replayed) == 3 and set(replayed) <= set(strategy.buffer.keys)
    clone = Replay(seed=5, buffer_size=6)
    clone.load_state_dict(strategy.state_dict())
    assert clone.buffer.keys == strategy.buffer.keys and torch.equal(clone.buffer.items, strategy.buffer.items)
    assert clone.buffer.sample(4).keys == strategy.buffer.sample(4).keys  # generator state restored too


def test_bad_replay_params() -> None:
    with pytest.raises(ValueError, match="policy='fifo' is not one of balanced, reservoir"):
        Replay(policy="fifo")
    with pytest.raises(ValueError, match="buffer_size=-1 is not an integer >= 0"):
        Replay(buffer_size=-1)


def test_analytic_replay_memory_matches_seed_003() -> None:
    assert replay_bytes(300, 224) == 45_158_400  # 45.2 MB
    assert replay_bytes(300, 256) == 58_982_400  # 59.0 MB


@pytest.mark.slow
def test_replay_run_logs_buffer_bytes(synthetic_root: Path, tmp_path: Path) -> None:
    config = RunConfig(data_root=str(synthetic_root), synthetic=False, tasks=3, image_size=64, weights="none",
                       output_dir=str(tmp_path), device="cpu", strategy="replay",
                       strategy_params={"buffer_size": 6}, method_params={"n_features": 40})
    run_dir = run_experiment(config, progress=False)
    memory = pd.read_csv(run_dir / "memory.csv")
    replay = memory[memory.component == "replay_buffer"].set_index("step")["bytes"]
    assert replay.tolist() == [6 * 3 * 64 * 64] * 3  # 6, then 3 + 3, then 2 + 2 + 2 images
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["strategy"]["buffer"]
    assert pd.Series(state["tasks"]).value_counts().tolist() == [2, 2, 2]
