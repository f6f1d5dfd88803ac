"""Shared pieces of the 2D normalizing-flow methods (FastFlow, CAINNFlow).

Both methods have the same skeleton; only the coupling subnets and a few defaults differ. It is
FastFlow's reference implementation as anomalib 2.7.0 reproduces it (``anomalib/models/image/
fastflow/{torch_model,loss,anomaly_map}.py``, from gathierry/FastFlow) and as the benchmark paper's
code copies it (clad ``src/models/fastflow.py``, ``src/trainer/trainer_fastflow.py``);
``tests/test_parity_fastflow.py`` checks maps, scores, loss and one Adam step against anomalib:

* a frozen timm backbone (layers 1-3 of a ResNet) through the run's shared feature cache, so each
  image goes through the backbone once per run, across epochs and evaluations;
* per feature level l (C_l channels, h_l x w_l positions) a LayerNorm over [C_l, h_l, w_l] with a
  learnable per-element affine (``norm_affine: True``, the references). Like the references, the
  affine's log-determinant is not part of the likelihood. ``norm_affine: False`` is a fixed
  per-image standardisation: what the benchmark paper's code computes in effect (its LayerNorm
  runs under ``torch.no_grad()``, so the affine never leaves its identity init);
* then one 2D flow per level: FrEIA's ``SequenceINN`` of ``AllInOneBlock`` (affine coupling with
  soft clamping ``affine_clamping * tanh``, a fixed hard channel permutation,
  ``permute_soft=False``, FrEIA's learned global affine "ActNorm"), fully convolutional;
* loss = the references' negative log-likelihood under a standard normal, the constant
  ``0.5 * D * log(2 pi)`` dropped: per level and image ``0.5 * ||z||^2 - log|det J|``, averaged
  over the images of the batch (current and replayed images weigh the same) and *summed* over
  the levels. Not normalised per dimension: with Adam's coupled L2 weight decay (1e-5, FastFlow's)
  dividing by 3 * C_l * h_l * w_l would make the decay 10^4-10^6 times stronger relative to the
  data term (ResNet18 at 64 px - WRN50 at 256 px);
* anomaly map, per level: ``-exp(-0.5 * mean_c z^2)`` (minus the per-position likelihood),
  upsampled bilinearly to the input size, averaged over levels; image score = the map's maximum
  (anomalib's ``pred_score``). Values lie in [-1, 0]; very unlikely positions saturate at 0
  (float32 exp underflow when mean_c z^2 > ~200), as in the reference code;
* continual adaptation (seed 003, section 1.8.1, for FastFlow; CAINNFlow is adapted the same way):
  the flows' weights are carried from task to task and fine-tuned on what the strategy streams
  (current task only, "B+B" replay batches, or all tasks at once) for a fixed epoch count
  (``num_epochs``). Adam (lr, weight decay 1e-5, ``adam_betas``) built through
  ``task_optimiser``: ``optimizer_state: reset`` (default) = a fresh optimiser per task, ``keep`` =
  one for the whole stream (the paper's code, whose Adam also uses betas (0.5, 0.99)). Optional
  early stopping (``patience``) reads only the held-out *good training* images (``TaskData.val``)
  and restores the best weights.

All learned state (coupling weights, ActNorm scales/offsets, LayerNorm affine) and the fixed random
permutations are parameters of the module, so ``state_dict`` carries everything: resume gives
identical predictions. The permutations are FrEIA ``nn.Parameter``s with ``requires_grad=False``
and are therefore counted as *frozen* parameters by the engine.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from clbench.features.backbones import feature_info
from clbench.data import Batch
from clbench.features.maps import finite_or_raise
from clbench.params import BACKBONE, LAYERS, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Interval, ListOf, Param
from methods.base import AnomalyMethod, MethodContext, Prediction, TaskData
from methods.training import fit_epochs

SubnetConstructor = Callable[[int, int], nn.Module]

# Hyper-parameters every flow method takes (each method overrides some defaults).
FLOW_HYPERPARAMETERS: dict[str, Any] = {
    "backbone": Param("wide_resnet50_2", BACKBONE),  # seed 003 s. 1.8.3 (and the paper's code, hard-coded)
    "layers": Param(["layer1", "layer2", "layer3"], LAYERS),
    "flow_steps": Param(8, POSITIVE_INT),
    "hidden_ratio": Param(1.0, POSITIVE),
    "clamp": Param(2.0, POSITIVE),  # AllInOneBlock affine_clamping
    "norm_affine": Param(True, bool),  # learnable LayerNorm affine (references); False = the paper's code in effect
    "batch_size": Param(32, POSITIVE_INT),  # seed 003: 32 (+32 replayed)
    "epochs": Param(15, POSITIVE_INT),  # seed 003: 15 epochs per task
    "lr": Param(1e-3, NON_NEGATIVE),
    "weight_decay": Param(1e-5, NON_NEGATIVE),
    # torch's defaults (FastFlow, anomalib); the paper's code: [0.5, 0.99]
    "adam_betas": Param([0.9, 0.999], ListOf(Interval(float, 0, 1, closed="left"), length=2)),
    "optimizer_state": "reset",  # reset | keep (see AnomalyMethod.task_optimiser)
    "patience": Param(None, [None, POSITIVE_INT]),  # None: no early stopping; N: epochs without held-out improvement
}


# -- building blocks ---------------------------------------------------------------------------
def conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """A 'same'-padded convolution (odd kernel sizes)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def feature_dims(channels: Sequence[int], reductions: Sequence[int], image_size: int) -> list[tuple[int, int, int]]:
    """(C, h, w) of each level: ResNet strides round up, so h = w = ceil(image_size / reduction)."""
    return [(int(c), -(-image_size // int(r)), -(-image_size // int(r))) for c, r in zip(channels, reductions)]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch and numpy (FrEIA draws its permutations from numpy's global generator) for the
    duration of the block, restoring both generators afterwards."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


def build_flow_stage(
    dims: tuple[int, int, int], steps: int, subnet_for_step: Callable[[int], SubnetConstructor], clamp: float
) -> SequenceINN:
    """One 2D flow on a (C, h, w) feature map: ``steps`` FrEIA AllInOneBlocks; block ``i`` builds its
    coupling subnet with ``subnet_for_step(i)`` (called by FrEIA as ``f(channels_in, channels_out)``)."""
    stage = SequenceINN(*dims)
    for step in range(steps):
        stage.append(AllInOneBlock, subnet_constructor=subnet_for_step(step), affine_clamping=clamp, permute_soft=False)
    return stage


# -- likelihood --------------------------------------------------------------------------------
def nll_per_image(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """(B,) negative log-likelihood of one level, constant dropped: 0.5 * ||z||^2 - log|det J|."""
    return 0.5 * z.pow(2).flatten(1).sum(dim=1) - log_jac_det


def flow_loss(zs: Sequence[torch.Tensor], log_jac_dets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Scalar loss (FastFlow's / anomalib's ``FastflowLoss``): per-image NLL averaged over the
    batch, summed over the levels."""
    return torch.stack([nll_per_image(z, j).mean() for z, j in zip(zs, log_jac_dets)]).sum()


def likelihood_maps(zs: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """(B, size, size) anomaly map: mean over levels of the upsampled -exp(-0.5 * mean_c z^2)."""
    maps = []
    for z in zs:
        log_prob = -0.5 * z.pow(2).mean(dim=1, keepdim=True)
        maps.append(F.interpolate(-torch.exp(log_prob), size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(maps, dim=1).mean(dim=1)


# -- the shared method -------------------------------------------------------------------------
class FlowMethod(AnomalyMethod):
    """Frozen backbone -> LayerNorm per level -> one 2D flow per level; trained by maximum likelihood.

    Subclasses set ``hyperparameters`` (``FLOW_HYPERPARAMETERS`` and their own ``Param`` entries) and
    define ``subnet_for_step`` (the coupling subnets).
    """

    display_name = "flow"
    trains_on_frozen_features = True  # the flows read only the frozen backbone's features (latent replay)

    # -- construction (class-level so parameter counts need no backbone) ----------------------
    @classmethod
    def subnet_for_step(cls, params: Mapping[str, Any], step: int) -> SubnetConstructor:
        raise NotImplementedError

    @classmethod
    def build_flows(cls, params: Mapping[str, Any], dims: Sequence[tuple[int, int, int]], seed: int = 0) -> nn.ModuleList:
        """One flow stage per level, seeded (initial weights and permutations depend on ``seed`` only)."""
        with seeded(seed):
            return nn.ModuleList(
                build_flow_stage(d, params["flow_steps"], lambda step: cls.subnet_for_step(params, step), float(params["clamp"]))
                for d in dims
            )

    @classmethod
    def build_norms(cls, params: Mapping[str, Any], dims: Sequence[tuple[int, int, int]]) -> nn.ModuleList:
        return nn.ModuleList(nn.LayerNorm(list(d), elementwise_affine=bool(params["norm_affine"])) for d in dims)

    @classmethod
    def parameter_counts(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """Numbers of parameters from the architecture alone (no backbone weights, no training)."""
        p = cls.resolve_params(params)
        channels, reductions = feature_info(p["backbone"], p["layers"])
        dims = feature_dims(channels, reductions, image_size)
        with torch.device("meta"):  # shapes only: no memory, no initialisation (41M weights for WRN50)
            flows, norms = cls.build_flows(p, dims), cls.build_norms(p, dims)
        return {
            "flow_trainable": sum(q.numel() for q in flows.parameters() if q.requires_grad),
            "flow_permutations": sum(q.numel() for q in flows.parameters() if not q.requires_grad),
            "layernorm": sum(q.numel() for q in norms.parameters()),
        }

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """fp32 bytes: trainable flow weights and LayerNorm affine (if learnable), and the fixed
        permutation matrices (C x C per block and direction; FrEIA keeps them as frozen parameters)."""
        counts = cls.parameter_counts(params, image_size)
        memory = {"model_trainable/flows": counts["flow_trainable"] * 4}
        if counts["layernorm"]:
            memory["model_trainable/layernorm"] = counts["layernorm"] * 4
        memory["model_frozen/flow_permutations"] = counts["flow_permutations"] * 4
        return memory

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        self.backbone = context.backbones.get(p["backbone"], p["layers"])
        self.dims = feature_dims(self.backbone.channels, self.backbone.reductions, context.image_size)
        self.norms = self.build_norms(p, self.dims)
        self.flows = self.build_flows(p, self.dims, seed=context.seed)

    def frozen_backbones(self):
        return [self.backbone]

    # -- forward -------------------------------------------------------------------------------
    def flow_outputs(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latents z (B, C, h, w) and log|det J| (B,) of each level."""
        zs, jacs = [], []
        for feature, norm, flow in zip(features, self.norms, self.flows):
            z, log_jac_det = flow(norm(feature))
            zs.append(z)
            jacs.append(log_jac_det)
        return zs, jacs

    def loss(self, batch: Batch) -> torch.Tensor:
        return flow_loss(*self.flow_outputs(self.backbone.features(batch)))

    # -- the interface -------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        """Fine-tune the flows on this step's stream (weights carried over; Adam per ``optimizer_state``)."""
        p = self.params
        trainable = [q for q in self.parameters() if q.requires_grad]
        optimiser = self.task_optimiser(lambda: torch.optim.Adam(
            trainable, lr=p["lr"], betas=tuple(float(b) for b in p["adam_betas"]), weight_decay=p["weight_decay"]
        ))
        self.fit_info = fit_epochs(
            self, data, self.loss, optimiser,
            epochs=self.num_epochs(p["epochs"]), batch_size=p["batch_size"], patience=p["patience"],
        )

    def continual_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per level, the flow's latent ``z/<layer>`` (B, C, h, w) and ``log_jac_det/<layer>`` (B,) on the
        cached backbone features: both terms of the NLL (``flow_loss``) the flows and LayerNorms train on."""
        outputs: dict[str, torch.Tensor] = {}
        for layer, z, jac in zip(self.params["layers"], *self.flow_outputs(self.backbone.features(batch))):
            outputs[f"z/{layer}"], outputs[f"log_jac_det/{layer}"] = z, jac
        return outputs

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        self.eval()
        zs, _ = self.flow_outputs(self.backbone.features(batch))
        maps = finite_or_raise(likelihood_maps(zs, self.context.image_size), self.display_name).float().cpu()
        return Prediction(maps=maps, scores=maps.flatten(1).amax(dim=1))


__all__ = [
    "FLOW_HYPERPARAMETERS", "FlowMethod", "build_flow_stage", "conv", "feature_dims", "flow_loss",
    "likelihood_maps", "nll_per_image", "seeded",
]
