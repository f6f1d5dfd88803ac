"""DRAEM, continual: a reconstructive and a discriminative network trained on simulated anomalies,
fine-tuned task after task (seed 003, section 1.6; Zavrtanik et al. 2021).

No frozen backbone. Images in [0, 1] (``batch.pixels / 255``, not ImageNet-normalised, as DRAEM).

* Reconstructive sub-network: DRAEM's encoder-decoder (5 conv blocks, 4 max-pools, bilinear
  up-sampling, no skip connections), base width ``base_width`` (128 in DRAEM: 69.0 M parameters).
* Discriminative sub-network: DRAEM's U-Net (6 blocks, 5 max-pools, skip connections) on the
  channel-wise concatenation of the (augmented) input and its reconstruction, base width
  ``disc_base_width`` (64 in DRAEM: 28.4 M parameters); 2 output channels (normal / anomalous).
  Inputs whose side is not a multiple of 32 are replicate-padded up to one and the outputs cropped.
* Simulated anomalies (``methods.perlin``): with probability 0.5 an image gets a Perlin mask
  (threshold 0.5, 2^[0..6] lattice cells at 256 px, rotated) filled with an anomaly-source texture
  blended with opacity beta ~ U[0.1, 1.0). Anomaly source: the images of the folder
  ``anomaly_source`` when given (DTD in the paper), otherwise a deterministic *procedural* texture
  fallback (coloured fractal Perlin noise, stripes, checkerboards, Perlin blobs with random colours);
  ``fit_info["anomaly_source_procedural"]`` records which (1.0 = procedural). The simulator draws
  from a generator seeded per step, epoch and batch (``data.seed``), so a resumed run reproduces the
  uninterrupted one. (DRAEM also rotates 30 % of the *normal* images; not done here.)
* Loss: l2(I, I_r) + lambda * (1 - SSIM(I, I_r)) + Focal(M_a, M) with lambda = 1 (DRAEM's code;
  anomalib's 2 * kornia SSIMLoss is the same), SSIM with an 11x11 Gaussian window (sigma 1.5, zero
  padding, C1 = 0.01^2, C2 = 0.03^2, as DRAEM's ``SSIM``), focal loss on the softmax of the 2-channel
  output with gamma = 2, alpha = 1 (anomalib's kornia ``FocalLoss(alpha=1)``; DRAEM's own default),
  mean over pixels.
* Optimiser: Adam, lr 1e-4 (DRAEM), a fresh optimiser per task with the weights (and BatchNorm
  statistics) carried over; DRAEM's MultiStepLR (x0.2 at 80 % and 90 % of the task's epochs).
  50 epochs per task, batch 4 (+4 replay) as seed 003. No early stopping (DRAEM has none; its loss
  depends on random simulated anomalies).
* Map = softmax anomaly channel of the discriminative output at input size; image score = max of the
  map mean-filtered with an sf x sf box (DRAEM: sf = 21 at 256 px). ``mean_filter=None`` scales it
  with the image: sf = the odd integer nearest to 21 * image_size / 256 (at least 1): 19 at 224 px,
  5 at 64 px, 3 at 32 px; the box is zero-padded (``avg_pool2d``, as DRAEM's code).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clbench.data import Batch
from clbench.maps import finite_or_raise
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData
from methods.perlin import AnomalySource, synthesize_anomalies

DRAEM_SIZE, DRAEM_FILTER = 256, 21


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


# -- losses ---------------------------------------------------------------------------------------------
def gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | str = "cpu") -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of (B, C, H, W) images, Gaussian window, zero 'same' padding (DRAEM's SSIM)."""
    channels = a.shape[1]
    window = gaussian_window(window_size, sigma, a.device).to(a.dtype).expand(channels, 1, window_size, window_size)
    pad = window_size // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, padding=pad, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0) -> torch.Tensor:
    """Mean over pixels of -alpha * (1 - p_t)^gamma * log p_t; logits (B, 2, H, W), target (B, H, W)
    in {0, 1} (gamma = 0, alpha = 1 is the cross-entropy)."""
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    return (-alpha * (1 - log_p.exp()).pow(gamma) * log_p).mean()


def draem_filter_size(image_size: int) -> int:
    """DRAEM's 21 px mean filter at 256 px, scaled to the image size and kept odd."""
    scaled = DRAEM_FILTER * image_size / DRAEM_SIZE
    return max(1, 2 * int(math.floor((scaled - 1) / 2 + 0.5)) + 1)


@METHODS.register("draem")
class DRAEM(AnomalyMethod):
    hyperparameters = {
        "base_width": 128,
        "disc_base_width": 64,
        "anomaly_source": None,  # folder of texture images (e.g. DTD); None: procedural textures
        "p_anomalous": 0.5,
        "beta": [0.1, 1.0],
        "perlin_threshold": 0.5,
        "perlin_min_scale": 0,
        "perlin_max_scale": None,  # None: 6 at 256 px, cells never under 4 px (see methods.perlin)
        "ssim_weight": 1.0,
        "ssim_window": 11,
        "focal_gamma": 2.0,
        "focal_alpha": 1.0,
        "mean_filter": None,  # None: 21 at 256 px scaled with the image size (odd)
        "epochs": 50,
        "batch_size": 4,
        "lr": 1e-4,
        "lr_milestones": [0.8, 0.9],  # fractions of the task's epochs (DRAEM)
        "lr_gamma": 0.2,
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        for key in ("base_width", "disc_base_width"):
            if not (isinstance(p[key], int) and p[key] > 0):
                raise ValueError(f"method_params: {key} must be a positive integer, got {p[key]!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            self.reconstructive = ReconstructiveNetwork(p["base_width"])
            self.discriminative = DiscriminativeNetwork(p["disc_base_width"])
            self.apply(init_weights)
        self.source = AnomalySource(p["anomaly_source"], context.image_size)
        size = p["mean_filter"] if p["mean_filter"] is not None else draem_filter_size(context.image_size)
        if not (isinstance(size, int) and size >= 1 and size % 2 == 1):
            raise ValueError(f"method_params: mean_filter must be an odd positive integer, got {size!r}")
        self.filter_size = size

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and 2-channel logits of (B, 3, H, W) images in [0, 1]."""
        h, w = images.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32
        x = F.pad(images, (0, pw, 0, ph), mode="replicate") if ph or pw else images
        reconstruction = self.reconstructive(x)
        logits = self.discriminative(torch.cat([x, reconstruction], dim=1))
        return reconstruction[..., :h, :w], logits[..., :h, :w]

    def loss(self, images: torch.Tensor, reconstruction: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        p = self.params
        l2 = F.mse_loss(reconstruction, images)
        structural = 1 - ssim(reconstruction, images, p["ssim_window"])
        segmentation = focal_loss(logits, masks.squeeze(1), p["focal_gamma"], p["focal_alpha"])
        return l2 + p["ssim_weight"] * structural + segmentation

    def _images(self, batch: Batch) -> torch.Tensor:
        return batch.pixels.to(self.context.device).float() / 255

    # -- learning --------------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        p = self.params
        device = self.context.device
        optimiser = torch.optim.Adam(self.parameters(), lr=p["lr"])
        epochs = self.num_epochs(p["epochs"])
        milestones = sorted({int(f * epochs) for f in p["lr_milestones"]} - {0})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=p["lr_gamma"])
        first_loss = last_loss = math.nan
        anomalous = synthetic = 0.0
        n_images = 0
        for epoch in range(epochs):
            self.train()
            total, count = 0.0, 0
            for index, batch in enumerate(data.train.batches(p["batch_size"], shuffle=True, seed=data.seed * 1000 + epoch)):
                generator = torch.Generator().manual_seed(data.seed * 1_000_003 + epoch * 100_003 + index)
                clean = batch.pixels.float() / 255
                augmented, masks = synthesize_anomalies(
                    clean, self.source, generator, p_anomalous=p["p_anomalous"], beta=tuple(p["beta"]),
                    threshold=p["perlin_threshold"], min_scale=p["perlin_min_scale"], max_scale=p["perlin_max_scale"],
                )
                clean, augmented, masks = clean.to(device), augmented.to(device), masks.to(device)
                reconstruction, logits = self(augmented)
                loss = self.loss(clean, reconstruction, logits, masks)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"DRAEM: non-finite training loss at epoch {epoch} of {data.task_names}")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(batch)
                count += len(batch)
                anomalous += float((masks.flatten(1).amax(1) > 0).sum())
                synthetic += float(masks.mean()) * len(batch)
                n_images += len(batch)
            scheduler.step()
            last_loss = total / count
            first_loss = last_loss if epoch == 0 else first_loss
        self.eval()
        self.fit_info = {
            "epochs_run": epochs, "epochs_max": epochs,
            "train_loss_first": first_loss, "train_loss_last": last_loss,
            "anomaly_source_procedural": float(self.source.procedural),
            "anomaly_source_images": float(len(self.source.paths)),
            "synthetic_anomalous_fraction": anomalous / max(n_images, 1),  # images with a non-empty mask
            "synthetic_mask_fraction": synthetic / max(n_images, 1),  # mean masked pixel fraction
        }

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        self.eval()
        _, logits = self(self._images(batch))
        maps = torch.softmax(logits, dim=1)[:, 1]
        smoothed = F.avg_pool2d(maps.unsqueeze(1), self.filter_size, stride=1, padding=self.filter_size // 2)
        maps = finite_or_raise(maps, "DRAEM").float().cpu()
        return Prediction(maps=maps, scores=smoothed.flatten(1).amax(dim=1).float().cpu())

    # -- analytic memory -------------------------------------------------------------------------
    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """DRAEM keeps no state besides its networks: fp32 parameters plus BatchNorm statistics
        (counted where ``memory_components`` counts them: with the trainable networks)."""
        p = cls.resolve_params(params)
        with torch.device("meta"):
            networks = {
                "reconstructive": ReconstructiveNetwork(p["base_width"]),
                "discriminative": DiscriminativeNetwork(p["disc_base_width"]),
            }
        out = {"method_state": 0}
        for name, net in networks.items():
            tensors = list(net.parameters()) + list(net.buffers())
            out[f"model_trainable/{name}"] = sum(t.numel() * t.element_size() for t in tensors)
        return out
