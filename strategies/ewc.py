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

import torch

from clbench.params import FRACTION, NON_NEGATIVE, Param
from methods.training import TrainContext, _sum_parts
from strategies.base import STRATEGIES
from strategies.importance import ImportanceStrategy, trained_parameters


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


@STRATEGIES.register("ewc")
class EWC(ImportanceStrategy):
    """Sequential steps with the online-EWC penalty (module docstring); ``replay+ewc`` adds it to replay."""

    hyperparameters = {
        "ewc_lambda": Param(100.0, NON_NEGATIVE, "weight of the penalty (Avalanche's ewc_lambda)"),
        "decay_factor": Param(1.0, FRACTION, "online EWC: weight of the previous importance"),
    }

    @property
    def penalty_weight(self) -> float:
        return self.params["ewc_lambda"]

    def update(self, ctx: TrainContext) -> None:
        """After a task: ``F = decay_factor * F_old + F_new``, the anchor at the learned weights."""
        new = squared_gradients(ctx)
        decay = self.params["decay_factor"]
        self.importance = {name: decay * self.importance[name] + f if name in self.importance else f
                           for name, f in new.items()}
        self.anchor = {name: p.detach().clone() for name, p in trained_parameters(ctx).items()}
