"""What EWC and MAS share: a quadratic penalty ``weight * sum_i importance_i (w_i - w*_i)^2`` on the
trained weights, anchored at the weights after the latest task; the strategies differ in how the
importance is estimated after each task (``update``) and in their parameters (strategies/ewc.py,
strategies/mas.py). Not a strategy itself (nothing registers here)."""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from clbench.params import ConfigError
from methods.base import AnomalyMethod
from methods.training import Callback, TrainContext
from strategies.base import Experience, Strategy


def trained_parameters(ctx: TrainContext) -> dict[str, nn.Parameter]:
    """The method's parameters that this fit's optimiser updates, by their names in the method."""
    in_optimiser = {id(p) for p in ctx.parameters()}
    return {name: p for name, p in ctx.method.named_parameters() if id(p) in in_optimiser}


class ImportancePenalty(Callback):
    """An importance-weighted quadratic penalty's hooks in one fit (EWC here, MAS in strategies/mas.py):
    the penalty per batch, the strategy's ``update`` (importance and anchor) after the task."""

    def __init__(self, strategy: ImportanceStrategy) -> None:
        self.strategy = strategy

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


class ImportanceStrategy(Strategy):
    """Sequential steps (or a combination's data) with an importance-weighted quadratic penalty."""

    role = "regulariser"

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @property
    @abstractmethod
    def penalty_weight(self) -> float:
        """The penalty's weight (EWC's ewc_lambda, MAS's lambda_reg)."""

    @abstractmethod
    def update(self, ctx: TrainContext) -> None:
        """After a task: the accumulated importance and the anchor at the learned weights."""

    def experiences(self, tasks: Sequence[Any]) -> list[Experience]:
        return Experience.stream(tasks)

    def check_method(self, method: AnomalyMethod) -> None:
        if not any(p.requires_grad for p in method.parameters()):
            raise ConfigError(f"strategy '{self.name}' needs a method trained by gradient descent; "
                              f"'{method.name}' learns no weights (use sequential, replay or joint)")

    def callbacks(self, experience: Experience) -> list[Callback]:
        return [ImportancePenalty(self)]

    def memory_components(self) -> dict[str, int]:
        stored = [*self.importance.values(), *self.anchor.values()]
        return {"replay_buffer": 0, "strategy_state": sum(t.numel() * t.element_size() for t in stored)}

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """Two fp32 copies of the trained weights (importance, anchor): known only with the method,
        so 0 here; memory.csv has the measured bytes."""
        return {"replay_buffer": 0, "strategy_state": 0}

    def state_dict(self) -> dict[str, Any]:
        return {"importance": dict(self.importance), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.importance = {k: v.clone() for k, v in state.get("importance", {}).items()}
        self.anchor = {k: v.clone() for k, v in state.get("anchor", {}).items()}
