"""EfficientAD's networks: patch description networks (PDN), the autoencoder, and loading PDN weights.

Networks (Batzner et al., WACV 2024, tables 5-7; the PDN layer names follow anomalib so its teacher
files load as they are). All take ImageNet-normalised images (``Batch.normalized``).

* ``SmallPDN`` / ``MediumPDN``: 4 (small) or 6 (medium) convolutions, two 2x2 average poolings,
  receptive field 33 px, output stride 4. Without padding (as for anomaly detection) a 256 px
  input gives 56x56 outputs and a 64 px input 8x8; with padding (as for distillation) 64x64 and
  16x16. Parameters with 384 output channels: small 2.69M, medium 8.03M (seed 003's "teacher
  8.0M" is the medium PDN); a student has 768 outputs: small 4.27M, medium 11.62M (seed 003: 11.6M).
* ``AutoEncoder``: EfficientAD's (6 strided convolutions to a 1x1 bottleneck of 64 channels, 8
  convolutions with bilinear upsampling and dropout 0.2 back to the PDN output size); 1.10M
  parameters at 256 px (seed 003: 1.1M), 0.85M at 64 px. The bottleneck kernel equals the feature
  size after the five stride-2 convolutions: 8 at 256 px, as in the paper and anomalib (which
  hard-code 8, so they need >= 256 px), 2 at 64 px; the decoder's intermediate sizes are
  anomalib's (``S//64 - 1``, ``S//32``, ...; at least 1), so any input >= 64 px works and at
  256 px the network is anomalib's (``tests/test_parity_efficientad.py``).

``load_pdn_weights`` reads a teacher file (``distill``'s, anomalib's or the original code's) into a PDN;
``adam`` is the optimiser of EfficientAD's training and of the teacher distillation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


MODEL_SIZES = ("small", "medium")


class SmallPDN(nn.Module):
    """EfficientAD-S patch description network: (B, 3, H, W) -> (B, out_channels, h, w)."""

    def __init__(self, out_channels: int = 384, padding: bool = False) -> None:
        super().__init__()
        p = 1 if padding else 0
        self.conv1 = nn.Conv2d(3, 128, kernel_size=4, padding=3 * p)
        self.conv2 = nn.Conv2d(128, 256, kernel_size=4, padding=3 * p)
        self.conv3 = nn.Conv2d(256, 256, kernel_size=3, padding=p)
        self.conv4 = nn.Conv2d(256, out_channels, kernel_size=4)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2, padding=p)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2, padding=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.conv4(x)


class MediumPDN(nn.Module):
    """EfficientAD-M patch description network: (B, 3, H, W) -> (B, out_channels, h, w)."""

    def __init__(self, out_channels: int = 384, padding: bool = False) -> None:
        super().__init__()
        p = 1 if padding else 0
        self.conv1 = nn.Conv2d(3, 256, kernel_size=4, padding=3 * p)
        self.conv2 = nn.Conv2d(256, 512, kernel_size=4, padding=3 * p)
        self.conv3 = nn.Conv2d(512, 512, kernel_size=1)
        self.conv4 = nn.Conv2d(512, 512, kernel_size=3, padding=p)
        self.conv5 = nn.Conv2d(512, out_channels, kernel_size=4)
        self.conv6 = nn.Conv2d(out_channels, out_channels, kernel_size=1)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2, padding=p)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2, padding=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.relu(self.conv5(x))
        return self.conv6(x)


def build_pdn(model_size: str, out_channels: int, padding: bool = False) -> nn.Module:
    if model_size == "small":
        return SmallPDN(out_channels, padding)
    if model_size == "medium":
        return MediumPDN(out_channels, padding)
    raise ValueError(f"model_size: '{model_size}' is not one of {', '.join(MODEL_SIZES)}")


def pdn_output_size(image_size: int, padding: bool = False) -> int:
    """Side of a PDN's output for a square input (same for small and medium)."""
    if padding:
        size = (image_size + 3) // 2 + 1  # conv1 k4 p3, avgpool k2 s2 p1
        size = (size + 3) // 2 + 1  # conv2 k4 p3, avgpool k2 s2 p1
        return size - 3  # conv3 (size kept), conv4 k4
    size = (image_size - 3) // 2
    size = (size - 3) // 2
    return size - 2 - 3


def map_padding(image_size: int) -> int:
    """Border that puts an unpadded PDN's map on the padded PDN's grid (4: half the receptive field / stride)."""
    return (pdn_output_size(image_size, True) - pdn_output_size(image_size, False)) // 2


class AutoEncoder(nn.Module):
    """EfficientAD's autoencoder: (B, 3, S, S) -> (B, out_channels, output_size, output_size)."""

    def __init__(self, out_channels: int, image_size: int, output_size: int) -> None:
        super().__init__()
        side = image_size
        for _ in range(5):
            side //= 2  # k4 s2 p1
        if side < 1 or output_size < 1:
            raise ValueError(f"image_size: {image_size} px is too small for EfficientAD (use 64 or more)")
        self.image_size = image_size
        self.output_size = output_size
        self.encoder = nn.ModuleList(
            [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
             for c_in, c_out in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64))]
            + [nn.Conv2d(64, 64, kernel_size=side)]  # 8 at 256 px: the paper's bottleneck convolution
        )
        self.decoder = nn.ModuleList(
            [nn.Conv2d(64, 64, kernel_size=4, padding=2) for _ in range(6)]
            + [nn.Conv2d(64, 64, kernel_size=3, padding=1), nn.Conv2d(64, out_channels, kernel_size=3, padding=1)]
        )
        self.dropout = nn.Dropout(p=0.2)
        s = image_size
        self.upsample_sizes = [max(1, v) for v in (s // 64 - 1, s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.encoder):
            x = conv(x)
            if i < len(self.encoder) - 1:
                x = F.relu(x)
        for conv, size in zip(self.decoder[:6], self.upsample_sizes):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            x = self.dropout(F.relu(conv(x)))
        x = F.interpolate(x, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False)
        x = F.relu(self.decoder[6](x))
        return self.decoder[7](x)


def adam(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (L2 weight decay, as EfficientAD), fused where the device supports it: same update, one
    kernel instead of a dozen per tensor (3x faster steps on a busy CPU)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- loading teacher weights -------------------------------------------------------------------
def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def load_pdn_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a PDN weights file into ``model``; returns the provenance stored with it (may be empty).

    Accepted: ``distill_teacher``'s files, a plain state dict with this module's names (anomalib's
    ``pretrained_teacher_{small,medium}.pth``), or a state dict whose convolutions come in the same
    order with the same shapes (the original code's ``nn.Sequential`` ``teacher_*.pth``, which the
    benchmark paper's code loads). Read with ``weights_only=True``: a pickled module or anything
    that is not a state dict is refused with one line naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher_weights: '{path}' is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(
            f"teacher_weights: '{path}' is not a PDN state dict readable with torch.load(weights_only=True) ({reason})"
        ) from None
    provenance: dict[str, Any] = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        provenance = dict(obj.get("provenance") or {})
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"teacher_weights: '{path}' holds no state dict")
    state = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    if not state:
        raise ValueError(f"teacher_weights: '{path}' holds no tensors")
    target = model.state_dict()
    if set(state) != set(target):
        # same convolutions in the same order (weight, bias pairs): map by position
        ours = [f"{name}.{kind}" for name in _conv_names(model) for kind in ("weight", "bias")]
        theirs = [k for k in state if k.endswith(".weight") or k.endswith(".bias")]
        if len(ours) != len(theirs):
            raise ValueError(
                f"teacher_weights: '{path}' has {len(theirs) // 2} convolutions, the {type(model).__name__} "
                f"has {len(ours) // 2} (wrong model_size?)"
            )
        state = {a: state[b] for a, b in zip(ours, theirs)}
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise ValueError(
                f"teacher_weights: '{path}': {key} has shape {tuple(value.shape)}, expected "
                f"{tuple(target[key].shape)} (wrong model_size or out_channels?)"
            )
    model.load_state_dict(state)
    return provenance
