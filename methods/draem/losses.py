"""DRAEM's loss terms: l2, SSIM (Gaussian window; DRAEM's zero padding or kornia's reflect) and the
focal loss with DRAEM's label smoothing (see ``methods.draem.model`` for the choices)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


SSIM_PADDINGS = ("zeros", "reflect")


# -- losses ---------------------------------------------------------------------------------------------
def gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | str = "cpu") -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(
    a: torch.Tensor, b: torch.Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0, padding: str = "zeros"
) -> torch.Tensor:
    """Per-pixel SSIM of (B, C, H, W) images, Gaussian window, 'same' size; ``padding`` "zeros"
    (DRAEM's ``SSIM``: ``F.conv2d`` zero padding) or "reflect" (kornia's, anomalib's)."""
    if padding not in SSIM_PADDINGS:
        raise ValueError(f"ssim: padding '{padding}' is not one of {', '.join(SSIM_PADDINGS)}")
    channels = a.shape[1]
    window = gaussian_window(window_size, sigma, a.device).to(a.dtype).expand(channels, 1, window_size, window_size)
    pad = window_size // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        if padding == "reflect":
            return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), window, groups=channels)
        return F.conv2d(x, window, padding=pad, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0, padding: str = "zeros") -> torch.Tensor:
    """Mean SSIM of (B, C, H, W) images (see ``ssim_map``)."""
    return ssim_map(a, b, window_size, sigma, data_range, padding).mean()


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0, smooth: float = 0.0
) -> torch.Tensor:
    """Mean over pixels of -alpha * (1 - p_t)^gamma * log p_t; logits (B, C, H, W), target (B, H, W)
    class indices (gamma = 0, alpha = 1 is the cross-entropy). ``smooth`` > 0 is DRAEM's label
    smoothing: p_t <- (1 - s) p_t + s / (C - 1) * (1 - p_t) + s (bounds -log p_t by -log s)."""
    if smooth <= 0:
        log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
        p_t = log_p.exp()
    else:
        p = torch.softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
        p_t = (1 - smooth) * p + smooth / (logits.shape[1] - 1) * (1 - p) + smooth
        log_p = p_t.log()
    return (-alpha * (1 - p_t).pow(gamma) * log_p).mean()


def draem_loss_terms(
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    logits: torch.Tensor,
    masks: torch.Tensor,
    *,
    ssim_weight: float = 1.0,
    ssim_window: int = 11,
    ssim_padding: str = "zeros",
    focal_gamma: float = 2.0,
    focal_alpha: float = 1.0,
    focal_smooth: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """DRAEM's loss terms: l2, ssim_weight * (1 - SSIM) and focal; masks (B, 1, H, W) in {0, 1}."""
    return {
        "l2": F.mse_loss(reconstruction, images),
        "ssim": ssim_weight * (1 - ssim(reconstruction, images, ssim_window, padding=ssim_padding)),
        "focal": focal_loss(logits, masks.squeeze(1), focal_gamma, focal_alpha, focal_smooth),
    }
