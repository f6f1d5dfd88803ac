"""DER++ (strategies/der.py): stored outputs are the model's at storing time, and the run through the engine."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.params import ConfigError
from helpers import engine_run
from strategies.base import STRATEGIES


@pytest.mark.slow
def test_der_stores_outputs_of_its_buffer_and_distils_them(synthetic_root: Path, tmp_path: Path) -> None:
    run = engine_run("stfpm", "der", {"buffer_size": 4, "alpha": 5.0}, synthetic_root, tmp_path / "der", tasks=3)
    plain = engine_run("stfpm", "replay", {"buffer_size": 4}, synthetic_root, tmp_path / "replay", tasks=3)
    training = pd.read_csv(run / "training.csv")
    assert set(training[training.key == "loss/der"].step) == {1, 2} and (training[training.key == "loss/der"].value > 0).all()
    memory = {r: pd.read_csv(r / "memory.csv").pivot(index="step", columns="component", values="bytes") for r in (run, plain)}
    assert (memory[run].replay_buffer == memory[plain].replay_buffer).all()  # the same images kept
    state = torch.load(run / "checkpoint.pt", weights_only=True)["strategy"]
    assert sorted(state["outputs"]) == sorted(state["buffer"]["keys"])  # one entry per buffered image, no leftovers
    per_image = {k: sum(t.numel() * 4 for t in v.values()) for k, v in state["outputs"].items()}
    assert memory[run].strategy_state.iloc[-1] == sum(per_image.values()) > 0
    with pytest.raises(ConfigError, match="strategy 'der' needs a method trained by gradient descent; 'padim'"):
        engine_run("padim", "der", {}, synthetic_root, tmp_path / "padim")


def test_der_and_replay_both_decide_the_data() -> None:
    with pytest.raises(ConfigError, match="replay and der both decide what the method trains on"):
        STRATEGIES.get("replay+der")
    assert STRATEGIES.get("der+ewc").parts[0].name == "der"
