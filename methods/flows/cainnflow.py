"""CAINNFlow: 2D normalizing flows whose coupling subnets embed CBAM attention (Yan et al. 2022, seed 000).

The skeleton is FastFlow's (``methods.flows.common``: frozen backbone, learnable LayerNorm per level,
one FrEIA ``SequenceINN`` of ``AllInOneBlock``s per level, FastFlow's NLL loss, map = mean over levels
of the upsampled ``-exp(-0.5 * mean_c z^2)``, image score = max of the map). What differs is the subnet
that predicts the coupling coefficients s, t from the passive half (seed 000, eqs. 6-12):

* CBAM (eq. 6): ``F' = M_c(F) * F``, ``F'' = M_s(F') * F'``, channel attention first.
* channel attention (eq. 7): ``M_c(F) = sigmoid(MLP(avgpool(F)) + MLP(maxpool(F)))``, pools over
  h x w, one MLP shared by both descriptors: C -> max(1, C // r) -> C with a ReLU after W_0,
  reduction ratio ``reduction`` r = 16.
* spatial attention (eq. 8): ``M_s(F) = sigmoid(conv7x7([mean_c(F); max_c(F)]))``, one output map.
* variants (``variant``), with C_in the passive half (ceil(C/2) channels), C_out = 2 * floor(C/2)
  (s and t), hidden = int(C_in * hidden_ratio):
    - ``CAC`` (eq. 11, the paper's best, default): conv3x3(C_in -> hidden) -> ReLU -> CBAM(hidden)
      -> conv3x3(hidden -> C_out);
    - ``CA``  (eq. 9):  conv3x3(C_in -> C_out) -> CBAM(C_out);
    - ``AC``  (eq. 10): CBAM(C_in) -> conv3x3(C_in -> C_out);
    - ``CC``  (eq. 12, ablation without attention): conv3x3(C_in -> hidden) -> ReLU ->
      conv3x3(hidden -> C_out), i.e. FastFlow's 3x3 subnet.
* ``flow_steps`` = 2: the paper's "step2" (section 4.5, Table 3: step1..step5, best at 2).

Choices where the paper is vague or silent (all ours):

* "stepK": read as K coupling blocks (FrEIA AllInOneBlocks) per feature level, i.e. FastFlow's
  ``flow_steps`` hyper-parameter (8 in FastFlow) -- CAINNFlow is presented as FastFlow with other
  subnets (its "CC(3x3)" column is cited as Yu et al.), and the paper's claim of fewer parameters
  than FastFlow fits 2 blocks instead of 8. Other readings (K Glow-style double couplings as in
  eq. 1, i.e. 2K AllInOneBlocks; or K CAC modules stacked inside one subnet) are not supported
  by the text; ``flow_steps`` can be set to 4 to emulate the first. Note that with 2 blocks and
  hard random permutations, about a quarter of the channels are only scaled by the global affine
  ("ActNorm") and never coupled.
* eq. 1 describes a Glow/Real-NVP double coupling; we keep FastFlow's single-half AllInOneBlock
  with soft clamping 2.0 and a hard permutation between blocks (the "same 2D-flow skeleton").
* eq. 11 writes ``F''' = M_s(F'') * F'``; we use standard CBAM (eq. 6): ``M_s(F'') * F''``.
* Nonlinearity: eqs. 9-12 show none. CC is FastFlow's subnet, which has a ReLU between its two
  convolutions, so CC and CAC put a ReLU after the first convolution (CBAM after the ReLU); CA and
  AC have a single convolution and no ReLU (CBAM's gates are their nonlinearity), so they have
  about half the parameters of CC/CAC. Hidden width: hidden_ratio 1.0 as FastFlow.
* CBAM details: MLP as 1x1 convolutions with biases (CBAM's reference code; eq. 7 writes only
  W_0, W_1), 7x7 spatial convolution with bias and without the BatchNorm of CBAM's reference code
  (batch statistics would make the flow differ between training and scoring), zero padding 3.
* Convolutions are 3x3 everywhere ("stacked 3x3 full convolution"); no 1x1 steps.
* Backbone ``wide_resnet50_2`` by default, layers 1-3: the paper's best result (98.64 pixel AUROC,
  Table 4) uses WRN50, and seed 003 runs FastFlow on WRN50, so the adaptation matches. The
  paper's variant and step studies (Tables 2-3) use ResNet18 (``backbone: resnet18``). LayerNorm
  with learnable affine, as FastFlow's reference code (the paper's skeleton).
* Optimiser: Adam (not named in the paper; FastFlow's), lr 5e-4 (the paper's), weight decay 1e-5
  (FastFlow's; not given in the paper).

Continual learning: no continual version of CAINNFlow exists. It is adapted exactly as seed 003
adapts FastFlow: weights carried over between tasks and fine-tuned, ``optimizer_state`` reset
(default, a fresh Adam per task) or keep, batch 32 (+32 replayed images under the replay strategy,
"B+B" mixing), 15 epochs per task (``num_epochs(15)``; the paper trains 750 epochs per category),
no early stopping by default (``patience: N`` enables it on held-out good training images only).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from clbench.params import NON_NEGATIVE, POSITIVE_INT, Options, Param
from methods.base import METHODS
from methods.flows.common import FLOW_HYPERPARAMETERS, FlowMethod, SubnetConstructor, conv

VARIANTS = ("CAC", "CA", "AC", "CC")


class ChannelAttention(nn.Module):
    """M_c (eq. 7): (B, C, H, W) -> (B, C, 1, 1) gates in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True)))


class SpatialAttention(nn.Module):
    """M_s (eq. 8): (B, C, H, W) -> (B, 1, H, W) gates in (0, 1)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Eq. 6: channel attention, then spatial attention, each multiplied onto the features."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel(x) * x
        return self.spatial(x) * x


def cbam_subnet(variant: str, hidden_ratio: float, reduction: int) -> SubnetConstructor:
    """The coupling subnet of one variant (eqs. 9-12), as FrEIA's ``f(channels_in, channels_out)``."""
    variant = normalize_variant(variant)

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        if variant == "CAC":
            layers = [conv(in_channels, hidden, 3), nn.ReLU(), CBAM(hidden, reduction), conv(hidden, out_channels, 3)]
        elif variant == "CA":
            layers = [conv(in_channels, out_channels, 3), CBAM(out_channels, reduction)]
        elif variant == "AC":
            layers = [CBAM(in_channels, reduction), conv(in_channels, out_channels, 3)]
        else:  # CC
            layers = [conv(in_channels, hidden, 3), nn.ReLU(), conv(hidden, out_channels, 3)]
        return nn.Sequential(*layers)

    return build


def normalize_variant(variant: Any) -> str:
    name = str(variant).upper()
    if name not in VARIANTS:
        raise ValueError(f"method_params: unknown CAINNFlow variant '{variant}' (known: {', '.join(VARIANTS)})")
    return name


@METHODS.register("cainnflow")
class CAINNFlow(FlowMethod):
    display_name = "CAINNFlow"
    hyperparameters = {
        **FLOW_HYPERPARAMETERS,
        "variant": Param("CAC", Options(*VARIANTS, ignore_case=True)),
        "flow_steps": Param(2, POSITIVE_INT),
        "reduction": Param(16, POSITIVE_INT),
        "lr": Param(5e-4, NON_NEGATIVE),
    }
    # backbone: FLOW_HYPERPARAMETERS' wide_resnet50_2 (the paper's best, Table 4)

    @classmethod
    def subnet_for_step(cls, params: Mapping[str, Any], step: int) -> SubnetConstructor:
        return cbam_subnet(params["variant"], float(params["hidden_ratio"]), int(params["reduction"]))
