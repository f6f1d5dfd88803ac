"""``optimizer_state``: a fresh optimiser per task (reset) or one for the whole stream (keep)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from methods.base import AnomalyMethod, MethodContext


class Toy(AnomalyMethod):
    name = "toy"
    hyperparameters = {"optimizer_state": "reset"}

    def __init__(self, context, **params) -> None:
        super().__init__(context, **params)
        self.weight = nn.Parameter(torch.ones(3))

    def fit_task(self, data) -> None:
        optimiser = self.task_optimiser(lambda: torch.optim.Adam([self.weight], lr=0.1))
        scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=1, gamma=0.5)
        for _ in range(2):
            optimiser.zero_grad()
            self.weight.pow(2).sum().backward()
            optimiser.step()
            scheduler.step()
        self.last_optimiser = optimiser

    def predict(self, batch):  # pragma: no cover - not used
        raise NotImplementedError


def context() -> MethodContext:
    return MethodContext(backbones=None, device=torch.device("cpu"), image_size=32)  # type: ignore[arg-type]


def adam_steps(optimiser: torch.optim.Optimizer) -> int:
    return int(next(iter(optimiser.state.values()))["step"])


def test_reset_builds_a_fresh_optimiser_per_task() -> None:
    toy = Toy(context())
    toy.fit_task(None)
    first = toy.last_optimiser
    toy.fit_task(None)
    assert toy.last_optimiser is not first and adam_steps(toy.last_optimiser) == 2
    assert toy.training_state() == {}


def test_keep_carries_the_moments_and_restarts_the_learning_rate() -> None:
    toy = Toy(context(), optimizer_state="keep")
    toy.fit_task(None)
    first = toy.last_optimiser
    assert first.param_groups[0]["lr"] == pytest.approx(0.025)  # the scheduler lowered it
    toy.fit_task(None)
    assert toy.last_optimiser is first and adam_steps(first) == 4
    assert first.param_groups[0]["lr"] == pytest.approx(0.025)  # 0.1 again at the start of task 2


def test_keep_survives_a_resume_through_training_state() -> None:
    uninterrupted = Toy(context(), optimizer_state="keep")
    uninterrupted.fit_task(None)
    buffer = io.BytesIO()  # what the engine's checkpoint does: save, then a safe load
    torch.save({"method": uninterrupted.state_dict(), "training": uninterrupted.training_state()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = Toy(context(), optimizer_state="keep")
    resumed.load_state_dict(checkpoint["method"])
    resumed.load_training_state(checkpoint["training"])
    uninterrupted.fit_task(None)
    resumed.fit_task(None)
    assert adam_steps(resumed.last_optimiser) == 4
    assert torch.equal(resumed.weight, uninterrupted.weight)


def test_unknown_optimizer_state_is_one_line() -> None:
    with pytest.raises(ValueError, match="optimizer_state='sometimes' is not one of reset, keep"):
        Toy(context(), optimizer_state="sometimes")
