"""Anomaly-map post-processing shared by methods: upsampling to input size and Gaussian smoothing."""
from __future__ import annotations


import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, w) -> (B, size, size), bilinear (align_corners=False, as anomalib and the papers' code)."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)


def gaussian_kernel1d(sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised 1-D Gaussian, radius 4*sigma (the width scipy and anomalib use: 33 taps at sigma 4)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps with reflect padding; sigma <= 0 is a no-op."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    # reflect padding needs pad < size: fall back to replicate on tiny maps
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def finite_or_raise(maps: torch.Tensor, where: str) -> torch.Tensor:
    """Fail loudly on NaN/inf maps instead of computing metrics on garbage."""
    if not torch.isfinite(maps).all():
        bad = (~torch.isfinite(maps)).sum().item()
        raise FloatingPointError(f"{where}: {bad} non-finite anomaly-map values")
    return maps


__all__ = ["upsample", "gaussian_blur", "gaussian_kernel1d", "finite_or_raise"]
