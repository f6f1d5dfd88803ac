"""DRAEM, continual: a reconstructive and a discriminative network trained on simulated anomalies,
fine-tuned task after task (seed 003, section 1.6; Zavrtanik et al. 2021).

No frozen backbone. Images in [0, 1] (``batch.pixels / 255``, not ImageNet-normalised, as DRAEM).

* Reconstructive sub-network: DRAEM's encoder-decoder (5 conv blocks, 4 max-pools, bilinear
  up-sampling, no skip connections), base width ``base_width`` (128 in DRAEM: 69.0 M parameters).
* Discriminative sub-network: DRAEM's U-Net (6 blocks, 5 max-pools, skip connections) on the
  channel-wise concatenation of the (augmented) input and its reconstruction, base width
  ``disc_base_width`` (64 in DRAEM: 28.4 M parameters); 2 output channels (normal / anomalous).
  Inputs whose side is not a multiple of 32 are replicate-padded up to one and the outputs cropped.
* Simulated anomalies (``methods.draem.simulator``): with probability ``p_rotate`` = 0.3 a *normal* training
  image is first rotated by an angle uniform in [-90, 90] degrees (DRAEM's ``MVTecDRAEMTrainDataset``
  and the benchmark paper's copy of it: ``torch.rand(1) > 0.7`` then imgaug ``Affine(rotate=(-90,
  90))``; bilinear, corners filled with 0 = black, imgaug's default), so the rotated image is both
  the simulator's input and the reconstruction target. Then with probability 0.5 an image gets a
  Perlin mask (threshold 0.5, 2^[0..5] lattice cells at 256 px, rotated) filled with an
  anomaly-source texture blended with opacity beta ~ U[0.1, 1.0) (DRAEM paper, anomalib; DRAEM's
  code: (0.2, 1.0], ``beta=[0.2, 1.0]``). Anomaly source: the images of the folder
  ``anomaly_source`` when given (DTD in the paper), otherwise a deterministic *procedural* texture
  fallback (coloured fractal Perlin noise, stripes, checkerboards, Perlin blobs with random colours);
  ``fit_info["anomaly_source_procedural"]`` records which (1.0 = procedural). The simulator and the
  rotation draw from generators seeded per step, epoch and batch (``data.seed``; the rotation has its
  own stream, so ``p_rotate=0`` leaves the simulated anomalies as they were), so a resumed run
  reproduces the uninterrupted one. anomalib 2.7.0 does not rotate the normal images.
* Sub-network input: the concatenation (input, reconstruction), anomalib's channel order; DRAEM's
  code concatenates (reconstruction, input) - equivalent for a network trained from scratch, it only
  matters for loading DRAEM's released weights (swap the first conv's input channels).
* Loss: l2(I, I_r) + lambda * (1 - SSIM(I, I_r)) + Focal(M_a, M) with lambda = 1 (DRAEM's code;
  anomalib's 2 * kornia SSIMLoss is the same). SSIM with an 11x11 Gaussian window (sigma 1.5,
  C1 = 0.01^2, C2 = 0.03^2, data range 1), ``ssim_padding="zeros"`` as DRAEM's ``SSIM``
  (``F.conv2d`` zero padding); ``"reflect"`` is kornia's (anomalib's) border, equal in the interior.
  (DRAEM's SSIM guesses its data range from the reconstruction - 2 when it dips below -0.5, 255 above
  128 - a quirk not copied.) Focal loss on the softmax of the 2-channel output, gamma = 2, every
  pixel weighted ``focal_alpha`` = 1, mean over pixels, label smoothing ``focal_smooth`` = 1e-5:
  DRAEM's ``FocalLoss()`` (alpha None); ``focal_smooth=0`` is kornia's ``focal_loss(alpha=None)``
  summed and divided by the pixel count. anomalib 2.7.0's ``kornia.losses.FocalLoss(alpha=1)``
  means something else under kornia >= 0.7.1: class 0 weighted 1 - alpha = 0 and the mean taken over
  both channels, i.e. half the focal term of the *anomalous* pixels only, normal pixels never
  contribute. Not followed (tests/test_parity_draem.py).
* Optimiser: Adam, lr 1e-4 (DRAEM), ``optimizer_state`` reset (default: a fresh optimiser per task,
  the weights and BatchNorm statistics carried over) or keep (one Adam for the stream, the paper's
  code); DRAEM's MultiStepLR (x0.2 at 80 % and 90 % of the task's epochs), built per task, so each
  task starts again at lr 1e-4. (The paper's code builds its scheduler once for the stream: after
  epoch 45 of the first task every later task trains at 4e-6; not reproduced.) 50 epochs per task,
  batch 4 (+4 replay) as seed 003. No early stopping (DRAEM has none; its loss depends on random
  simulated anomalies).
* Map = softmax anomaly channel of the discriminative output at input size; image score = max of the
  map mean-filtered with an sf x sf box (seed 003 section 1.6.3, DRAEM: sf = 21 at 256 px; anomalib
  takes the plain max of the map, which is ``mean_filter=1``). ``mean_filter=None`` scales it
  with the image: sf = the odd integer nearest to 21 * image_size / 256 (at least 1): 19 at 224 px,
  5 at 64 px, 3 at 32 px; the box is zero-padded (``avg_pool2d``, as DRAEM's code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from clbench.data import Batch
from clbench.engine import seeding
from clbench.features.maps import finite_or_raise
from clbench.params import (
    FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, ODD_POSITIVE_INT, PATH, POSITIVE, POSITIVE_INT, Interval, ListOf, Options,
    Param,
)
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData
from methods.draem.losses import SSIM_PADDINGS, draem_loss_terms
from methods.draem.networks import DiscriminativeNetwork, ReconstructiveNetwork, init_weights
from methods.draem.simulator import AnomalySource, rotate_normal_images, synthesize_anomalies
from methods.training import train_task


DRAEM_SIZE, DRAEM_FILTER = 256, 21


def draem_filter_size(image_size: int) -> int:
    """DRAEM's 21 px mean filter at 256 px, scaled to the image size and kept odd."""
    scaled = DRAEM_FILTER * image_size / DRAEM_SIZE
    return max(1, 2 * int(math.floor((scaled - 1) / 2 + 0.5)) + 1)


def fused_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where the device supports it. Speed: the same update in one kernel per step instead
    of ~8 per tensor over DRAEM's 200 parameter tensors (97 M values): 0.14 s instead of 0.70 s of CPU
    per iteration, ~7 % of a 256 px batch-4 iteration (1 thread; anomalib uses the plain Adam). Its
    vectorised arithmetic rounds differently: weights after a fixed-seed training differ by <= 2e-7
    relative (about one float32 ulp), not bit-identically."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


@dataclass
class SimulatedBatch:
    """A training batch after DRAEM's augmentation, on the device: the (rotated) normal images in
    [0, 1] (the reconstruction target), their simulated-anomaly versions, the masks (B, 1, H, W), and
    the rotation angles (NaN: not rotated)."""

    clean: torch.Tensor
    augmented: torch.Tensor
    masks: torch.Tensor
    angles: torch.Tensor

    def __len__(self) -> int:
        return len(self.clean)


@METHODS.register("draem")
class DRAEM(AnomalyMethod):
    hyperparameters = {
        "base_width": Param(128, POSITIVE_INT),
        "disc_base_width": Param(64, POSITIVE_INT),
        "anomaly_source": Param(None, [None, PATH]),  # folder of texture images (e.g. DTD); None: procedural textures
        "p_anomalous": Param(0.5, FRACTION),
        "beta": Param([0.1, 1.0], ListOf(FRACTION, length=2)),  # the texture's opacity: uniform in [beta[0], beta[1]]
        "perlin_threshold": Param(0.5, float),
        "perlin_min_scale": Param(0, NON_NEGATIVE_INT),
        # None: 6 at 256 px, cells never under 4 px (see methods.draem.simulator)
        "perlin_max_scale": Param(None, [None, NON_NEGATIVE_INT]),
        "ssim_weight": Param(1.0, NON_NEGATIVE),
        "ssim_window": Param(11, ODD_POSITIVE_INT),
        "focal_gamma": Param(2.0, NON_NEGATIVE),
        "ssim_padding": Param("zeros", Options(*SSIM_PADDINGS)),  # DRAEM's; "reflect": kornia's (anomalib's)
        "focal_alpha": Param(1.0, NON_NEGATIVE),
        # DRAEM's FocalLoss label smoothing; 0: plain focal loss
        "focal_smooth": Param(1e-5, Interval(float, 0, 0.5, closed="left")),
        "p_rotate": Param(0.3, FRACTION),  # DRAEM rotates 30 % of the normal training images
        "rotate_degrees": Param(90.0, Interval(float, 0, 180)),  # by an angle uniform in [-90, 90]
        "mean_filter": Param(None, [None, ODD_POSITIVE_INT]),  # None: 21 at 256 px scaled with the image size (odd)
        "epochs": Param(50, POSITIVE_INT),
        "batch_size": Param(4, POSITIVE_INT),
        "lr": Param(1e-4, NON_NEGATIVE),
        "lr_milestones": Param([0.8, 0.9], ListOf(FRACTION)),  # fractions of the task's epochs (DRAEM)
        "lr_gamma": Param(0.2, POSITIVE),
        "optimizer_state": "reset",  # reset | keep (see AnomalyMethod.task_optimiser)
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            self.reconstructive = ReconstructiveNetwork(p["base_width"])
            self.discriminative = DiscriminativeNetwork(p["disc_base_width"])
            self.apply(init_weights)
        self.source = AnomalySource(p["anomaly_source"], context.image_size)
        self.filter_size = p["mean_filter"] if p["mean_filter"] is not None else draem_filter_size(context.image_size)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and 2-channel logits of (B, 3, H, W) images in [0, 1]."""
        h, w = images.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32
        x = F.pad(images, (0, pw, 0, ph), mode="replicate") if ph or pw else images
        reconstruction = self.reconstructive(x)
        logits = self.discriminative(torch.cat([x, reconstruction], dim=1))
        return reconstruction[..., :h, :w], logits[..., :h, :w]

    def loss(
        self, images: torch.Tensor, reconstruction: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor,
        by_term: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """l2 + ssim + focal; ``by_term``: the three named terms instead (the trainer sums them in
        this order and logs each)."""
        p = self.params
        terms = draem_loss_terms(
            images, reconstruction, logits, masks, ssim_weight=p["ssim_weight"], ssim_window=p["ssim_window"],
            ssim_padding=p["ssim_padding"], focal_gamma=p["focal_gamma"], focal_alpha=p["focal_alpha"],
            focal_smooth=p["focal_smooth"],
        )
        if by_term:
            return {"l2": terms["l2"], "ssim": terms["ssim"], "focal": terms["focal"]}
        return terms["l2"] + terms["ssim"] + terms["focal"]

    def _images(self, batch: Batch) -> torch.Tensor:
        return batch.pixels.to(self.context.device).float() / 255

    def continual_outputs(self, batch: Batch | SimulatedBatch) -> dict[str, torch.Tensor]:
        """The ``reconstruction`` (B, 3, H, W) and the discriminative ``logits`` (B, 2, H, W): the two
        outputs DRAEM's l2 + SSIM and focal losses train. Of a ``Batch``: its clean images in [0, 1];
        of a training batch (``SimulatedBatch``, what the trainer's callbacks see): the network's
        input, the simulated-anomaly images. In training mode the BatchNorm statistics update, as in
        any forward pass."""
        images = batch.augmented if isinstance(batch, SimulatedBatch) else self._images(batch)
        reconstruction, logits = self(images)
        return {"reconstruction": reconstruction, "logits": logits}

    # -- learning --------------------------------------------------------------------------------
    def simulate(self, batch: Batch, step_seed: int, epoch: int, index: int) -> SimulatedBatch:
        """DRAEM's training batch ``index`` of ``epoch``: some normal images rotated, then anomalies
        simulated on them, each from the batch's own stream (``seeding.rotation_seed``,
        ``seeding.simulation_seed``), so a resumed run draws the same."""
        p = self.params
        device = self.context.device
        rotation = torch.Generator().manual_seed(seeding.rotation_seed(step_seed, epoch, index))
        pixels, angles = rotate_normal_images(batch.pixels, rotation, p=p["p_rotate"], degrees=p["rotate_degrees"])
        generator = torch.Generator().manual_seed(seeding.simulation_seed(step_seed, epoch, index))
        clean = pixels.float() / 255
        augmented, masks = synthesize_anomalies(
            clean, self.source, generator, p_anomalous=p["p_anomalous"], beta=tuple(p["beta"]),
            threshold=p["perlin_threshold"], min_scale=p["perlin_min_scale"], max_scale=p["perlin_max_scale"],
        )
        return SimulatedBatch(clean.to(device), augmented.to(device), masks.to(device), angles)

    def _training_loss(self, batch: SimulatedBatch) -> dict[str, torch.Tensor]:
        reconstruction, logits = self(batch.augmented)
        return self.loss(batch.clean, reconstruction, logits, batch.masks, True)  # True: by term

    def fit_task(self, data: TaskData) -> None:
        p = self.params
        optimiser = self.task_optimiser(lambda: fused_adam(self.parameters(), lr=p["lr"]))
        epochs = self.num_epochs(p["epochs"])
        milestones = sorted({int(f * epochs) for f in p["lr_milestones"]} - {0})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=p["lr_gamma"])
        anomalous = synthetic = rotated = 0.0
        n_images = 0

        def prepare(batch: Batch, epoch: int, index: int) -> SimulatedBatch:
            nonlocal anomalous, synthetic, rotated, n_images
            simulated = self.simulate(batch, data.seed, epoch, index)
            anomalous += float((simulated.masks.flatten(1).amax(1) > 0).sum())
            synthetic += float(simulated.masks.mean()) * len(batch)
            rotated += float((~simulated.angles.isnan()).sum())
            n_images += len(batch)
            return simulated

        result = train_task(
            self, data, self._training_loss, optimiser, epochs=epochs, batch_size=p["batch_size"],
            prepare=prepare, scheduler=scheduler,
        )
        self.fit_info = {
            "epochs_run": result.epochs_run, "epochs_max": epochs,
            "train_loss_first": result.first_loss, "train_loss_last": result.last_loss,
            "anomaly_source_procedural": float(self.source.procedural),
            "anomaly_source_images": float(len(self.source.paths)),
            "synthetic_anomalous_fraction": anomalous / max(n_images, 1),  # images with a non-empty mask
            "synthetic_mask_fraction": synthetic / max(n_images, 1),  # mean masked pixel fraction
            "rotated_fraction": rotated / max(n_images, 1),  # normal images rotated before the simulation
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
