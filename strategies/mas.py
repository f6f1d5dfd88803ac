"""Memory Aware Synapses: EWC's quadratic penalty with importance from output sensitivity, no labels.

MAS (Aljundi et al. 2018), as Avalanche's ``MASPlugin`` computes it (itself after FACIL). Importance
after each task is the mean over the task's training batches of ``|d/dw mean ||out||^2|``, the
squared L2 norm of each output taken over its channels (dim 1) per sample and position; the outputs
are the method's trained outputs (``AnomalyMethod.continual_outputs``), summed over them (a (B,)
output, such as a flow's log-determinant, is its own norm). Accumulated as
``alpha * old + (1 - alpha) * new``; penalty ``lambda_reg * sum imp (w - w*)^2`` (``loss/mas``).

Chosen over SI (the issue's other option): MAS needs no labels and no loss, the unsupervised setting
of anomaly detection, and is computed after the task like EWC; SI integrates each weight's path over
every optimiser step, which couples it to the optimiser, its state policy and mixed precision.

The importance pass runs in train mode as Avalanche's does; its batch-norm statistics are restored
afterwards (Avalanche leaves them moved by that extra pass), so the learned model is evaluated as
trained. Tested against ``MASPlugin`` (tests/test_mas.py).
"""
from __future__ import annotations

import torch

from clbench.params import FRACTION, NON_NEGATIVE, Param
from methods.training import TrainContext
from strategies.base import STRATEGIES
from strategies.importance import ImportanceStrategy, mean_gradient_statistic


def output_norm(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the outputs of the mean squared L2 norm over dim 1 (Avalanche's
    ``torch.norm(out, p="fro", dim=1).pow(2).mean()``; a (B,) output: its mean square)."""
    total = None
    for out in outputs.values():
        term = out.float().pow(2).mean() if out.dim() == 1 else torch.norm(out.float(), p="fro", dim=1).pow(2).mean()
        total = term if total is None else total + term
    return total


@STRATEGIES.register("mas")
class MAS(ImportanceStrategy):
    """Sequential steps with the MAS penalty (module docstring); ``replay+mas`` adds it to replay."""

    hyperparameters = {
        "lambda_reg": Param(1.0, NON_NEGATIVE, "weight of the penalty (Avalanche's lambda_reg)"),
        "alpha": Param(0.5, FRACTION, "weight of the previous importance (Avalanche's alpha)"),
    }

    @property
    def penalty_weight(self) -> float:
        return self.params["lambda_reg"]

    def estimate(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """Mean absolute gradient of ``output_norm`` of the trained outputs, in train mode (Avalanche)."""
        return mean_gradient_statistic(ctx, lambda batch: output_norm(ctx.method.continual_outputs(batch)),
                                       torch.abs, train_mode=True)

    def accumulate(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        a = self.params["alpha"]
        return a * old + (1 - a) * new
