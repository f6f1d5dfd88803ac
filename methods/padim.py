"""PaDiM, continual: one Gaussian per patch position, updated task after task (seed 003, Algorithm 1).

Embedding: frozen backbone layers (ResNet: layer1-3) upsampled (nearest) to the first layer's grid
and concatenated; a seeded random subset of ``n_features`` channels (PaDiM's random dimensionality
reduction; kept sorted, so the order differs from anomalib's ``idx`` but the channels are the
same). Per step, the patch-wise mean and centred scatter matrix of the step's training images are
accumulated in one streaming pass (Chan et al.'s pairwise merge, stable in float32); the
covariance is unbiased, ``scatter / (N - 1) + epsilon * I`` (PaDiM eq. 1, epsilon 0.01 as PaDiM).

Continual update (``average``), after step t (1-based), weights (t-1)/t and 1/t:

* ``covariance`` (default): mean and covariance averaged, as seed 003's Algorithm 1 writes it;
  the averaged statistic stays a covariance (of the tasks' within-task spread). The spec is the
  reference, hence the default. State: mean + covariance; the inverse is a derived cache.
* ``precision``: what the benchmark paper's code does (clad ``src/trainer/trainer_padim.py``):
  mean averaged the same way, and the *inverse* ``(Sigma_t + epsilon I)^-1`` (epsilon added per
  task before inverting) averaged instead of the covariance. **Use it to compare with the paper's
  table** (with ``epsilon=0.04`` and ``image_score="patch"``, the code's values). State: mean +
  precision (no covariance is kept at all).
* ``pooled``: the exact mean and covariance of the union of all images seen so far (N-weighted,
  between-task scatter included): after T steps it equals a joint fit on the same images. State:
  mean + unnormalised scatter + image count (enough to merge exactly and to resume); epsilon is
  added once to the pooled covariance. Under replay a replayed image counts each time it is seen.

Score: Mahalanobis distance per patch (PaDiM eq. 2), upsampled (bilinear) to the input size and
Gaussian-smoothed (sigma 4), as anomalib 2.7.0 (``models/image/padim/anomaly_map.py``). Image score
(``image_score``): ``map`` (default) the maximum of that smoothed map (anomalib, and the widely
used unofficial PaDiM code); ``patch`` the maximum of the raw patch distances before upsampling (seed 003 1.1.3 read
literally, and clad's ``torch.max(s_map)``).

Checked against anomalib 2.7.0's ``PadimModel`` (tests/test_parity_padim.py): equal to float
tolerance once ``epsilon = 0.01 + 1e-5``, since anomalib adds a further 1e-5 * I "stabiliser" to
its 0.01 (``components/stats/multi_variate_gaussian.py``); we keep PaDiM's plain 0.01.
Inverses: float64 Cholesky per position (anomalib: float32 ``linalg.inv``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from clbench.features.backbones import feature_info
from clbench.data import Batch
from clbench.features.maps import finite_or_raise, gaussian_blur, upsample
from clbench.params import BACKBONE, LAYERS, NON_NEGATIVE, POSITIVE_INT, Options, Param
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData

# Channels kept after random reduction: PaDiM's 100 for ResNet18, seed 003's 350 for WRN50-2.
DEFAULT_FEATURES = {"resnet18": 100, "wide_resnet50_2": 350}
FALLBACK_FEATURES = 100
AVERAGES = ("covariance", "precision", "pooled")
IMAGE_SCORES = ("map", "patch")
INVERSE_CHUNK = 256  # patch positions inverted at once (bounds the float64 temporaries)


def default_n_features(backbone: str, total: int) -> int:
    return min(total, DEFAULT_FEATURES.get(backbone.split(".")[0], FALLBACK_FEATURES))


def split_channels(index: torch.Tensor, channels: list[int]) -> list[list[int]]:
    """Per-layer local indices of a sorted index into the layers' concatenated channels."""
    out, offset, values = [], 0, index.tolist()
    for count in channels:
        out.append([i - offset for i in values if offset <= i < offset + count])
        offset += count
    return out


def regularise_(scatter: torch.Tensor, count: int, epsilon: float) -> torch.Tensor:
    """Unbiased covariance ``scatter / (count - 1) + epsilon * I`` (PaDiM eq. 1), (P, d, d), computed
    in the scatter's own storage (no 1.5 GB copy for WRN50-2)."""
    scatter.div_(max(count - 1, 1))
    scatter.diagonal(dim1=-2, dim2=-1).add_(epsilon)
    return scatter


def spd_inverse(
    matrices: torch.Tensor, out: torch.Tensor | None = None, count: int | None = None, epsilon: float = 0.0
) -> torch.Tensor:
    """Inverse of symmetric positive-definite (P, d, d) matrices: float64 Cholesky, float32 result.

    Chunked, so the float64 temporaries are ``INVERSE_CHUNK`` matrices, and written into ``out`` when
    given (which may be ``matrices`` itself: each chunk is read before it is overwritten), so the
    caller's peak is its own tensors. With ``count``, the matrices are scatters and the inverse is
    that of ``regularise_(matrices, count, epsilon)``, formed chunk by chunk.
    """
    if out is None:
        out = torch.empty_like(matrices, dtype=torch.float32)
    for begin in range(0, matrices.shape[0], INVERSE_CHUNK):
        chunk = matrices[begin : begin + INVERSE_CHUNK].double()
        if count is not None:
            regularise_(chunk, count, epsilon)
        out[begin : begin + INVERSE_CHUNK] = torch.cholesky_inverse(torch.linalg.cholesky(chunk)).float()
    return out


def merge_moments(
    count_a: int, mean_a: torch.Tensor, scatter_a: torch.Tensor, count_b: int, mean_b: torch.Tensor, scatter_b: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean (P, d) and centred scatter (P, d, d) of the union of two samples (Chan et al.).

    ``scatter_a`` is updated in place and returned: no (P, d, d) temporary (1.5 GB for WRN50-2).
    """
    scatter_a.add_(scatter_b)
    total, mean = merge_mean_into(count_a, mean_a, scatter_a, count_b, mean_b)
    return total, mean, scatter_a


def merge_mean_into(
    count_a: int, mean_a: torch.Tensor, scatter: torch.Tensor, count_b: int, mean_b: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """The between-sample part of Chan's merge: ``scatter`` already holds both samples' own centred
    scatters and gains ``delta delta^T * n_a n_b / n`` in place; returns the union's count and mean."""
    total = count_a + count_b
    delta = mean_b - mean_a
    scatter.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=count_a * count_b / total)
    return total, mean_a + delta * (count_b / total)


@METHODS.register("padim")
class PaDiM(AnomalyMethod):
    hyperparameters = {
        "backbone": Param("resnet18", BACKBONE),
        "layers": Param(["layer1", "layer2", "layer3"], LAYERS),
        "n_features": Param(None, [None, POSITIVE_INT]),  # None: 100 for resnet18, 350 for wide_resnet50_2 (seed 003)
        "epsilon": Param(0.01, NON_NEGATIVE),  # PaDiM's; clad uses 0.04, anomalib 0.01 + 1e-5
        # continual update: covariance (seed 003) | precision (clad) | pooled
        "average": Param("covariance", Options(*AVERAGES)),
        # map: max of the smoothed map (anomalib) | patch: max patch distance (clad)
        "image_score": Param("map", Options(*IMAGE_SCORES)),
        "sigma": Param(4.0, NON_NEGATIVE),  # 0: no smoothing
        "batch_size": Param(32, POSITIVE_INT),
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        channels, _ = feature_info(p["backbone"], p["layers"])  # the architecture's, before any weights
        total = sum(channels)
        n_features = p["n_features"] or default_n_features(p["backbone"], total)
        if n_features > total:
            raise ValueError(f"method_params: n_features={n_features} is not an integer in [1, {total}] "
                             f"(the channels of {p['backbone']}'s layers)")
        generator = torch.Generator().manual_seed(context.seed)
        index = torch.randperm(total, generator=generator)[:n_features].sort().values
        # the backbone caches only the selected channels (350 of WRN50-2's 1792): same numbers, sliced earlier
        self.backbone = context.backbones.get(p["backbone"], p["layers"], channels=split_channels(index, channels))
        self.register_buffer("channel_index", index)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("n_tasks", torch.zeros((), dtype=torch.long))
        mode = p["average"]
        if mode == "covariance":
            self.register_buffer("covariance", torch.empty(0))
        elif mode == "pooled":
            self.register_buffer("scatter", torch.empty(0))
            self.register_buffer("n_images", torch.zeros((), dtype=torch.long))
        # the inverse covariance: the state itself in precision mode, a derived cache otherwise
        self.register_buffer("precision", torch.empty(0), persistent=mode == "precision")

    def frozen_backbones(self):
        return [self.backbone]

    # -- embedding -----------------------------------------------------------------------------
    def embed(self, batch: Batch) -> torch.Tensor:
        """(B, P, d) patch embeddings: selected channels of layers upsampled to the first grid (the
        backbone returns only the selected channels; a layer with none of them still gives the grid)."""
        features = self.backbone.features(batch)
        grid = features[0].shape[-2:]
        parts = []
        for level in features:
            if level.shape[1] == 0:
                continue
            if level.shape[-2:] != grid:
                level = F.interpolate(level, size=grid, mode="nearest")
            parts.append(level)
        emb = torch.cat(parts, dim=1)
        return emb.flatten(2).transpose(1, 2).contiguous()  # (B, P, d)

    # -- learning ------------------------------------------------------------------------------
    @torch.no_grad()
    def task_moments(self, data: TaskData) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Image count, patch-wise mean (P, d) and centred scatter (P, d, d) of one step's images."""
        count = 0
        mean = scatter = None
        for batch in data.train.batches(self.params["batch_size"]):
            emb = self.embed(batch).transpose(0, 1)  # (P, B, d)
            mean_b = emb.mean(dim=1)
            centred = emb - mean_b.unsqueeze(1)
            if mean is None:
                count, mean, scatter = emb.shape[1], mean_b, centred.transpose(1, 2) @ centred  # (P, d, d)
            else:  # Chan's merge written into the running scatter: no (P, d, d) per batch
                scatter.baddbmm_(centred.transpose(1, 2), centred)
                count, mean = merge_mean_into(count, mean, scatter, emb.shape[1], mean_b)
        if mean is None:
            raise ValueError(f"PaDiM: no training images for tasks {data.task_names}")
        return count, mean, scatter

    def task_statistics(self, data: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch-wise mean (P, d) and regularised covariance (P, d, d) of one step's images."""
        count, mean, scatter = self.task_moments(data)
        return mean, regularise_(scatter, count, self.params["epsilon"])

    @torch.no_grad()
    def fit_task(self, data: TaskData) -> None:
        """One step's update. Memory: the state plus one (P, d, d) matrix, the step's scatter, which
        becomes its covariance in place; Chan's merge and the inverse also work in place (1.00 matrix
        above the state measured by tests/test_padim.py; before, 3.0: 10.2 GB peak RSS for WRN50-2)."""
        count, mean_t, scatter_t = self.task_moments(data)
        t = int(self.n_tasks.item()) + 1
        mode, epsilon = self.params["average"], self.params["epsilon"]

        def average(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return new if t == 1 else old.mul_((t - 1) / t).add_(new, alpha=1 / t)

        if mode == "pooled":
            if t == 1:
                total, mean, scatter = count, mean_t, scatter_t
            else:
                total, mean, scatter = merge_moments(int(self.n_images), self.mean, self.scatter, count, mean_t, scatter_t)
            self.mean, self.scatter = mean, scatter
            self.n_images.fill_(total)
        else:
            self.mean = average(self.mean, mean_t)
            covariance_t = regularise_(scatter_t, count, epsilon)  # the scatter's storage, no copy
            del scatter_t
            if mode == "covariance":
                self.covariance = average(self.covariance, covariance_t)
            else:  # precision: average the per-task inverses (clad); inverted in the covariance's storage
                self.precision = average(self.precision, spd_inverse(covariance_t, out=covariance_t))
            del covariance_t  # the step's (P, d, d) is gone before the inverse is rebuilt: peak = state + one
        self.n_tasks.fill_(t)
        self.on_state_loaded()

    def on_state_loaded(self) -> None:
        """Rebuild the inverse covariance used for scoring (nothing to do in precision mode)."""
        channels, _ = feature_info(self.params["backbone"], self.params["layers"])
        if split_channels(self.channel_index, channels) != [list(c) for c in self.backbone.selection]:
            raise ValueError("PaDiM: the state's channel_index is not the channel selection of this seed's backbone")
        mode = self.params["average"]
        # the inverse is rewritten in its own storage when it has the shape already (every step after
        # the first): no second (P, d, d) beside the state
        source = self.covariance if mode == "covariance" else self.scatter if mode == "pooled" else None
        if source is None or not source.numel():
            return
        out = self.precision if self.precision.shape == source.shape else None
        if mode == "covariance":
            self.precision = spd_inverse(source, out=out)
        else:
            self.precision = spd_inverse(source, out=out, count=int(self.n_images), epsilon=self.params["epsilon"])

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
        if self.params["image_score"] == "patch":
            scores = distance.amax(dim=1).float().cpu()
        else:
            scores = maps.flatten(1).amax(dim=1)
        return Prediction(maps=maps, scores=scores)

    # -- analytic memory ----------------------------------------------------------------------
    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """fp32 mean (P, d) + one (P, d, d) matrix per position that persists across tasks: the
        covariance (``covariance``; seed 003's 1541 MB for WRN50-2 at 224 px: P = 56*56 = 3136,
        d = 350), the precision (``precision``) or the scatter (``pooled``). Where the persistent
        matrix is not the precision, the inverse used for scoring is a derived cache of that size,
        listed separately. Scalar counters and the channel index are left out."""
        p = cls.resolve_params(params)
        channels, reductions = feature_info(p["backbone"], p["layers"])
        d = p["n_features"] or default_n_features(p["backbone"], sum(channels))
        side = -(-image_size // reductions[0])
        patches = side * side
        matrix = patches * d * d * 4
        memory = {"method_state/mean": patches * d * 4}
        if p["average"] == "precision":
            memory["method_state/precision"] = matrix
        else:
            memory[f"method_state/{'covariance' if p['average'] == 'covariance' else 'scatter'}"] = matrix
            memory["method_cache/precision"] = matrix
        return memory
