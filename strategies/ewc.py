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
from methods.training import TrainContext, sum_parts
from strategies.base import STRATEGIES
from strategies.importance import ImportanceStrategy, mean_gradient_statistic


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

    def estimate(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """The empirical Fisher: mean squared gradient of the method's loss, in eval mode (Avalanche 0.6)."""
        return mean_gradient_statistic(ctx, lambda batch: sum_parts(ctx.loss_fn(batch))[0],
                                       lambda grad: grad.pow(2), train_mode=False)

    def accumulate(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return self.params["decay_factor"] * old + new
