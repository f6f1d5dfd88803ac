"""FastFlow: 2D normalizing flows on frozen backbone features (Yu et al. 2021; seeds 001, 003 s. 1.7-1.8).

Architecture (see ``methods.flows.common`` for the shared skeleton, loss and map; parity with
anomalib 2.7.0's ``FastflowModel`` is tested in ``tests/test_parity_fastflow.py``):

* frozen timm backbone ``wide_resnet50_2`` by default (seed 003 s. 1.8.3: "We consider the
  Wide-ResNet50-2 architecture"; the paper's code hard-codes it in ``create_fastflow``), layers 1-3,
  each image through it once per run (shared feature cache);
* per level a LayerNorm over [C, h, w] with a learnable per-element affine (``norm_affine``, as
  FastFlow's reference code and anomalib);
* per level a 2D flow of ``flow_steps`` = 8 FrEIA ``AllInOneBlock``s (8 for ResNets, seed 003),
  ``affine_clamping`` 2.0, hard permutations (``permute_soft=False``);
* coupling subnet ``conv(k) -> ReLU -> conv(k)``, hidden channels = int(C_in * hidden_ratio)
  (C_in = the passive half, ceil(C/2)), hidden_ratio 1.0; k = 3 on even steps and 1 on odd steps:
  alternating 3x3 / 1x1 (FastFlow s. 3.3), FastFlow's choice for large backbones (its ablation:
  alternating helps WRN50 and saves parameters, 3x3-only is better for small backbones).
  ``conv3x3_only: True`` uses 3x3 everywhere: the reference setting for ResNet18
  (gathierry/FastFlow ``configs/resnet18.yaml``). The paper's code has ``backbone: resnet18,
  conv3x3_only: true`` in ``configurations/models/fastflow.json`` but never reads them: its
  ``create_fastflow`` builds WRN50 with ``conv3x3_only=False``.

Loss: FastFlow's NLL (``methods.flows.common.flow_loss`` = anomalib's ``FastflowLoss``). Map: mean
over levels of the upsampled ``-exp(-0.5 * mean_c z^2)``; image score = max of the map.

Continual schedule (seed 003, 1.8.1): batch 32 (+32 replayed images under replay), 15 epochs per
task (``num_epochs(15)``), Adam lr 1e-3, weight decay 1e-5 (FastFlow; the paper's code too), the
flow weights carried over; ``optimizer_state`` reset (default: fresh Adam per task) or keep (the
paper's code). Early stopping is off by default (seed 003 trains a fixed 15 epochs); ``patience: N``
turns it on, on the held-out good training images only.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from clbench.params import Param
from methods.base import METHODS
from methods.flows.common import FLOW_HYPERPARAMETERS, FlowMethod, SubnetConstructor, conv


def conv_subnet(kernel_size: int, hidden_ratio: float) -> SubnetConstructor:
    """FastFlow's coupling subnet: conv(k) -> ReLU -> conv(k), hidden = int(C_in * hidden_ratio)."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        return nn.Sequential(conv(in_channels, hidden, kernel_size), nn.ReLU(), conv(hidden, out_channels, kernel_size))

    return build


@METHODS.register("fastflow")
class FastFlow(FlowMethod):
    display_name = "FastFlow"
    hyperparameters = {**FLOW_HYPERPARAMETERS, "conv3x3_only": Param(False, bool)}

    @classmethod
    def subnet_for_step(cls, params: Mapping[str, Any], step: int) -> SubnetConstructor:
        kernel_size = 1 if step % 2 == 1 and not params["conv3x3_only"] else 3
        return conv_subnet(kernel_size, float(params["hidden_ratio"]))
