"""Online EWC: a quadratic penalty that keeps the weights important to earlier tasks near their values.

Elastic Weight Consolidation (Kirkpatrick et al. 2017) in its online form (Schwarz et al. 2018), as
Avalanche's ``EWCPlugin(mode="online")`` computes it, for any gradient-trained method, through the
trainer's callbacks (``methods.training.Callback``): the method is not touched.

* Importance after each task: the empirical Fisher of the method's *own* training loss on the task's
  training batches (an anomaly detector has no labels; its loss is what it minimises), i.e. the
  squared gradient of each trained parameter, summed over the batches and divided by their number
  (Avalanche's ``compute_importances``), in eval mode as Avalanche 0.6 does (batch norm uses its
  running statistics and is not updated, so the estimate leaves the learned model as it was).
* Online accumulation: ``F = decay_factor * F_old + F_new``; the anchor is the weights after the
  latest task.
* Penalty while learning task t > 0: ``ewc_lambda * sum_i F_i (theta_i - theta*_i)^2``, added to the
  loss as the part ``ewc`` (Avalanche adds no 1/2; neither do we, so ``ewc_lambda`` means the same).

A parameter whose shape changed since the anchor (none of clbench's methods does this) is a
one-line error. Methods without trained weights (PaDiM, PatchCore) are refused before the run.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from clbench.params import FRACTION, NON_NEGATIVE, ConfigError, Param
from methods.base import AnomalyMethod
from methods.training import Callback, TrainContext, _sum_parts
from strategies.base import STRATEGIES, Experience, Strategy


def trained_parameters(ctx: TrainContext) -> dict[str, nn.Parameter]:
    """The method's parameters that this fit's optimiser updates, by their names in the method."""
    in_optimiser = {id(p) for p in ctx.parameters()}
    return {name: p for name, p in ctx.method.named_parameters() if id(p) in in_optimiser}


def squared_gradients(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """Mean over the task's training batches of each trained parameter's squared loss gradient.

    The batches are the loop's own (``ctx.batches(0)``: epoch 0's order, the method's ``prepare``
    applied), the loss is the method's, at the training precision, the modules in eval mode
    (Avalanche 0.6); the gradients are cleared afterwards."""
    params = trained_parameters(ctx)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    for module in ctx.modules:
        module.eval()
    count = 0
    for batch in ctx.batches(0):
        ctx.optimiser.zero_grad(set_to_none=True)
        with ctx.precision.autocast():
            loss, _ = _sum_parts(ctx.loss_fn(batch))
        loss.float().backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach().float().pow(2)
        count += 1
    ctx.optimiser.zero_grad(set_to_none=True)
    return {name: total / max(count, 1) for name, total in sums.items()}


class EWCPenalty(Callback):
    """The strategy's hooks in one fit: the penalty per batch, the importance after the task."""

    def __init__(self, strategy: EWC) -> None:
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
                raise ValueError(f"ewc: parameter {name} changed shape since the last task "
                                 f"({tuple(s.anchor[name].shape)} -> {tuple(p.shape)})")
            term = (s.importance[name] * (p - s.anchor[name]).pow(2)).sum()
            penalty = term if penalty is None else penalty + term
        if penalty is not None:
            ctx.add_loss("ewc", s.params["ewc_lambda"] * penalty)

    def after_task(self, ctx: TrainContext) -> None:
        if ctx.method is None:
            return
        s = self.strategy
        new = squared_gradients(ctx)
        decay = s.params["decay_factor"]
        s.importance = {name: decay * s.importance[name] + f if name in s.importance else f for name, f in new.items()}
        s.anchor = {name: p.detach().clone() for name, p in trained_parameters(ctx).items()}


@STRATEGIES.register("ewc")
class EWC(Strategy):
    """Sequential steps with the online-EWC penalty (module docstring); ``replay+ewc`` adds it to replay."""

    role = "regulariser"

    hyperparameters = {
        "ewc_lambda": Param(100.0, NON_NEGATIVE, "weight of the penalty (Avalanche's ewc_lambda)"),
        "decay_factor": Param(1.0, FRACTION, "online EWC: weight of the previous importance"),
    }

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def experiences(self, tasks: Sequence[Any]) -> list[Experience]:
        return Experience.stream(tasks)

    def check_method(self, method: AnomalyMethod) -> None:
        if not any(p.requires_grad for p in method.parameters()):
            raise ConfigError(f"strategy 'ewc' needs a method trained by gradient descent; "
                              f"'{method.name}' learns no weights (use sequential, replay or joint)")

    def callbacks(self, experience: Experience) -> list[Callback]:
        return [EWCPenalty(self)]

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
