"""Online EWC (strategies/ewc.py) against Avalanche's own EWCPlugin, and through the engine."""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from clbench.params import ConfigError
from helpers import engine_run, reconstruction_loss, train_with_avalanche_plugin, train_with_strategy
from strategies.ewc import EWC

LAMBDA, DECAY, LR, BATCH = 50.0, 0.7, 0.05, 4


def tiny_model() -> nn.Module:
    """A small autoencoder with batch norm (so the importance pass's train/eval mode matters)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))


def tasks() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(8, 3, 6, 6, generator=g) + shift for shift in (0.0, 1.5, -1.0)]


def test_online_ewc_equals_avalanches_plugin_step_by_step() -> None:
    """Three tasks, two epochs each: the same penalties at every batch, the same weights after
    training, the same accumulated importances and anchors (Avalanche 0.6, mode='online')."""
    pytest.importorskip("avalanche")
    from avalanche.training.plugins import EWCPlugin

    ours_model, theirs_model = tiny_model(), tiny_model()
    ours = EWC(ewc_lambda=LAMBDA, decay_factor=DECAY)
    ours_penalties = train_with_strategy(ours, ours_model, tasks(), epochs=2, batch=BATCH, lr=LR)
    plugin = EWCPlugin(ewc_lambda=LAMBDA, mode="online", decay_factor=DECAY)
    theirs_penalties = train_with_avalanche_plugin(plugin, theirs_model, tasks(), epochs=2, batch=BATCH, lr=LR,
                                                   _criterion=lambda out, y: (out - y).pow(2).mean())
    importances, anchors = plugin.importances[len(tasks()) - 1], plugin.saved_params[len(tasks()) - 1]
    assert ours_penalties[:4] == [0.0] * 4 and max(ours_penalties) > 1e-4  # no penalty on task 0, then one
    assert ours_penalties == pytest.approx(theirs_penalties, rel=1e-5, abs=1e-9)
    for (name, p), (_, q) in zip(ours_model.named_parameters(), theirs_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert set(ours.importance) == set(importances) == set(anchors)
    for name in ours.importance:
        torch.testing.assert_close(ours.importance[name], importances[name].data, rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(ours.anchor[name], anchors[name].data, msg=name)


def test_importance_is_the_mean_squared_gradient_and_leaves_the_model_as_it_was() -> None:
    """Brute force with torch.autograd.grad on a copy; batch-norm statistics untouched."""
    model = tiny_model()
    x = tasks()[0]
    ours = EWC(ewc_lambda=LAMBDA, decay_factor=DECAY)
    train_with_strategy(ours, model, [x], epochs=1, batch=BATCH, lr=LR)
    reference = copy.deepcopy(model).eval()
    expected = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    batches = [x[i:i + BATCH] for i in range(0, len(x), BATCH)]
    for batch in batches:
        grads = torch.autograd.grad(reconstruction_loss(reference, batch), list(reference.parameters()))
        for (name, _), grad in zip(reference.named_parameters(), grads):
            expected[name] += grad.pow(2) / len(batches)
    for name, value in expected.items():
        torch.testing.assert_close(ours.importance[name], value, msg=name)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in model.parameters())


def test_ewc_state_memory_and_one_line_refusal(synthetic_root: Path, tmp_path: Path) -> None:
    run = engine_run("stfpm", "ewc", {"ewc_lambda": 1000.0}, synthetic_root, tmp_path / "ewc")
    training = pd.read_csv(run / "training.csv")
    penalty = training[training.key == "loss/ewc"]
    assert len(penalty) and set(penalty.step) == {1} and (penalty.value > 0).all()  # step 0 has nothing to keep
    memory = pd.read_csv(run / "memory.csv")
    state = memory[memory.component == "strategy_state"].set_index("step").bytes
    trainable = memory[memory.component == "model_trainable"].set_index("step").bytes
    # importance + anchor, fp32, of every weight the optimiser trains (STFPM's student: all but 0.2%)
    assert ((0.99 * 2 * trainable <= state) & (state <= 2 * trainable)).all(), (state.tolist(), trainable.tolist())
    with pytest.raises(ConfigError) as info:
        engine_run("padim", "ewc", {}, synthetic_root, tmp_path / "padim")
    assert str(info.value).startswith("strategy 'ewc' needs a method trained by gradient descent; 'padim'")
    assert "\n" not in str(info.value) and not (tmp_path / "padim").exists()
