"""DRAEM's networks (Zavrtanik et al. 2021): the reconstructive encoder-decoder (no skip connections),
the discriminative U-Net, and DRAEM's weight initialisation (see ``methods.draem.model``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# -- networks (DRAEM's architecture) ------------------------------------------------------------------
def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def double_conv(c_in: int, c_mid: int, c_out: int | None = None) -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu(c_in, c_mid), *conv_bn_relu(c_mid, c_mid if c_out is None else c_out))


def up_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *conv_bn_relu(c_in, c_out))


class ReconstructiveNetwork(nn.Module):
    """Encoder-decoder without skips: widths w, 2w, 4w, 8w, 8w down; back up to 3 channels."""

    def __init__(self, width: int, channels: int = 3) -> None:
        super().__init__()
        w = width
        self.encoder = nn.ModuleList([
            double_conv(channels, w), double_conv(w, 2 * w), double_conv(2 * w, 4 * w),
            double_conv(4 * w, 8 * w), double_conv(8 * w, 8 * w),
        ])
        self.decoder = nn.ModuleList([
            nn.Sequential(up_conv(8 * w, 8 * w), double_conv(8 * w, 8 * w, 4 * w)),
            nn.Sequential(up_conv(4 * w, 4 * w), double_conv(4 * w, 4 * w, 2 * w)),
            nn.Sequential(up_conv(2 * w, 2 * w), double_conv(2 * w, 2 * w, w)),
            nn.Sequential(up_conv(w, w), double_conv(w, w, w)),
        ])
        self.out = nn.Conv2d(w, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        for block in self.decoder:
            x = block(x)
        return self.out(x)


class DiscriminativeNetwork(nn.Module):
    """U-Net: widths w, 2w, 4w, 8w, 8w, 8w down (5 pools), skip-connected decoder, 2 logits."""

    def __init__(self, width: int, in_channels: int = 6, out_channels: int = 2) -> None:
        super().__init__()
        w = width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList([double_conv(c_in, c_out) for c_in, c_out in zip([in_channels] + widths[:-1], widths)])
        self.up = nn.ModuleList([up_conv(8 * w, 8 * w), up_conv(8 * w, 4 * w), up_conv(4 * w, 2 * w), up_conv(2 * w, w), up_conv(w, w)])
        self.merge = nn.ModuleList([
            double_conv(16 * w, 8 * w), double_conv(12 * w, 4 * w), double_conv(6 * w, 2 * w),
            double_conv(3 * w, w), double_conv(2 * w, w),
        ])
        self.out = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


def init_weights(module: nn.Module) -> None:
    """DRAEM's ``weights_init``: conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
