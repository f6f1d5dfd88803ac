"""CFA, continual: coupled-hypersphere feature adaptation with an averaged memory bank (seed 003,
section 1.3, Algorithm 3; Lee et al. 2022, code github.com/sungwool/CFA_for_anomaly_localization).

Features: a frozen backbone (default Wide-ResNet50-2, layers 1-3: 256 + 512 + 1024 = 1792 dims on a
56x56 grid at 224 px) through the run's shared feature cache. The trainable *patch descriptor* (CFA's
``Descriptor``): every layer 3x3 average-pooled (stride 1), upsampled (bilinear) to the first layer's
grid and concatenated; CoordConv (two channels of normalised row / column coordinates in [-1, 1])
and a 1x1 convolution to ``dims // gamma_d`` channels. Layer outputs are timm's (after the block's
ReLU), as anomalib's torchvision extractor; CFA's and the paper's code's own ResNet return
leaky_relu (slope 0.01) of the pre-activation instead (negative parts x 0.01): not reproduced.

CoordConv and seed 003's "6.4 million trainable weights": CFA's ``CoordConv2d`` (copied by the
benchmark paper's code and by anomalib) *subclasses* ``nn.Conv2d`` (a D -> d 1x1 conv: weight and
bias) and *also* builds an inner ``self.conv`` / ``self.conv2d`` (D + 2 -> d); ``forward`` uses only
the inner one, so the outer half of the parameters is dead (never used, never gets a gradient). For
WRN50-2: outer 1792*1792 + 1792 = 3.21M, inner 1794*1792 + 1792 = 3.22M; seed 003 counts both
(6.4M), clbench builds only the used conv (3.2M). Same model, same outputs: ``descriptor.conv`` is
anomalib's ``descriptor.layer.conv2d`` (tests/test_parity_cfa.py maps it and fills the dead outer
weights with NaN to prove they are unused).

Memory bank C: one memorised feature per patch position, (P, d) with P = h*w of the first grid
(gamma_c = 1, no k-means compression: the paper's setting). Before training on step i (0-based), the
step's bank C_i is the mean of the descriptor's output over the step's *own* good training images
(CFA's ``_init_centroid``, anomalib's ``initialize_centroid``, at the current descriptor). C_i is an
exact per-image mean (CFA and anomalib average batch means: identical when every batch is full).
Under replay the B+B batches' replayed images are left out of C_i (a replayed image's key names its
own category; the paper's code also builds C_i from the current task's loader only); joint learns
one bank of all tasks at step 0. ``weighting`` merges C_i into C:

* ``task`` (default, seed 003 Algorithm 3 as written): C <- C * i / (i + 1) + C_i / (i + 1), every
  task weighs the same.
* ``batch`` (the benchmark paper's code, ``src/models/cfa.py`` ``DSVDD._update_centroid``): one
  running mean over *all batches seen so far*, D <- (D * j + mean(batch)) / (j + 1) with j counting
  batches across tasks (``total_num_batches``), so a task weighs by its batch count n_i:
  C <- (C * n + C_i * n_i) / (n + n_i), n = batches of earlier tasks. n_i = floor(images / batch)
  (its loader has ``drop_last=True``), at least 1; the count is the ``bank_batches`` buffer (resume).
  Which images the paper's shuffled ``drop_last`` loader leaves out of C_i is random; clbench keeps
  all of them in C_i (the per-image mean) and uses the paper's batch count as the weight.
Earlier tasks' contributions are not recomputed with the newer descriptor (as in the paper's code).

Loss (soft boundary, seed 003 L_CFA; CFA's ``_soft_boundary``), with D the *squared* Euclidean
distance of a descriptor feature to memorised features, sorted increasingly:

    L = 1/nu * ( mean_{t, k<=K} max(0, D_k - r^2) + mean_{t, j<=J} max(0, r^2 - D_{K+j} - alpha) )

K = J = 3, alpha = 0.1, 1/nu = 1000 (CFA's nu = 1e-3; anomalib's "* 1000"). Repulsion takes the
(K+1)..(K+J)-th nearest (seed 003's formula); CFA, the paper's code and anomalib slice ``[J:]`` of
the K+J nearest, the same set when K = J (the only setting any of them uses).

Radius r: *learnable*, initialised at 1e-5 and trained with the descriptor (``learn_radius``, default
True). Seed 003 §1.3.1: CFA "optimize[s] the hypersphere radius and center"; CFA's code and the
benchmark paper's code make r an ``nn.Parameter`` inside the optimised module. anomalib 2.7.0 keeps r
a constant (``torch.ones(1, requires_grad=True) * radius`` is not a Parameter, the optimiser never
sees it): ``learn_radius=False`` is anomalib's behaviour (the parity test runs it that way).

Optimiser: AdamW, lr 1e-3, weight decay 5e-4, amsgrad (CFA, the paper's code and anomalib);
``optimizer_state`` reset (default: fresh per task) | keep (one for the stream, as the paper's code
builds it once in ``Trainer_cfa.__init__``). Descriptor and r carried over from task to task.
Schedule: 30 epochs, batch 4 (+4 replay), *no early stopping* (seed 003 §1.3.4 gives 30 epochs and,
unlike for STFPM and EfficientAD, no early stopping; CFA's code runs 30 epochs). ``patience=N`` turns
on early stopping on the CFA loss of the held-out *good training* images (never the test set) with
the best weights restored. (The paper's code: 50 epochs, early stopping on the *test set's* pixel F1,
patience 7, without restoring; CFA's code reports the best epoch on the test set: neither is
reproduced.)

Score (CFA / anomalib ``compute_score``): Euclidean distances d_1 <= ... <= d_K to the K nearest
memorised features, score = softmin(d_1..d_K)[0] * d_1 per patch; upsampled (bilinear) to the input
size, Gaussian-smoothed (sigma 4); image score = max of the map. Nearest neighbours are computed with
an exact torch matmul (the loss needs gradients through them, and the bank has only P rows).
tests/test_parity_cfa.py checks bank, maps, scores, loss and one optimiser step against anomalib.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clbench.features.backbones import feature_info
from clbench.data import Batch
from clbench.features.maps import finite_or_raise, gaussian_blur, upsample
from clbench.params import BACKBONE, LAYERS, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Options, Param
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData
from methods.training import fit_epochs

WEIGHTINGS = ("task", "batch")


class PatchDescriptor(nn.Module):
    """CFA's descriptor: pooled, upsampled, concatenated layers -> CoordConv 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    @staticmethod
    def patch_features(features: list[torch.Tensor]) -> torch.Tensor:
        grid = features[0].shape[-2:]
        parts = []
        for level in features:
            level = F.avg_pool2d(level, 3, 1, 1)
            if level.shape[-2:] != grid:
                level = F.interpolate(level, size=grid, mode="bilinear", align_corners=False)
            parts.append(level)
        return torch.cat(parts, dim=1)

    @staticmethod
    def add_coords(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([x, ys, xs], dim=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.add_coords(self.patch_features(features)))


def squared_distances(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B, P, d) x (M, d) -> (B, P, M) squared Euclidean distances (CFA's matmul expansion)."""
    f2 = features.pow(2).sum(-1, keepdim=True)
    c2 = bank.pow(2).sum(-1)
    return f2 + c2 - 2 * features @ bank.t()


def cfa_loss(distances: torch.Tensor, radius: torch.Tensor, k: int, j: int, alpha: float, nu: float) -> torch.Tensor:
    """Soft-boundary loss on squared distances (B, P, M): attraction of the K nearest memorised
    features beyond r, repulsion of the next J within r (margin alpha); scaled by 1/nu."""
    nearest = distances.topk(k + j, dim=-1, largest=False).values
    r2 = radius.pow(2)
    attraction = (nearest[..., :k] - r2).clamp_min(0).mean()
    repulsion = (r2 - nearest[..., k:] - alpha).clamp_min(0).mean() if j > 0 else nearest.new_zeros(())
    return (attraction + repulsion) / nu


def softmin_score(distances: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P, M) squared distances -> (B, P): softmin over the K nearest Euclidean distances,
    weight of the nearest times the nearest distance (CFA's test score)."""
    nearest = distances.clamp_min(0).sqrt().topk(k, dim=-1, largest=False).values
    return F.softmin(nearest, dim=-1)[..., 0] * nearest[..., 0]


@METHODS.register("cfa")
class CFA(AnomalyMethod):
    trains_on_frozen_features = True  # the descriptor reads only the frozen backbone's features (latent replay)
    hyperparameters = {
        "backbone": Param("wide_resnet50_2", BACKBONE),
        "layers": Param(["layer1", "layer2", "layer3"], LAYERS),
        # descriptor output dims = input dims // gamma_d (CFA paper / anomalib default 1); <= input dims (__init__)
        "gamma_d": Param(1, POSITIVE_INT),
        "k": Param(3, POSITIVE_INT),  # nearest memorised features attracted (and used for the score)
        "j": Param(3, NON_NEGATIVE_INT),  # hard negatives repelled (the (K+1)..(K+J)-th nearest)
        "alpha": Param(0.1, NON_NEGATIVE),
        "nu": Param(1e-3, POSITIVE),
        "radius": Param(1e-5, NON_NEGATIVE),
        "learn_radius": Param(True, bool),  # CFA / the paper's code train r; anomalib keeps it constant (False)
        "weighting": Param("task", Options(*WEIGHTINGS)),  # task (seed 003 Algorithm 3) | batch (the paper's code)
        "epochs": Param(30, POSITIVE_INT),
        "batch_size": Param(4, POSITIVE_INT),
        "lr": Param(1e-3, NON_NEGATIVE),
        "weight_decay": Param(5e-4, NON_NEGATIVE),
        # seed 003: 30 epochs, no early stopping; N: held-out early stopping
        "patience": Param(None, [None, POSITIVE_INT]),
        "sigma": Param(4.0, NON_NEGATIVE),
        "optimizer_state": "reset",  # reset | keep (its constraint: AnomalyMethod's)
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        self.backbone = context.backbones.get(p["backbone"], p["layers"])
        in_dims = sum(self.backbone.channels)
        if p["gamma_d"] > in_dims:  # the backbone's channels: known once it is built
            raise ValueError(f"method_params: gamma_d={p['gamma_d']!r} is not an integer in [1, {in_dims}] "
                             f"(the channels of {p['backbone']}'s layers)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            self.descriptor = PatchDescriptor(in_dims, in_dims // p["gamma_d"])
        self.radius = nn.Parameter(torch.full((1,), float(p["radius"])), requires_grad=bool(p["learn_radius"]))
        self.register_buffer("memory_bank", torch.empty(0))  # (P, d), the method's state
        self.register_buffer("n_tasks", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_batches", torch.zeros((), dtype=torch.long))  # weighting: batch

    def frozen_backbones(self):
        return [self.backbone]

    # -- features ------------------------------------------------------------------------------
    def describe(self, batch: Batch) -> torch.Tensor:
        """(B, P, d) descriptor features of a batch."""
        out = self.descriptor(self.backbone.features(batch))
        self._grid = tuple(out.shape[-2:])
        return out.flatten(2).transpose(1, 2)

    def _loss(self, batch: Batch) -> torch.Tensor:
        p = self.params
        distances = squared_distances(self.describe(batch), self.memory_bank)
        return cfa_loss(distances, self.radius, p["k"], p["j"], p["alpha"], p["nu"])

    def continual_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The trained descriptor's patch features (``descriptor``, (B, d, h, w)) on the cached backbone
        features: what CFA's loss pulls towards the memory bank (the radius is no per-image output)."""
        return {"descriptor": self.descriptor(self.backbone.features(batch))}

    # -- memory bank (Algorithm 3, or the paper's code's batch weighting) ------------------------
    @torch.no_grad()
    def task_bank(self, data: TaskData) -> tuple[torch.Tensor, int]:
        """Mean descriptor feature per patch position over the step's own training images, and
        their batch count as the paper's code's ``drop_last`` loader makes it (at least 1)."""
        tasks = set(data.task_names)
        total, count = None, 0
        for batch in data.train.batches(self.params["batch_size"]):
            rows = [i for i, key in enumerate(batch.keys) if key.split("/", 1)[0] in tasks]
            if len(rows) < len(batch):  # drop replayed images (keys name their category)
                if not rows:
                    continue
                batch = Batch(batch.pixels[rows], [batch.keys[i] for i in rows], batch.labels[rows], batch.masks[rows])
            features = self.describe(batch)
            total = features.sum(0) if total is None else total + features.sum(0)
            count += len(batch)
        if total is None:
            raise ValueError(f"CFA: no training images for tasks {data.task_names}")
        return total / count, max(1, count // self.params["batch_size"])

    @torch.no_grad()
    def update_bank(self, bank_t: torch.Tensor, batches: int) -> None:
        """Merge the step's bank into C (``weighting``: per task, or per batch as the paper's code)."""
        needed = self.params["k"] + self.params["j"]
        if bank_t.shape[0] < needed:
            raise ValueError(f"CFA: the bank has {bank_t.shape[0]} patch positions, k + j = {needed} needed (larger images)")
        i, seen = int(self.n_tasks.item()), int(self.bank_batches.item())
        if i == 0:
            self.memory_bank = bank_t.clone()
        elif self.params["weighting"] == "task":
            self.memory_bank = self.memory_bank * (i / (i + 1)) + bank_t / (i + 1)
        else:
            self.memory_bank = self.memory_bank * (seen / (seen + batches)) + bank_t * (batches / (seen + batches))
        self.n_tasks.fill_(i + 1)
        self.bank_batches.fill_(seen + batches)

    # -- learning ------------------------------------------------------------------------------
    def build_optimiser(self) -> torch.optim.Optimizer:
        """AdamW over the descriptor (and r if learnable), CFA's / anomalib's settings."""
        p = self.params
        trainable = [q for q in self.parameters() if q.requires_grad]
        return torch.optim.AdamW(trainable, lr=p["lr"], weight_decay=p["weight_decay"], amsgrad=True)

    def fit_task(self, data: TaskData) -> None:
        p = self.params
        self.descriptor.eval()
        self.update_bank(*self.task_bank(data))
        optimiser = self.task_optimiser(self.build_optimiser)
        info = fit_epochs(
            self, data, self._loss, optimiser,
            epochs=self.num_epochs(p["epochs"]), batch_size=p["batch_size"], patience=p["patience"],
        )
        self.fit_info = info | {
            "radius": float(self.radius.detach()),
            "bank_tasks": int(self.n_tasks.item()),
            "bank_batches": int(self.bank_batches.item()),
        }

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        if self.memory_bank.numel() == 0:
            raise RuntimeError("CFA.predict called before any task was learned")
        self.descriptor.eval()
        features = self.describe(batch)
        score = softmin_score(squared_distances(features, self.memory_bank), self.params["k"])
        maps = score.reshape(len(batch), *self._grid)
        maps = gaussian_blur(upsample(maps, self.context.image_size), self.params["sigma"])
        maps = finite_or_raise(maps, "CFA").float().cpu()
        return Prediction(maps=maps, scores=maps.flatten(1).amax(dim=1))

    # -- analytic memory ----------------------------------------------------------------------
    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """fp32 memory bank (P, d): seed 003's 56 x 56 x 1792 x 4 B = 22,478,848 B for WRN50-2 at
        224 px (gamma_d = 1). The descriptor (CoordConv 1x1: (D + 2) * d + d weights) and the radius
        are trainable parameters, listed separately (not method state)."""
        p = cls.resolve_params(params)
        channels, reductions = feature_info(p["backbone"], p["layers"])
        dims_in = sum(channels)
        d = dims_in // p["gamma_d"]
        side = -(-image_size // reductions[0])
        return {
            "method_state/memory_bank": side * side * d * 4,
            "model_trainable/descriptor": ((dims_in + 2) * d + d) * 4,
            "model_trainable/radius": 4,
        }
