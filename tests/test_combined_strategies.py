"""Strategies combined by name (strategies/combined.py): ``replay+ewc`` and its checks."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import pytest

from clbench.params import ConfigError
from helpers import engine_run
from strategies.base import STRATEGIES


def test_a_combination_splits_its_parameters_among_its_parts() -> None:
    cls = STRATEGIES.get("ewc+replay")  # the data part goes first whatever the order written
    assert [p.name for p in cls.parts] == ["replay", "ewc"] and cls.name == "ewc+replay"
    strategy = cls(seed=3, buffer_size=6, ewc_lambda=2.0)
    replay, ewc = strategy.members
    assert replay.params == {"buffer_size": 6, "policy": "balanced"}
    assert ewc.params == {"ewc_lambda": 2.0, "decay_factor": 1.0}
    assert cls.analytic_memory({"buffer_size": 6}, 32) == {"replay_buffer": 6 * 3 * 32 * 32, "strategy_state": 0}


@pytest.mark.parametrize("name, message", [
    ("replay+joint", "strategy 'replay+joint': replay and joint both decide what the method trains on"),
    ("ewc+ewc", "strategy 'ewc+ewc': a part is named twice"),
    ("replay+nope", "unknown strategy 'nope' (available: "),
])
def test_bad_combinations_are_one_line_errors(name: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        STRATEGIES.get(name)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_an_unknown_parameter_names_the_combination_and_its_keys() -> None:
    with pytest.raises(ConfigError) as info:
        STRATEGIES.get("replay+ewc").resolve_params({"ewc_lamda": 1.0})
    assert "'ewc_lamda'" in str(info.value) and "replay+ewc" in str(info.value) and "ewc_lambda" in str(info.value)


@pytest.mark.slow
def test_replay_plus_ewc_through_the_engine(synthetic_root: Path, tmp_path: Path) -> None:
    """Replay's buffer and EWC's penalty both act; ``sequential+ewc`` is ``ewc`` exactly."""
    both = engine_run("stfpm", "replay+ewc", {"buffer_size": 4, "ewc_lambda": 1000.0}, synthetic_root, tmp_path / "a")
    replay = engine_run("stfpm", "replay", {"buffer_size": 4}, synthetic_root, tmp_path / "b")
    training = pd.read_csv(both / "training.csv")
    assert set(training[training.key == "loss/ewc"].step) == {1}
    memory = {run: pd.read_csv(run / "memory.csv").pivot(index="step", columns="component", values="bytes")
              for run in (both, replay)}
    assert (memory[both].replay_buffer == memory[replay].replay_buffer).all() and (memory[both].replay_buffer > 0).all()
    assert (memory[both].strategy_state > 0).all()
    alone = engine_run("stfpm", "ewc", {"ewc_lambda": 1000.0}, synthetic_root, tmp_path / "c")
    spelled = engine_run("stfpm", "sequential+ewc", {"ewc_lambda": 1000.0}, synthetic_root, tmp_path / "d")
    assert (alone / "metrics.csv").read_text() == (spelled / "metrics.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("data_part", ["der", "latent_replay"])
def test_a_data_part_keeps_its_step_hooks_in_a_combination(data_part: str, synthetic_root: Path, tmp_path: Path) -> None:
    """``der+ewc`` stores DER's outputs and ``latent_replay+ewc`` binds its buffer to the method
    (``before_step`` / ``after_step`` reach every part), beside EWC's penalty."""
    run = engine_run("fastflow", f"{data_part}+ewc", {"buffer_size": 4, "ewc_lambda": 1.0}, synthetic_root, tmp_path / "run",
                     method_params={"backbone": "resnet18"})
    state = torch.load(run / "checkpoint.pt", weights_only=True)["strategy"][data_part]
    assert len(state["buffer"]["keys"]) == 4
    if data_part == "der":  # one stored output per buffered image
        assert sorted(state["outputs"]) == sorted(state["buffer"]["keys"])
    else:  # ResNet18 layers 1-3 at 64 px, float16: features, not images
        assert state["buffer"]["items"].dtype == torch.float16 and state["buffer"]["items"].shape == (4, 28672)
    training = pd.read_csv(run / "training.csv")
    assert set(training[training.key == "loss/ewc"].step) == {1}
