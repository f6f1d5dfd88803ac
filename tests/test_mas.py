"""MAS (strategies/mas.py) against Avalanche's own MASPlugin, and through the engine."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from helpers import engine_run, train_with_avalanche_plugin, train_with_strategy
from strategies.mas import MAS

LAMBDA, ALPHA, LR, BATCH = 20.0, 0.3, 0.05, 4


class Net(nn.Module):
    """A small autoencoder with batch norm; its output is what MAS differentiates."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def continual_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self(x)}


def tasks() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(8, 3, 6, 6, generator=g) + shift for shift in (0.0, 1.5, -1.0)]


def test_mas_equals_avalanches_plugin_step_by_step() -> None:
    pytest.importorskip("avalanche")
    from avalanche.training.plugins import MASPlugin

    ours_model, theirs_model = Net(), Net()
    strategy, plugin = MAS(lambda_reg=LAMBDA, alpha=ALPHA), MASPlugin(lambda_reg=LAMBDA, alpha=ALPHA)
    ours_penalties = train_with_strategy(strategy, ours_model, tasks(), epochs=2, batch=BATCH, lr=LR)
    theirs_penalties = train_with_avalanche_plugin(plugin, theirs_model, tasks(), epochs=2, batch=BATCH, lr=LR)

    assert ours_penalties[:4] == [0.0] * 4 and max(ours_penalties) > 1e-5
    assert ours_penalties == pytest.approx(theirs_penalties, rel=1e-5, abs=1e-9)
    for (name, p), (_, q) in zip(ours_model.named_parameters(), theirs_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    for name, value in strategy.importance.items():
        torch.testing.assert_close(value, plugin.importance[name].data, rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(strategy.anchor[name], plugin.params[name].data, msg=name)


@pytest.mark.slow
def test_mas_through_the_engine(synthetic_root: Path, tmp_path: Path) -> None:
    run = engine_run("cfa", "replay+mas", {"buffer_size": 4, "lambda_reg": 100.0}, synthetic_root, tmp_path / "mas")
    training = pd.read_csv(run / "training.csv")
    assert set(training[training.key == "loss/mas"].step) == {1}
    memory = pd.read_csv(run / "memory.csv").pivot(index="step", columns="component", values="bytes")
    assert (memory.strategy_state > 0).all() and (memory.replay_buffer > 0).all()
