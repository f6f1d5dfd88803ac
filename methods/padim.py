"""PaDiM, continual: one Gaussian per patch position, averaged over tasks (seed 003, Algorithm 1).

Embedding: frozen backbone layers (ResNet: layer1-3) upsampled (nearest) to the first layer's grid
and concatenated; a seeded random subset of ``n_features`` channels (PaDiM's random dimensionality
reduction). Per task t, the patch-wise mean mu_t and covariance Sigma_t (unbiased, + epsilon*I, PaDiM
eq. 1) are estimated from the task's training images in one streaming pass (Chan et al.'s pairwise
merge of batch means and centred scatter matrices, stable in float32). Continual update after
task t (1-based)::

    mu    <- ((t-1) * mu    + mu_t)    / t
    Sigma <- ((t-1) * Sigma + Sigma_t) / t

Choice made: we average the *covariance*, as the paper's Algorithm 1 writes. (The benchmark
paper's own code averages the inverse covariance instead; following the paper keeps the averaged
statistic a valid covariance of the task mixture's within-task spread.) The inverse is computed once
per task (Cholesky) and kept as a derived, non-persistent buffer for scoring.

Score: Mahalanobis distance per patch, upsampled (bilinear) to the input size, Gaussian-smoothed
(sigma 4); image score = max of the map (seed 003, 1.1.3).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from clbench.backbones import feature_info
from clbench.data import Batch
from clbench.maps import finite_or_raise, gaussian_blur, upsample
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData

# Channels kept after random reduction: PaDiM's 100 for ResNet18, seed 003's 350 for WRN50-2.
DEFAULT_FEATURES = {"resnet18": 100, "wide_resnet50_2": 350}
FALLBACK_FEATURES = 100


def default_n_features(backbone: str, total: int) -> int:
    return min(total, DEFAULT_FEATURES.get(backbone.split(".")[0], FALLBACK_FEATURES))


@METHODS.register("padim")
class PaDiM(AnomalyMethod):
    hyperparameters = {
        "backbone": "resnet18",
        "layers": ["layer1", "layer2", "layer3"],
        "n_features": None,  # None: 100 for resnet18, 350 for wide_resnet50_2 (seed 003)
        "epsilon": 0.01,
        "sigma": 4.0,
        "batch_size": 32,
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        self.backbone = context.backbones.get(p["backbone"], p["layers"])
        total = sum(self.backbone.channels)
        n_features = p["n_features"] or default_n_features(p["backbone"], total)
        if not 0 < n_features <= total:
            raise ValueError(f"method_params: n_features={n_features} must be in 1..{total} for {p['backbone']}")
        generator = torch.Generator().manual_seed(context.seed)
        index = torch.randperm(total, generator=generator)[:n_features].sort().values
        self.register_buffer("channel_index", index)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("covariance", torch.empty(0))
        self.register_buffer("n_tasks", torch.zeros((), dtype=torch.long))
        self.register_buffer("precision", torch.empty(0), persistent=False)

    def frozen_backbones(self):
        return [self.backbone]

    # -- embedding -----------------------------------------------------------------------------
    def embed(self, batch: Batch) -> torch.Tensor:
        """(B, P, d) patch embeddings: selected channels of layers upsampled to the first grid."""
        features = self.backbone.features(batch)
        grid = features[0].shape[-2:]
        parts, offset = [], 0
        for level in features:
            channels = level.shape[1]
            local = self.channel_index[(self.channel_index >= offset) & (self.channel_index < offset + channels)] - offset
            offset += channels
            if local.numel() == 0:
                continue
            level = level.index_select(1, local.to(level.device))
            if level.shape[-2:] != grid:
                level = F.interpolate(level, size=grid, mode="nearest")
            parts.append(level)
        emb = torch.cat(parts, dim=1)
        return emb.flatten(2).transpose(1, 2).contiguous()  # (B, P, d)

    # -- learning ------------------------------------------------------------------------------
    @torch.no_grad()
    def task_statistics(self, data: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch-wise mean (P, d) and covariance (P, d, d) of one step's training images."""
        count = 0
        mean = scatter = None
        for batch in data.train.batches(self.params["batch_size"]):
            emb = self.embed(batch).transpose(0, 1)  # (P, B, d)
            n_b = emb.shape[1]
            mean_b = emb.mean(dim=1)
            centred = emb - mean_b.unsqueeze(1)
            scatter_b = centred.transpose(1, 2) @ centred  # (P, d, d)
            if mean is None:
                mean, scatter, count = mean_b, scatter_b, n_b
                continue
            total = count + n_b
            delta = mean_b - mean
            scatter = scatter + scatter_b + delta.unsqueeze(2) * delta.unsqueeze(1) * (count * n_b / total)
            mean = mean + delta * (n_b / total)
            count = total
        if mean is None:
            raise ValueError(f"PaDiM: no training images for tasks {data.task_names}")
        d = mean.shape[1]
        covariance = scatter / max(count - 1, 1)
        covariance += self.params["epsilon"] * torch.eye(d, device=covariance.device)
        return mean, covariance

    @torch.no_grad()
    def fit_task(self, data: TaskData) -> None:
        mean_t, cov_t = self.task_statistics(data)
        t = int(self.n_tasks.item()) + 1
        if t == 1:
            self.mean, self.covariance = mean_t, cov_t
        else:
            self.mean = self.mean * ((t - 1) / t) + mean_t / t
            self.covariance = self.covariance * ((t - 1) / t) + cov_t / t
        self.n_tasks.fill_(t)
        self.on_state_loaded()

    def on_state_loaded(self) -> None:
        """Inverse covariance, once per task, via Cholesky in float64 for stability."""
        if self.covariance.numel() == 0:
            return
        chol = torch.linalg.cholesky(self.covariance.double())
        self.precision = torch.cholesky_inverse(chol).float()

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        if self.precision.numel() == 0:
            raise RuntimeError("PaDiM.predict called before any task was learned")
        emb = self.embed(batch).transpose(0, 1)  # (P, B, d)
        diff = emb - self.mean.unsqueeze(1)
        squared = ((diff @ self.precision) * diff).sum(-1).clamp_min(0)  # (P, B)
        distance = squared.sqrt().transpose(0, 1)  # (B, P)
        side = int(round(distance.shape[1] ** 0.5))
        maps = distance.reshape(len(batch), side, -1)
        maps = gaussian_blur(upsample(maps, self.context.image_size), self.params["sigma"])
        maps = finite_or_raise(maps, "PaDiM").float().cpu()
        return Prediction(maps=maps, scores=maps.flatten(1).amax(dim=1))

    # -- analytic memory ----------------------------------------------------------------------
    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """fp32 mean (P, d) + covariance (P, d, d): the state that persists across tasks (seed 003's
        1541 MB for WRN50-2 at 224 px: P = 56*56 = 3136, d = 350). The inverse used for scoring is
        a derived cache of the covariance's size, listed separately."""
        p = cls.resolve_params(params)
        channels, reductions = feature_info(p["backbone"], p["layers"])
        d = p["n_features"] or default_n_features(p["backbone"], sum(channels))
        side = -(-image_size // reductions[0])
        patches = side * side
        return {
            "method_state/mean": patches * d * 4,
            "method_state/covariance": patches * d * d * 4,
            "method_cache/precision": patches * d * d * 4,
        }
