"""DER++ for anomaly detectors: replay images together with the model's own outputs on them.

Dark Experience Replay++ (Buzzega et al. 2020) keeps a buffer of past inputs *and the outputs the
model gave them when they were stored*, and adds two terms to every training batch's loss:

* ``alpha`` times the mean squared error between the current outputs on a minibatch drawn from the
  buffer and the stored ones (the "dark knowledge" of the old model, kept without a copy of it);
* ``beta`` times the method's own loss on a second buffer minibatch. Here that second term is
  replay's "B+B" mixing (strategies/replay.py): every training batch already carries B buffered
  images in the method's loss, i.e. ``beta = 1`` in the paper's notation (a method's loss is a mean
  over its batch, so the weight is fixed by the mix; a separate ``beta`` would need a second loss
  call per batch).

The outputs are each method's trained outputs (``AnomalyMethod.continual_outputs``: student
features, descriptors, flow latents, reconstructions), stored in fp32 after the step that put an
image into the buffer (eval mode, no gradients) and dropped when the image leaves it. They are the
strategy's ``strategy_state`` in memory.csv, beside the images' ``replay_buffer``. Avalanche's DER
distils classifier logits, so this is native. Methods that learn no weights are refused.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from clbench.data import SampleSet
from clbench.params import NON_NEGATIVE, Param
from methods.base import AnomalyMethod
from methods.training import Callback, TrainContext
from strategies.base import STRATEGIES, Experience, StrategyCallback, tensor_bytes
from strategies.buffers import ImageCodec
from strategies.replaying import ReplayBase


def output_bytes_per_image(method: AnomalyMethod, image_size: int) -> int:
    """Bytes DER++ stores per image (fp32 ``continual_outputs``), from one blank image through the
    method in eval mode (its key is no dataset's: ``clbench-memory-probe``)."""
    probe = ImageCodec().batch(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), ["clbench-memory-probe"])
    training = method.training
    method.eval()
    with torch.no_grad():
        outputs = method.continual_outputs(probe)
    method.train(training)
    return sum(value[0].numel() * 4 for value in outputs.values())


class DarkReplay(StrategyCallback):
    """The ``alpha`` term per batch: outputs on a buffer minibatch against the stored ones."""

    def before_backward(self, ctx: TrainContext) -> None:
        s = self.strategy
        if not s.outputs or ctx.method is None:
            return
        batch = s.buffer.sample(len(ctx.batch))
        current = ctx.method.continual_outputs(batch)
        loss = None
        for key, value in current.items():
            stored = torch.stack([s.outputs[k][key] for k in batch.keys]).to(value.device)
            term = (value.float() - stored).pow(2).mean()
            loss = term if loss is None else loss + term
        ctx.add_loss("der", s.params["alpha"] * loss)


@STRATEGIES.register("der")
class DER(ReplayBase):
    """Replay whose buffer also keeps the model's outputs on its images (module docstring)."""

    needs_gradients = True

    hyperparameters = {
        **ReplayBase.hyperparameters,  # plain defaults: their constraints are inherited (Parameterised)
        "alpha": Param(0.5, NON_NEGATIVE, "weight of the stored-output distillation (DER++'s alpha)"),
    }

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        self.outputs: dict[str, dict[str, torch.Tensor]] = {}  # buffer key -> output name -> tensor (no batch dim)

    def callbacks(self, experience: Experience) -> list[Callback]:
        return [DarkReplay(self)]

    def after_step(self, experience: Experience, current: SampleSet, method: AnomalyMethod | None = None) -> None:
        """The buffer update, then the outputs of the images that entered it (a combination's member too)."""
        super().after_step(experience, current, method)
        if method is None:
            raise ValueError("der: after_step needs the method whose outputs it stores")
        self._store_outputs(method)

    @torch.no_grad()
    def _store_outputs(self, method: AnomalyMethod) -> None:
        """Outputs of the images that entered the buffer at this step; those that left are dropped."""
        kept = set(self.buffer.keys)
        self.outputs = {key: value for key, value in self.outputs.items() if key in kept}
        new = [i for i, key in enumerate(self.buffer.keys) if key not in self.outputs]
        training = method.training
        method.eval()
        for start in range(0, len(new), 32):
            rows = new[start:start + 32]
            batch = self.buffer.batch(rows)
            values = method.continual_outputs(batch)
            for j, key in enumerate(batch.keys):
                self.outputs[key] = {name: value[j].detach().float().cpu().clone() for name, value in values.items()}
        method.train(training)

    def memory_components(self) -> dict[str, int]:
        stored = tensor_bytes(t for entry in self.outputs.values() for t in entry.values())
        return super().memory_components() | {"strategy_state": stored}

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int,
                        method: AnomalyMethod | None = None) -> dict[str, int]:
        """The images as replay's, and with a ``method`` its fp32 outputs for each of them."""
        resolved = cls.resolve_params(params)
        outputs = 0 if method is None else resolved["buffer_size"] * output_bytes_per_image(method, image_size)
        return super().analytic_memory(params, image_size) | {"strategy_state": outputs}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"outputs": {key: dict(value) for key, value in self.outputs.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.outputs = {key: {name: t.clone() for name, t in value.items()}
                        for key, value in state.get("outputs", {}).items()}
