"""Learning without Forgetting for anomaly detectors: distil the previous model's outputs on new data.

LwF (Li & Hoiem 2016) keeps a copy of the model from before the task and, while the task is learned,
adds a distillation loss between the current and the old model's outputs *on the current task's
images*: no image of an old task is stored. LwF distils class probabilities (softened softmax, as
Avalanche's ``LwFPlugin`` does); anomaly detectors have no classes, so what is distilled is each
method's trained outputs (``AnomalyMethod.continual_outputs``: STFPM's student features, CFA's
descriptor, the flows' latents and log-determinants, EfficientAD's student and autoencoder, DRAEM's
reconstruction and logits), with the mean squared error per output, summed over the outputs:

    loss += alpha * sum_k mean((out_k(x) - out_k^old(x))^2)

The old model is not a second copy of the method (its frozen backbone and feature cache stay shared):
only its trained weights (and their layers' batch-norm statistics) are kept, and its outputs are computed by calling the same method with those
weights (``torch.func.functional_call``), in eval mode and without gradients. Avalanche's plugin
cannot be used unchanged (it distils logits of a classifier), so this is native.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from clbench.params import NON_NEGATIVE, Param
from methods.base import AnomalyMethod
from methods.training import Callback, TrainContext
from strategies.base import STRATEGIES, Experience, Regulariser, StrategyCallback, tensor_bytes


class _Outputs(nn.Module):
    """``method.continual_outputs`` as a module's forward, so ``functional_call`` can swap weights."""

    def __init__(self, method: AnomalyMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.method.continual_outputs(batch)


def old_outputs(method: AnomalyMethod, weights: Mapping[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
    """The method's outputs with ``weights`` (by parameter name) in place of its own, in eval mode,
    without gradients; the method's weights, mode and buffers are left as they were."""
    wrapper = _Outputs(method)
    modes = {name: module.training for name, module in method.named_modules()}
    method.eval()
    try:
        with torch.no_grad():
            return torch.func.functional_call(wrapper, {f"method.{k}": v for k, v in weights.items()}, (batch,),
                                              strict=False)
    finally:
        for name, module in method.named_modules():
            module.training = modes[name]


class Distillation(StrategyCallback):
    """The penalty per batch; the old weights are taken after each task, for the next one."""

    def before_backward(self, ctx: TrainContext) -> None:
        s = self.strategy
        if not s.previous or ctx.method is None:
            return
        old = old_outputs(ctx.method, s.previous, ctx.batch)
        # the trained part's forward again (the method's loss does not hand back its outputs): the
        # frozen backbone's features come from its cache, so only the trained network runs twice
        new = ctx.method.continual_outputs(ctx.batch)
        loss = sum((new[key].float() - old[key].float()).pow(2).mean() for key in new)
        ctx.add_loss("lwf", s.params["alpha"] * loss)

    def after_task(self, ctx: TrainContext) -> None:
        if ctx.method is not None:  # the weights the next task distils towards
            self.strategy.previous = trained_state(ctx.method)


def trained_state(method: AnomalyMethod) -> dict[str, torch.Tensor]:
    """Copies of the trained weights and of the buffers of the layers that hold them (batch norm's
    running statistics), by name: enough to compute the old model's outputs in eval mode. Buffers
    of the method itself (e.g. CFA's memory bank) and of frozen layers are not outputs' inputs, so
    they are not copied."""
    state = {name: p.detach().clone() for name, p in method.named_parameters() if p.requires_grad}
    for prefix, module in method.named_modules():
        if prefix and any(p.requires_grad for p in module.parameters(recurse=False)):
            for name, buffer in module.named_buffers(recurse=False):
                state[f"{prefix}.{name}"] = buffer.detach().clone()
    return state


@STRATEGIES.register("lwf")
class LwF(Regulariser):
    """Sequential steps with distillation of the previous model's outputs on the new images (module docstring)."""

    hyperparameters = {
        "alpha": Param(1.0, NON_NEGATIVE, "weight of the distillation loss (Avalanche's alpha)"),
    }

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        self.previous: dict[str, torch.Tensor] = {}

    def callbacks(self, experience: Experience) -> list[Callback]:
        return [Distillation(self)]

    def memory_components(self) -> dict[str, int]:
        return {"replay_buffer": 0, "strategy_state": tensor_bytes(self.previous.values())}

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int,
                        method: AnomalyMethod | None = None) -> dict[str, int]:
        """One copy of the trained weights and their layers' buffers: known with the ``method`` (0 without)."""
        return {"replay_buffer": 0, "strategy_state": 0 if method is None else tensor_bytes(trained_state(method).values())}

    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self.previous)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.previous = {k: v.clone() for k, v in state.get("previous", {}).items()}
