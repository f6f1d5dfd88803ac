"""The one training loop (``methods.training``): a strategy adds a loss term to a method it does not
touch, named parts are summed and logged, schedulers step per epoch or per iteration, early stopping
restores the best state, and the guards stop on non-finite losses."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from clbench.data import ImageStore, Sample, SampleSet
from clbench.features.backbones import BackbonePool
from methods.base import MethodContext
from methods.stfpm import STFPM
from methods.training import Callback, TrainContext, train_loop
from strategies.base import Experience
from strategies.sequential import Sequential


# -- a strategy adds a loss term to a method it does not touch -------------------------------------
class NoiseStore(ImageStore):
    """Seeded noise images, one per key, without files."""

    def image(self, sample: Sample) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(sample.key.rsplit("/", 1)[-1]))
        return torch.randint(0, 256, (3, self.size, self.size), generator=generator, dtype=torch.uint8)


def images(n: int, size: int = 32) -> SampleSet:
    return SampleSet([Sample(f"alpha/train/good/{i}", Path("x"), None, 0, "good") for i in range(n)], NoiseStore(size))


class L2Penalty(Callback):
    """strength * sum of the squared trained weights, added to every batch's loss (records its values)."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.values: list[tuple[float, int]] = []

    def before_backward(self, ctx: TrainContext) -> None:
        penalty = self.strength * sum(p.pow(2).sum() for p in ctx.parameters())
        self.values.append((float(penalty.detach()), len(ctx.batch)))
        ctx.add_loss("l2", penalty)


class L2Sequential(Sequential):
    """A test-only regularisation strategy: sequential training plus an L2 penalty, through the hook."""

    def __init__(self, strength: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.penalty = L2Penalty(strength)

    def callbacks(self, experience: Experience) -> list[Callback]:
        return [self.penalty]


POOL: list[BackbonePool] = []  # one frozen teacher (and its feature cache) for the three runs


def train_stfpm(strategy: Sequential, **params) -> STFPM:
    if not POOL:
        POOL.append(BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 28, spill_dir=None))
    context = MethodContext(POOL[0], torch.device("cpu"), image_size=32, seed=0, progress=False, max_epochs=1)
    model = STFPM(context, backbone="resnet18", batch_size=4, **params)
    strategy.progress = False
    strategy.train(model, Experience(0, "alpha", ("alpha",)), images(6), images(0))
    return model


def test_a_strategy_adds_a_loss_term_through_the_hooks_without_touching_the_method() -> None:
    """The penalty c * ||w||^2 adds 2c * w to the gradient: exactly what SGD's weight decay
    (wd + 2c) does, by another route. Without it the weights differ."""
    strength = 0.05
    plain = train_stfpm(Sequential())
    strategy = L2Sequential(strength)
    penalised = train_stfpm(strategy)
    decayed = train_stfpm(Sequential(), weight_decay=1e-4 + 2 * strength)
    for name, weight in penalised.student.state_dict().items():
        if weight.is_floating_point():
            torch.testing.assert_close(weight, decayed.student.state_dict()[name], rtol=1e-5, atol=1e-6)
    moved = max((w - plain.student.state_dict()[k]).abs().max().item() for k, w in penalised.student.state_dict().items()
                if w.is_floating_point())
    assert moved > 1e-3
    # the part is logged per epoch (a per-image mean), and fit_info keeps its keys
    values = strategy.penalty.values
    assert len(values) == 2  # 6 images in batches of 4: two iterations
    record = penalised.epoch_log[0]
    assert record["loss/l2"] == pytest.approx(sum(v * n for v, n in values) / 6, rel=1e-12)
    assert record["loss"] > record["loss/l2"] > 0 and record["lr"] == 0.4 and record["epoch"] == 0
    assert "loss/l2" not in plain.epoch_log[0] and set(penalised.fit_info) == set(plain.fit_info)


# -- the loop itself, on tiny models ---------------------------------------------------------------
class Rows(list):
    """A batch: a list of input rows (the loop only needs ``len``)."""


def batches_of(sizes: list[int]):
    x = torch.linspace(-1, 1, sum(sizes)).view(-1, 1)
    splits = list(torch.split(x, sizes))
    return lambda epoch: [Rows(part) for part in splits]


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(1, 1)


def test_named_parts_are_summed_in_order_and_logged_as_per_image_or_per_iteration_means() -> None:
    def parts(model):
        def loss(batch):
            y = model(torch.stack(list(batch)))
            return {"a": y.pow(2).mean(), "b": (y - 1).abs().mean()}
        return loss

    def summed(model):
        def loss(batch):
            y = model(torch.stack(list(batch)))
            return y.pow(2).mean() + (y - 1).abs().mean()
        return loss

    seen: list[tuple[float, float, int]] = []

    class Spy(Callback):
        def before_backward(self, ctx: TrainContext) -> None:
            seen.append((ctx.parts["a"].item(), ctx.parts["b"].item(), len(ctx.batch)))

    named, single = linear(), linear()
    result = train_loop(parts(named), torch.optim.SGD(named.parameters(), lr=0.1), epochs=1,
                        batches=batches_of([3, 1]), modules=[named], callbacks=[Spy()])
    train_loop(summed(single), torch.optim.SGD(single.parameters(), lr=0.1), epochs=1, batches=batches_of([3, 1]),
               modules=[single])
    assert all(torch.equal(p, q) for p, q in zip(named.parameters(), single.parameters()))  # same arithmetic
    record = result.epoch_log[0]
    assert record["loss/a"] == pytest.approx((seen[0][0] * 3 + seen[1][0]) / 4)
    assert record["loss/b"] == pytest.approx((seen[0][1] * 3 + seen[1][1]) / 4)
    assert record["loss"] == pytest.approx(record["loss/a"] + record["loss/b"])
    assert result.images == 4 and result.iterations == 2 and "val_loss" not in record

    seen.clear()
    per_iteration = linear()
    result = train_loop(parts(per_iteration), torch.optim.SGD(per_iteration.parameters(), lr=0.1), epochs=1,
                        batches=batches_of([3, 1]), modules=[per_iteration], callbacks=[Spy()], average="iterations")
    assert result.epoch_log[0]["loss/a"] == pytest.approx((seen[0][0] + seen[1][0]) / 2)


@pytest.mark.parametrize("interval, lrs, final", [
    ("iteration", [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125], 0.015625),
    ("epoch", [1.0, 1.0, 1.0, 0.5, 0.5, 0.5], 0.25),
])
def test_scheduler_steps_per_iteration_or_per_epoch(interval: str, lrs: list[float], final: float) -> None:
    model = linear()
    optimiser = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=1, gamma=0.5)
    used: list[float] = []

    class LearningRates(Callback):
        def before_backward(self, ctx: TrainContext) -> None:
            used.append(ctx.optimiser.param_groups[0]["lr"])

    result = train_loop(lambda b: model(torch.stack(list(b))).pow(2).mean(), optimiser, epochs=2,
                        batches=batches_of([2, 2, 1]), modules=[model], scheduler=scheduler,
                        scheduler_interval=interval, callbacks=[LearningRates()])
    assert used == lrs and optimiser.param_groups[0]["lr"] == final
    assert [r["lr"] for r in result.epoch_log] == [lrs[0], lrs[3]]  # the lr at each epoch's start


def test_early_stopping_restores_the_best_state_and_runs_every_hook() -> None:
    model = linear()
    val_losses = iter([3.0, 1.0, 2.0, 2.5, 0.5])
    snapshots: list[torch.Tensor] = []
    calls: list[str] = []

    class Hooks(Callback):
        def before_task(self, ctx: TrainContext) -> None:
            calls.append("before_task")

        def after_epoch(self, ctx: TrainContext) -> None:
            calls.append(f"after_epoch {ctx.record['epoch']} {ctx.record['val_loss']}")
            snapshots.append(model.weight.detach().clone())

        def after_task(self, ctx: TrainContext) -> None:
            calls.append(f"after_task {ctx.result.best_epoch}")

    result = train_loop(lambda b: (model(torch.stack(list(b))) - 5).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1),
                        epochs=10, batches=batches_of([2, 2]), modules=[model], validate=lambda: next(val_losses),
                        patience=2, callbacks=[Hooks()])
    assert result.epochs_run == 4 and result.best_epoch == 1 and result.best_val_loss == 1.0  # 2 stale epochs: stop
    assert calls == ["before_task", "after_epoch 0 3.0", "after_epoch 1 1.0", "after_epoch 2 2.0",
                     "after_epoch 3 2.5", "after_task 1"]
    assert torch.equal(model.weight, snapshots[1]) and not torch.equal(snapshots[1], snapshots[3])
    assert not model.training  # eval mode after training


def test_non_finite_losses_stop_with_one_line_naming_the_parts() -> None:
    model = linear()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    nan_part = lambda b: {"fit": model(torch.stack(list(b))).mean(), "bad": torch.tensor(math.nan)}  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"^toy: non-finite training loss \(nan; fit=.*, bad=nan\) at epoch 0"):
        train_loop(nan_part, optimiser, epochs=1, batches=batches_of([2]), modules=[model], label="toy")

    class Infinite(Callback):
        def before_backward(self, ctx: TrainContext) -> None:
            ctx.add_loss("penalty", torch.tensor(math.inf))

    fine = lambda b: model(torch.stack(list(b))).pow(2).mean()  # noqa: E731
    with pytest.raises(FloatingPointError, match="penalty=inf"):
        train_loop(fine, optimiser, epochs=1, batches=batches_of([2]), modules=[model], callbacks=[Infinite()])
    with pytest.raises(FloatingPointError, match="non-finite validation loss"):
        train_loop(fine, optimiser, epochs=1, batches=batches_of([2]), modules=[model], validate=lambda: math.nan, patience=1)


def test_a_callback_cannot_replace_a_part_of_the_method() -> None:
    model = linear()

    class Clash(Callback):
        def before_backward(self, ctx: TrainContext) -> None:
            ctx.add_loss("fit", torch.zeros(()))

    with pytest.raises(ValueError, match="add_loss: a loss part named 'fit' exists already"):
        train_loop(lambda b: {"fit": model(torch.stack(list(b))).mean()}, torch.optim.SGD(model.parameters(), lr=0.1),
                   epochs=1, batches=batches_of([2]), modules=[model], callbacks=[Clash()])
