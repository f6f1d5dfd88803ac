"""What EWC and MAS share: a quadratic penalty ``weight * sum_i importance_i (w_i - w*_i)^2`` on the
trained weights, anchored at the weights after the latest task; the strategies differ in how the
importance is estimated after each task (``estimate``, ``accumulate``) and in their parameters (strategies/ewc.py,
strategies/mas.py). Not a strategy itself (nothing registers here)."""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, Mapping

import torch
from torch import nn

from methods.base import AnomalyMethod
from methods.training import Callback, TrainContext
from strategies.base import Experience, Regulariser, StrategyCallback, tensor_bytes


def trained_parameters(ctx: TrainContext) -> dict[str, nn.Parameter]:
    """The method's parameters that this fit's optimiser updates, by their names in the method."""
    in_optimiser = {id(p) for p in ctx.parameters()}
    return {name: p for name, p in ctx.method.named_parameters() if id(p) in in_optimiser}


def mean_gradient_statistic(ctx: TrainContext, objective: Callable[[Any], torch.Tensor],
                            statistic: Callable[[torch.Tensor], torch.Tensor], train_mode: bool) -> dict[str, torch.Tensor]:
    """Mean over the task's training batches of ``statistic(gradient of objective(batch))`` per trained
    weight (Avalanche's importance loops: EWC's squared loss gradient, MAS's absolute output-norm one).

    The batches are the loop's own (``ctx.batches(0)``: epoch 0's order, the method's ``prepare``
    applied), at the training precision. The modules run in ``train_mode``; in train mode the
    method's buffers (batch-norm statistics) are restored afterwards, so the pass leaves the learned
    model as it was. The gradients are cleared; the modules end in eval mode, as training leaves them."""
    params = trained_parameters(ctx)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    # only the trained modules run in train mode, so only their buffers (batch-norm statistics) can move:
    # not e.g. CFA's memory bank, the method's largest buffer
    moving = {id(b) for module in ctx.modules for b in module.buffers()} if train_mode else set()
    buffers = {name: b.detach().clone() for name, b in ctx.method.named_buffers() if id(b) in moving}
    for module in ctx.modules:
        module.train(train_mode)
    count = 0
    for batch in ctx.batches(0):
        ctx.optimiser.zero_grad(set_to_none=True)
        with ctx.precision.autocast():
            value = objective(batch)
        value.float().backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += statistic(p.grad.detach().float())
        count += 1
    ctx.optimiser.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in ctx.method.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    for module in ctx.modules:
        module.eval()
    return {name: total / max(count, 1) for name, total in sums.items()}


class ImportancePenalty(StrategyCallback):
    """An importance-weighted quadratic penalty's hooks in one fit: the penalty per batch, the
    strategy's ``update`` (anchor and importance) after the task."""

    def before_backward(self, ctx: TrainContext) -> None:
        s = self.strategy
        if not s.importance or ctx.method is None:
            return
        penalty = None
        for name, p in trained_parameters(ctx).items():
            if name not in s.importance:
                continue
            if p.shape != s.anchor[name].shape:
                raise ValueError(f"{s.name}: parameter {name} changed shape since the last task "
                                 f"({tuple(s.anchor[name].shape)} -> {tuple(p.shape)})")
            term = (s.importance[name] * (p - s.anchor[name]).pow(2)).sum()
            penalty = term if penalty is None else penalty + term
        if penalty is not None:
            ctx.add_loss(s.name, s.penalty_weight * penalty)

    def after_task(self, ctx: TrainContext) -> None:
        if ctx.method is not None:
            self.strategy.update(ctx)


class ImportanceStrategy(Regulariser):
    """Sequential steps (or a combination's data) with an importance-weighted quadratic penalty;
    a subclass says how the importance is estimated and accumulated, and the penalty's weight."""

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @property
    @abstractmethod
    def penalty_weight(self) -> float:
        """The penalty's weight (EWC's ewc_lambda, MAS's lambda_reg)."""

    @abstractmethod
    def estimate(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """The importance of each trained weight for the task just learned."""

    @abstractmethod
    def accumulate(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The importance after this task from the previous one and this task's."""

    def update(self, ctx: TrainContext) -> None:
        """After a task: the anchor at the learned weights, the importance accumulated."""
        self.anchor = {name: p.detach().clone() for name, p in trained_parameters(ctx).items()}
        new = self.estimate(ctx)
        self.importance = {name: self.accumulate(self.importance[name], value) if name in self.importance else value
                           for name, value in new.items()}

    def callbacks(self, experience: Experience) -> list[Callback]:
        return [ImportancePenalty(self)]

    def memory_components(self) -> dict[str, int]:
        return {"replay_buffer": 0, "strategy_state": tensor_bytes([*self.importance.values(), *self.anchor.values()])}

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int,
                        method: AnomalyMethod | None = None) -> dict[str, int]:
        """Two copies of the trained weights (importance, anchor): known with the ``method`` (0 without)."""
        weights = 0 if method is None else tensor_bytes(p for p in method.parameters() if p.requires_grad)
        return {"replay_buffer": 0, "strategy_state": 2 * weights}

    def state_dict(self) -> dict[str, Any]:
        return {"importance": dict(self.importance), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.importance = {k: v.clone() for k, v in state.get("importance", {}).items()}
        self.anchor = {k: v.clone() for k, v in state.get("anchor", {}).items()}
