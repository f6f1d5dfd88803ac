"""EfficientAD (Batzner et al., WACV 2024; seed 003 section 1.5, seed 004 section 2.4).

Three networks (``methods.pdn``): a frozen PDN teacher (384 channels), a PDN student with twice
the teacher's output channels (768) and EfficientAD's autoencoder. Per training iteration (batch
B images, B+B under replay, plus B penalty images):

* local loss: squared student-teacher differences on the first 384 student channels, averaged
  over the *hard* elements only: those >= their 99.9th percentile in the batch (``hard_feature_loss``);
* penalty: mean of the student's first 384 channels squared on penalty images (``methods.penalty``:
  a folder such as Imagenette via ``penalty_dir``, else seeded procedural natural-image-like images);
* autoencoder: MSE between the autoencoder and the (normalised) teacher on an augmented image
  (one of brightness / contrast / saturation, factor U(0.8, 1.2)); the student's last 384 channels
  learn the autoencoder's output on the same image (MSE; gradients reach both, as in the paper's
  code). Loss = local + penalty + autoencoder + student-autoencoder.

Scoring: local map = channel mean of (teacher - student[:384])^2, global map = channel mean of
(autoencoder - student[384:])^2, both padded by 4 (the unpadded PDN's map on the padded grid),
upsampled (bilinear) to the input size, each normalised with its quantiles q_a = 0.9 and
q_b = 0.995 as ``0.1 * (map - q_a) / (q_b - q_a)`` (anomalib), then averaged 0.5 / 0.5. Image
score = max of the combined map (seed 003).

Teacher (offline): ``teacher_weights`` (a local file: ``distill_teacher``'s, anomalib's
``pretrained_teacher_{small,medium}.pth`` or the original code's) or, without it, a teacher
distilled at the first step from ``backbone`` (``layers``; the run's ``weights`` setting, so
random-init here) on the first step's training images, ``distill_epochs`` epochs (scaled by the
run's ``epochs_scale`` / ``max_epochs``), cached under ``$CLBENCH_CACHE/teachers`` or
``~/.cache/clbench/teachers`` (``teacher_cache`` overrides). Its provenance (JSON) is the
``teacher_provenance`` buffer (``teacher_info``) and codes in ``fit_info``.

Choices where the papers are vague (continual setting):

* model size: the paper's benchmark (seed 003: teacher 8.0M, student 11.6M, AE 1.1M parameters)
  is EfficientAD-M, the ``medium`` PDN (8.03M / 11.62M / 1.10M at 256 px here); the default is
  ``small`` (EfficientAD-S, 2.69M / 4.27M) because medium is not practical on CPU (student
  FLOPs 3.5x small's at 64 px, 3.1x at 256 px; measured ~2x per iteration at 64 px); pass
  ``model_size=medium`` to match seed 003.
* schedule: EfficientAD trains 70 000 iterations of batch 1 with a 10x lr drop at 95%; seed 003
  trains 70 epochs of batch 1 (+1 replayed) with early stopping. Here an epoch is one pass over the
  step's training stream at batch ``batch_size`` (iterations per epoch = ceil(N_current / B));
  ``num_epochs(70)`` epochs at most; lr 1e-4, weight decay 1e-5 (Adam; fresh per step; the
  student and autoencoder carry over), the lr drops 10x after 95% of the step's iterations.
* early stopping: after every epoch, the loss on the held-out good *training* images (``data.val``;
  per image: hard loss + autoencoder + student-autoencoder losses, no augmentation, no penalty,
  dropout off); patience 7 epochs (10% of 70, as seed 004); the best weights are restored.
  Without held-out images all epochs run.
* teacher channel statistics (mean/std of the teacher's outputs, as EfficientAD) are recomputed at
  every step from one pass over the step's training stream, i.e. what the method may see: the
  current task, plus replayed images under replay, all tasks under joint (``teacher_stats:
  step``); ``cumulative`` keeps running sums over all steps instead.
* map quantiles are recomputed at every step on ``data.val`` (held-out good training images of the
  step's tasks; never test images), or on the training stream if no image is held out
  (``fit_info['quantiles_from_val']`` = 1 or 0). All state (networks, statistics, quantiles,
  teacher provenance) is in parameters and buffers.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from clbench.data import Batch, normalize
from clbench.maps import finite_or_raise, upsample
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData
from methods.pdn import (
    MODEL_SIZES,
    AutoEncoder,
    adam,
    build_pdn,
    count_parameters,
    distill_teacher,
    load_pdn_weights,
    map_padding,
    pdn_output_size,
)
from methods.penalty import LUMA, PenaltySource

MAX_QUANTILE_ELEMENTS = 1 << 24  # torch.quantile's input limit


def sample_elements(values: torch.Tensor, max_elements: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flattened ``values``, or a seeded random subset of ``max_elements`` of them."""
    flat = values.flatten()
    if flat.numel() <= max_elements:
        return flat
    rows = torch.randperm(flat.numel(), generator=generator)[:max_elements].to(flat.device)
    return flat[rows]


def hard_feature_loss(distances: torch.Tensor, quantile: float = 0.999,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean of the squared distances at or above their ``quantile`` (EfficientAD's hard-feature loss).

    ``distances``: (B, C, h, w) squared student-teacher differences. The threshold is the
    quantile (linear interpolation) over all elements of the batch (a seeded subset of 2^24 if
    larger); only elements >= it count, so with 2000 elements and 0.999 the two largest.
    """
    threshold = torch.quantile(sample_elements(distances.detach(), MAX_QUANTILE_ELEMENTS, generator), quantile)
    return distances[distances >= threshold].mean()


def colour_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """EfficientAD's autoencoder augmentation on [0, 1] images (B, 3, H, W): one of brightness,
    contrast or saturation (chosen per batch) with a factor drawn from U(0.8, 1.2)."""
    choice = int(torch.randint(3, (1,), generator=generator))
    factor = float(torch.empty(1).uniform_(0.8, 1.2, generator=generator))
    if choice == 0:
        out = images * factor
    else:
        gray = (images * torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        reference = gray.mean(dim=(1, 2, 3), keepdim=True) if choice == 1 else gray
        out = factor * images + (1.0 - factor) * reference
    return out.clamp(0.0, 1.0)


def normalise_map(maps: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """anomalib's map normalisation: 0.1 * (map - q_a) / (q_b - q_a)."""
    return 0.1 * (maps - q_a) / (q_b - q_a).clamp_min(1e-12)


@METHODS.register("efficientad")
class EfficientAD(AnomalyMethod):
    hyperparameters = {
        "model_size": "small",  # small | medium (seed 003's counts are medium's)
        "out_channels": 384,
        "padding": False,  # PDN convolutions without padding for detection (EfficientAD, anomalib)
        "pad_maps": True,  # pad the maps by 4 before upsampling (anomalib)
        "batch_size": 1,  # seed 003: 1 (+1 replayed)
        "epochs": 70,
        "patience": 7,
        "lr": 1e-4,
        "weight_decay": 1e-5,
        "lr_drop_at": 0.95,  # fraction of the step's iterations after which the lr drops 10x
        "hard_quantile": 0.999,
        "q_a": 0.9,
        "q_b": 0.995,
        "teacher_stats": "step",  # step | cumulative
        "teacher_weights": None,  # local PDN weights file; None: distil (cached)
        "backbone": "wide_resnet50_2",  # distillation source
        "layers": ["layer2", "layer3"],
        "distill_epochs": 20,
        "distill_batch_size": 16,
        "distill_lr": 1e-4,
        "teacher_cache": None,  # None: $CLBENCH_CACHE/teachers or ~/.cache/clbench/teachers
        "penalty_dir": None,  # e.g. imagenette2/train; None: procedural penalty images
        "penalty_images": 200,  # pool size
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        if p["model_size"] not in MODEL_SIZES:
            raise ValueError(f"method_params: model_size '{p['model_size']}' is not one of {', '.join(MODEL_SIZES)}")
        if p["teacher_stats"] not in ("step", "cumulative"):
            raise ValueError(f"method_params: teacher_stats '{p['teacher_stats']}' is not one of step, cumulative")
        if not 0.0 < p["q_a"] < p["q_b"] < 1.0:
            raise ValueError(f"method_params: need 0 < q_a < q_b < 1, got q_a={p['q_a']}, q_b={p['q_b']}")
        channels = int(p["out_channels"])
        self.channels = channels
        size = context.image_size
        self.output_size = pdn_output_size(size, p["padding"])
        self.map_pad = map_padding(size) if p["pad_maps"] and not p["padding"] else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            self.teacher = build_pdn(p["model_size"], channels, p["padding"])
            self.student = build_pdn(p["model_size"], 2 * channels, p["padding"])
            self.autoencoder = AutoEncoder(channels, size, self.output_size)
        self.teacher.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("teacher_provenance", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("teacher_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, channels, 1, 1))
        # running sums for teacher_stats=cumulative: count, per-channel sum and sum of squares
        self.register_buffer("teacher_sums", torch.zeros(2 * channels + 1, dtype=torch.float64))
        # [[q_a, q_b] of the local map, [q_a, q_b] of the global map]; NaN until the first fit
        self.register_buffer("quantiles", torch.full((2, 2), math.nan))
        self.register_buffer("penalty_pool", torch.zeros(0, 3, size, size, dtype=torch.uint8), persistent=False)
        self._penalty: PenaltySource | None = None

    # -- teacher ---------------------------------------------------------------------------------
    @property
    def teacher_info(self) -> dict[str, Any]:
        """The teacher's provenance (where its weights come from), {} before the first step."""
        raw = bytes(self.teacher_provenance.cpu().tolist())
        return json.loads(raw.decode()) if raw else {}

    def _set_provenance(self, provenance: Mapping[str, Any]) -> None:
        raw = json.dumps(dict(provenance), sort_keys=True, default=str).encode()
        self.teacher_provenance = torch.tensor(list(raw), dtype=torch.uint8, device=self.teacher_mean.device)

    def _prepare_teacher(self, data: TaskData) -> dict[str, float]:
        p = self.params
        start = time.perf_counter()
        if p["teacher_weights"]:
            path = Path(p["teacher_weights"]).expanduser().resolve()
            stored = load_pdn_weights(self.teacher, path)
            provenance = {"source": "file", "file": str(path), **({"distillation": stored} if stored else {})}
            info = {"teacher_source": 0.0,
                    "teacher_pretrained_backbone": float(stored["pretrained"]) if "pretrained" in stored else math.nan,
                    "teacher_distill_images": float(stored.get("num_images", math.nan))}
        else:
            pixels = self._stream_pixels(data.train)
            result = distill_teacher(
                p["backbone"], pixels, None, cache_dir=p["teacher_cache"], model_size=p["model_size"],
                out_channels=self.channels, layers=tuple(p["layers"]), weights=self.context.backbones.weights,
                epochs=self.num_epochs(p["distill_epochs"]), batch_size=p["distill_batch_size"], lr=p["distill_lr"],
                seed=self.context.seed, device=self.context.device, progress=self.context.progress,
            )
            self.teacher.load_state_dict(result.model.state_dict())
            provenance = {"source": "cache" if result.reused else "distilled", "file": str(result.path),
                          "distillation": result.provenance}
            info = {"teacher_source": 2.0 if result.reused else 1.0,
                    "teacher_pretrained_backbone": float(result.provenance["pretrained"]),
                    "teacher_distill_images": float(result.provenance["num_images"]),
                    "teacher_distill_epochs": float(result.provenance["epochs"]),
                    "teacher_distill_loss": float(result.provenance.get("final_loss", math.nan))}
        self._set_provenance(provenance)
        self.teacher_ready.fill_(True)
        info["seconds_teacher"] = time.perf_counter() - start
        return info

    @torch.no_grad()
    def _stream_pixels(self, stream) -> torch.Tensor:
        """Distinct images of a training stream, uint8 (N, 3, S, S), in first-seen order."""
        seen: dict[str, torch.Tensor] = {}
        for batch in stream.batches(16):
            for key, pixels in zip(batch.keys, batch.pixels):
                seen.setdefault(key, pixels)
        return torch.stack(list(seen.values()))

    @torch.no_grad()
    def _update_teacher_stats(self, stream) -> int:
        """Channel mean/std of the teacher's outputs over one pass of the stream; returns images used."""
        sums = torch.zeros_like(self.teacher_sums)
        images = 0
        c = self.channels
        for batch in stream.batches(16):
            y = self.teacher(batch.normalized(self.context.device)).double()
            sums[0] += y[:, 0].numel()
            sums[1:c + 1] += y.sum(dim=(0, 2, 3))
            sums[c + 1:] += (y**2).sum(dim=(0, 2, 3))
            images += len(batch)
        if self.params["teacher_stats"] == "cumulative":
            self.teacher_sums += sums
        else:
            self.teacher_sums.copy_(sums)
        n = self.teacher_sums[0].clamp_min(1)
        mean = self.teacher_sums[1:c + 1] / n
        std = (self.teacher_sums[c + 1:] / n - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
        self.teacher_mean.copy_(mean.float().view(1, c, 1, 1))
        self.teacher_std.copy_(std.float().view(1, c, 1, 1))
        return images

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.teacher(x) - self.teacher_mean) / self.teacher_std

    def _penalty_source(self) -> PenaltySource:
        if self._penalty is None:
            p = self.params
            self._penalty = PenaltySource(self.context.image_size, p["penalty_dir"], p["penalty_images"], self.context.seed)
            self.penalty_pool = self._penalty.pool.to(self.teacher_mean.device)
            self._penalty.pool = self.penalty_pool
        return self._penalty

    # -- losses ----------------------------------------------------------------------------------
    def training_losses(self, pixels: torch.Tensor, penalty: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The four losses of one iteration: uint8 images (B, 3, S, S), normalised penalty images."""
        device = self.context.device
        pixels = pixels.to(device)
        x = normalize(pixels)
        x_aug = normalize(colour_jitter(pixels.float() / 255.0, generator) * 255.0)
        n, m, c = len(x), len(penalty), self.channels
        teacher = self._teacher(torch.cat([x, x_aug]))
        student = self.student(torch.cat([x, penalty.to(device), x_aug]))
        ae = self.autoencoder(x_aug)
        return {
            "st": hard_feature_loss((teacher[:n] - student[:n, :c]) ** 2, self.params["hard_quantile"], generator),
            "penalty": student[n:n + m, :c].pow(2).mean(),
            "ae": (teacher[n:] - ae).pow(2).mean(),
            "stae": (ae - student[n + m:, c:]).pow(2).mean(),
        }

    @torch.no_grad()
    def _validation_loss(self, data: TaskData) -> float:
        self.student.eval()
        self.autoencoder.eval()
        total, count = 0.0, 0
        c, q = self.channels, self.params["hard_quantile"]
        for batch in data.val.batches(16):
            x = batch.normalized(self.context.device)
            teacher = self._teacher(x)
            student = self.student(x)
            ae = self.autoencoder(x)
            for i in range(len(batch)):
                total += float(hard_feature_loss((teacher[i:i + 1] - student[i:i + 1, :c]) ** 2, q))
                total += float((teacher[i] - ae[i]).pow(2).mean() + (ae[i] - student[i, c:]).pow(2).mean())
            count += len(batch)
        return total / count

    # -- maps ------------------------------------------------------------------------------------
    def raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local and global maps at input size, before quantile normalisation: 2 x (B, S, S)."""
        c = self.channels
        teacher = self._teacher(x)
        student = self.student(x)
        ae = self.autoencoder(x)
        maps = torch.stack([(teacher - student[:, :c]).pow(2).mean(dim=1), (ae - student[:, c:]).pow(2).mean(dim=1)], 1)
        if self.map_pad:
            maps = F.pad(maps, (self.map_pad,) * 4)
        b = maps.shape[0]
        maps = upsample(maps.flatten(0, 1), self.context.image_size).view(b, 2, self.context.image_size, self.context.image_size)
        return maps[:, 0], maps[:, 1]

    @torch.no_grad()
    def _compute_quantiles(self, stream, seed: int) -> int:
        self.student.eval()
        self.autoencoder.eval()
        local, global_ = [], []
        images = 0
        for batch in stream.batches(16):
            st, ae = self.raw_maps(batch.normalized(self.context.device))
            local.append(st.float().cpu())
            global_.append(ae.float().cpu())
            images += len(batch)
        generator = torch.Generator().manual_seed(seed)
        q = torch.tensor([self.params["q_a"], self.params["q_b"]])
        for row, maps in enumerate((local, global_)):
            values = sample_elements(torch.cat(maps), MAX_QUANTILE_ELEMENTS, generator)
            self.quantiles[row] = torch.quantile(values, q).to(self.quantiles.device)
        return images

    # -- the interface -----------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        p = self.params
        start = time.perf_counter()
        info: dict[str, float] = {}
        if not bool(self.teacher_ready):
            info.update(self._prepare_teacher(data))
        self.teacher.eval()
        penalty = self._penalty_source()
        info["penalty_procedural"] = float(penalty.kind == "procedural")
        info["penalty_images"] = float(len(penalty))
        info["teacher_stats_images"] = float(self._update_teacher_stats(data.train))

        trainable = list(self.student.parameters()) + list(self.autoencoder.parameters())
        optimiser = adam(trainable, p["lr"], p["weight_decay"])
        epochs = self.num_epochs(p["epochs"])
        per_epoch = math.ceil(len(data.train) / p["batch_size"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=max(1, int(p["lr_drop_at"] * epochs * per_epoch)), gamma=0.1)
        generator = torch.Generator().manual_seed(data.seed)
        best_loss, best_state, best_epoch, stale = math.inf, None, -1, 0
        first_loss = last_loss = math.nan
        parts_last: dict[str, float] = {}
        epoch, iterations = -1, 0
        train_start = time.perf_counter()
        for epoch in range(epochs):
            self.student.train()
            self.autoencoder.train()
            total, count = 0.0, 0
            parts = {"st": 0.0, "penalty": 0.0, "ae": 0.0, "stae": 0.0}
            for batch in data.train.batches(p["batch_size"], shuffle=True, seed=data.seed * 1000 + epoch):
                losses = self.training_losses(batch.pixels, penalty.sample(p["batch_size"], generator, self.context.device), generator)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
                    raise FloatingPointError(
                        f"EfficientAD: non-finite training loss at epoch {epoch} of {data.task_names} ({values})"
                    )
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
                iterations += 1
                total += loss.item()
                count += 1
                for key, value in losses.items():
                    parts[key] += value.item()
            last_loss = total / max(count, 1)
            parts_last = {k: v / max(count, 1) for k, v in parts.items()}
            first_loss = last_loss if epoch == 0 else first_loss
            if len(data.val) == 0:
                continue
            val_loss = self._validation_loss(data)
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"EfficientAD: non-finite validation loss at epoch {epoch} of {data.task_names}")
            if val_loss < best_loss:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = (copy.deepcopy(self.student.state_dict()), copy.deepcopy(self.autoencoder.state_dict()))
            else:
                stale += 1
                if stale >= p["patience"]:
                    break
        if best_state is not None:
            self.student.load_state_dict(best_state[0])
            self.autoencoder.load_state_dict(best_state[1])
        self.student.eval()
        self.autoencoder.eval()
        train_seconds = time.perf_counter() - train_start

        from_val = len(data.val) > 0
        quantile_images = self._compute_quantiles(data.val if from_val else data.train, data.seed)
        (qa_st, qb_st), (qa_ae, qb_ae) = self.quantiles.tolist()
        info.update({
            "epochs_run": epoch + 1, "epochs_max": epochs, "iterations": iterations, "iterations_per_epoch": per_epoch,
            "best_epoch": best_epoch, "train_loss_first": first_loss, "train_loss_last": last_loss,
            "val_loss_best": best_loss, **{f"loss_{k}_last": v for k, v in parts_last.items()},
            "quantiles_from_val": float(from_val), "quantile_images": float(quantile_images),
            "q_a_local": qa_st, "q_b_local": qb_st, "q_a_global": qa_ae, "q_b_global": qb_ae,
            "seconds_train": train_seconds, "seconds_fit": time.perf_counter() - start,
        })
        self.fit_info = info

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        self.student.eval()
        self.autoencoder.eval()
        local, global_ = self.raw_maps(batch.normalized(self.context.device))
        if not torch.isnan(self.quantiles).any():
            local = normalise_map(local, self.quantiles[0, 0], self.quantiles[0, 1])
            global_ = normalise_map(global_, self.quantiles[1, 0], self.quantiles[1, 1])
        maps = finite_or_raise(0.5 * local + 0.5 * global_, "EfficientAD").float().cpu()
        return Prediction(maps=maps, scores=maps.flatten(1).amax(dim=1))

    def on_state_loaded(self) -> None:
        self.teacher.eval()

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """fp32 networks (teacher frozen; student and autoencoder trained), the teacher statistics and
        quantiles (the method's own state), and the uint8 penalty-image pool (a derived cache)."""
        p = cls.resolve_params(params)
        c = int(p["out_channels"])
        teacher = count_parameters(build_pdn(p["model_size"], c, p["padding"]))
        student = count_parameters(build_pdn(p["model_size"], 2 * c, p["padding"]))
        ae = count_parameters(AutoEncoder(c, image_size, pdn_output_size(image_size, p["padding"])))
        return {
            "model_frozen/teacher": teacher * 4,
            "model_trainable/student": student * 4,
            "model_trainable/autoencoder": ae * 4,
            "method_state/teacher_stats": 2 * c * 4 + (2 * c + 1) * 8,
            "method_state/quantiles": 4 * 4,
            "method_cache/penalty_pool": int(p["penalty_images"]) * 3 * image_size * image_size,
        }
