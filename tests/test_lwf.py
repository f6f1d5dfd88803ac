"""LwF (strategies/lwf.py): distillation towards a real copy of the previous model, and through the engine."""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.features.backbones import BackbonePool
from clbench.params import ConfigError
from helpers import engine_run, smooth_batch
from methods.base import MethodContext
from methods.stfpm import STFPM
from methods.training import TrainContext
from strategies.lwf import Distillation, LwF, old_outputs, trained_state

POOL = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)


def stfpm() -> STFPM:
    torch.manual_seed(0)
    return STFPM(MethodContext(POOL, torch.device("cpu"), image_size=32, seed=0, progress=False))


def test_the_penalty_equals_distillation_towards_a_deep_copy_of_the_old_model() -> None:
    """The old outputs come from the method with the stored weights swapped in: they must equal a
    deep copy of the method taken at the end of the task (batch norm statistics included)."""
    method = stfpm()
    method.train()
    with torch.no_grad():  # a few forward passes in train mode move the student's batch-norm statistics
        for seed in range(3):
            method.continual_outputs(smooth_batch(4, seed, 32))
    strategy = LwF(alpha=2.5)
    ctx = TrainContext(optimiser=torch.optim.SGD(method.parameters(), lr=0.1), method=method)
    Distillation(strategy).after_task(ctx)
    old = copy.deepcopy(method).eval()
    with torch.no_grad():  # the task after: weights and statistics move on
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        method.continual_outputs(smooth_batch(4, 9, 32))
    batch = smooth_batch(4, 11, 32)
    method.train()
    ctx.batch, ctx.added, ctx.parts = batch, {}, {}
    Distillation(strategy).before_backward(ctx)
    with torch.no_grad():
        expected_old = old.continual_outputs(batch)
    new = method.continual_outputs(batch)
    expected = 2.5 * sum(torch.nn.functional.mse_loss(new[k], expected_old[k]) for k in new)
    torch.testing.assert_close(ctx.added["lwf"], expected)
    assert method.training and all(m.training for m in method.student.modules())  # mode left as it was
    swapped = old_outputs(method, strategy.previous, batch)
    for key, value in expected_old.items():
        torch.testing.assert_close(swapped[key], value, msg=key)
    assert any(key.endswith("running_mean") for key in trained_state(method))


@pytest.mark.slow
def test_lwf_through_the_engine_and_refused_without_weights(synthetic_root: Path, tmp_path: Path) -> None:
    run = engine_run("stfpm", "lwf", {"alpha": 10.0}, synthetic_root, tmp_path / "lwf")
    training = pd.read_csv(run / "training.csv")
    penalty = training[training.key == "loss/lwf"]
    assert set(penalty.step) == {1} and (penalty.value > 0).all()
    memory = pd.read_csv(run / "memory.csv").pivot(index="step", columns="component", values="bytes")
    assert (memory.strategy_state >= memory.model_trainable * 0.99).all()  # one copy of the trained weights
    with pytest.raises(ConfigError, match="strategy 'lwf' needs a method trained by gradient descent; 'patchcore'"):
        engine_run("patchcore", "lwf", {}, synthetic_root, tmp_path / "pc")
