"""EfficientAD (Batzner et al., WACV 2024; seed 003 section 1.5, seed 004 section 2.4).

Three networks (``methods.efficientad.networks``): a frozen PDN teacher (384 channels), a PDN
student with twice the teacher's output channels (768) and EfficientAD's autoencoder. Per training
iteration (batch B images, B+B under replay, plus B penalty images):

* local loss: squared student-teacher differences on the first 384 student channels, averaged
  over the *hard* elements only: those >= their 99.9th percentile in the batch (``hard_feature_loss``);
* penalty: mean of the student's first 384 channels squared on penalty images
  (``methods.efficientad.penalty``: a folder such as Imagenette via ``penalty_dir``, else seeded
  procedural natural-image-like images);
* autoencoder: MSE between the autoencoder and the (normalised) teacher on an augmented image
  (one of brightness / contrast / saturation per batch, factor U(0.8, 1.2), torchvision's
  ``adjust_*`` as anomalib); the student's last 384 channels learn the autoencoder's output on the
  same image (MSE; gradients reach both, as in the paper's code and anomalib). Loss = local +
  penalty + autoencoder + student-autoencoder (anomalib's loss_st = local + penalty).

Scoring: local map = channel mean of (teacher - student[:384])^2, global map = channel mean of
(autoencoder - student[384:])^2, both padded by 4 (the unpadded PDN's map on the padded grid),
upsampled (bilinear) to the input size, each normalised with its quantiles q_a = 0.9 and
q_b = 0.995 as ``0.1 * (map - q_a) / (q_b - q_a)``, then averaged 0.5 / 0.5. Image score = max of
the combined map (seed 003). Maps, image scores and one training step's four losses equal
anomalib 2.7.0's ``EfficientAdModel`` given the same weights, teacher statistics and quantiles
(max relative difference <= 1e-4, ``tests/test_parity_efficientad.py``).

Teacher. EfficientAD's teacher is a PDN distilled on ImageNet from a pretrained WideResNet-101; it
never sees the target data. Three paths:

* ``teacher_weights=PATH`` (the intended one): a file made with ``clbench distill-teacher
  --backbone wide_resnet50_2 --weights imagenet --images DIR --out PATH`` (ImageNet or
  Imagenette), anomalib's ``pretrained_teacher_{small,medium}.pth`` or the original code's
  ``teacher_{small,medium}.pth`` (what the paper's code loads). Loaded at construction with
  ``weights_only=True``; its provenance (inside the file or ``PATH.json``) is kept; without one the
  backbone's pretraining is recorded as "unknown".
* no ``teacher_weights``: a *stand-in* teacher is distilled at the first step from ``backbone``
  (``layers``; the run's ``weights`` setting, so random-init without local weights) on a generic
  image set that is not the task data: the penalty images (``penalty_dir`` if given, else the
  procedural images of ``methods.efficientad.penalty``; ``standin_images`` of them, seeded by the
  run seed), as the paper draws its penalty images from the teacher's pretraining set.
  ``distill_epochs`` epochs (scaled by ``epochs_scale`` / ``max_epochs``), cached under
  ``$CLBENCH_CACHE/teachers`` or ``~/.cache/clbench/teachers`` (``teacher_cache``). One warning +
  log line at construction names ``--param teacher_weights=PATH``. (Before: distilled on the first
  task's training images, which leaked task 0 into the teacher.)
* ``MethodContext.require_pretrained`` (paper profile): no ``teacher_weights``, or a file whose
  provenance says its backbone was random-init, is a one-line ``ValueError`` at construction.

The provenance (JSON: ``kind`` file | stand-in, ``source`` file | distilled | cache,
``source_images``, ``backbone``, ``pretrained``) is the ``teacher_provenance`` buffer
(``teacher_info``); every step's ``fit_info`` has ``teacher_source`` (0 file, 1 stand-in
distilled, 2 stand-in from the cache), ``teacher_standin`` (1.0 / 0.0) and
``teacher_pretrained_backbone`` (1 / 0 / NaN unknown).

Choices where the papers are vague (continual setting), and differences from anomalib 2.7.0
(``anomalib/models/image/efficient_ad/{torch_model,lightning_model}.py``) and the benchmark
paper's code (clad: ``src/models/efficientad.py``, ``src/trainer/trainer_efficientad.py``,
``src/strategy_ad.py``, ``configurations/train_efficientad.json``):

* model size: seed 003's counts (teacher 8.0M, student 11.6M, AE 1.1M) are EfficientAD-M, the
  ``medium`` PDN (clad: ``model_size: medium``); the default is ``small`` (EfficientAD-S, 2.69M /
  4.27M; anomalib's default) because medium is not practical on CPU (student FLOPs 3.5x small's
  at 64 px, 3.1x at 256 px); ``model_size=medium`` matches seed 003 (the paper profile sets it).
* schedule: EfficientAD trains 70 000 iterations of batch 1 with a 10x lr drop at 95%; seed 003
  trains 70 epochs of batch 1 (+1 replayed) with early stopping (clad's config: 50 epochs). Here an
  epoch is one pass over the step's training stream at batch ``batch_size`` (iterations per epoch
  = ceil(N / B)); ``num_epochs(70)`` epochs at most; Adam lr 1e-4, weight decay 1e-5; the lr drops
  10x after 95% of the step's maximum iterations, stepped per iteration as the paper's code
  (``lr_drop_at=1`` disables it, as clad whose scheduler is commented out; anomalib steps its
  StepLR(int(0.95 * steps)) once per *epoch*, Lightning's default interval, so in practice never).
  ``optimizer_state``: ``reset`` (default) a fresh Adam per step, ``keep`` one Adam for the whole
  stream (clad builds it once in ``Trainer_efficientad.__init__``); the StepLR is per step either
  way. The student and autoencoder carry over between steps.
* early stopping: after every epoch, the loss on the held-out good *training* images (``data.val``;
  per image: hard loss + autoencoder + student-autoencoder losses, no augmentation, no penalty,
  dropout off); patience 7 epochs (10% of 70, as seed 004; clad: 7); the best weights are restored.
  Without held-out images all epochs run. (clad stops on 1 - pixel F1 of the current task's *test*
  set; anomalib and the EfficientAD paper do not stop early.)
* teacher channel statistics (mean/std of the teacher's outputs, as EfficientAD) are recomputed at
  every step from one pass over the step's training stream, i.e. what the method may see: the
  current task, plus replayed images under replay, all tasks under joint (``teacher_stats:
  step``; clad recomputes them per task from the current task's loader, without replayed images;
  anomalib once, before training); ``cumulative`` keeps running sums over all steps instead.
  Accumulated in float64 (anomalib: float32); population std.
* map quantiles are recomputed at the end of every step on ``data.val``: the held-out good
  *training* images of the step's tasks (sequential: the current task's; replay: the current
  task's, as the buffer holds no held-out images; joint: all tasks'), never test images; on the
  training stream if no image is held out (``fit_info['quantiles_from_val']`` = 1 or 0).
  anomalib computes them on its validation set's good images, which for MVTec AD is by default the
  test set (``ValSplitMode.SAME_AS_TEST``); clad computes them on the *test* loader itself (good
  and anomalous test images) of every evaluated task, then min-max scales the maps over that test
  set. Quantiles: ``torch.quantile`` (linear), on a seeded subset of 2^24 elements if larger
  (anomalib: an unseeded one).
* hard-feature loss above 2^24 elements (batches of > 14 images at 256 px): the threshold comes
  from a seeded 2^24 subset and the mean is over all elements above it (anomalib: the mean over
  the subset's); identical below.
* ``pad_maps`` pads only the maps of unpadded PDNs (anomalib pads whenever ``pad_maps``, also with
  ``padding=True``, although its docstring says the option only matters without padding).
* penalty images per iteration: ``batch_size`` (1 by default, as anomalib and clad); their
  grayscale (p 0.3) uses PIL's weights, as the PIL transforms of anomalib and clad.

All state (networks, statistics, quantiles, teacher provenance) is in parameters and buffers.
"""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from clbench.data import IMAGENET_MEAN, IMAGENET_STD, Batch, normalize
from clbench.features.maps import finite_or_raise, upsample
from clbench.params import (
    BACKBONE, FRACTION, LAYERS, NON_NEGATIVE, PATH, POSITIVE_INT, Interval, Options, Param, Rule,
)
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData
from methods.efficientad.distill import add_distill_parser, distill_teacher, provenance_path
from methods.efficientad.networks import (
    MODEL_SIZES,
    AutoEncoder,
    adam,
    build_pdn,
    count_parameters,
    load_pdn_weights,
    map_padding,
    pdn_output_size,
)
from methods.efficientad.penalty import PenaltySource
from methods.training import train_task

log = logging.getLogger("clbench.efficientad")

MAX_QUANTILE_ELEMENTS = 1 << 24  # torch.quantile's input limit
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale, used by anomalib's augmentation
TEACHER_SOURCES = {"file": 0.0, "distilled": 1.0, "cache": 2.0}
DISTILL_COMMAND = "clbench distill-teacher --backbone wide_resnet50_2 --weights imagenet --images DIR --out PATH"


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


def draw_jitter(generator: torch.Generator) -> tuple[int, float]:
    """EfficientAD's autoencoder augmentation choice: 0 brightness, 1 contrast, 2 saturation, and a
    factor from U(0.8, 1.2) (one draw per batch, as anomalib)."""
    choice = int(torch.randint(3, (1,), generator=generator))
    factor = float(torch.empty(1).uniform_(0.8, 1.2, generator=generator))
    return choice, factor


def apply_jitter(images: torch.Tensor, choice: int, factor: float) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` / ``adjust_contrast`` / ``adjust_saturation`` on [0, 1]
    images (B, 3, H, W): ``clamp(factor * image + (1 - factor) * reference, 0, 1)`` with reference
    0, the per-image mean of the grayscale image, or the grayscale image."""
    if choice == 0:
        reference = torch.zeros_like(images)
    else:
        r, g, b = images.unbind(dim=-3)
        gray = (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)
        reference = gray.mean(dim=(-3, -2, -1), keepdim=True) if choice == 1 else gray
    return (factor * images + (1.0 - factor) * reference).clamp(0.0, 1.0)


def colour_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random EfficientAD augmentation of [0, 1] images (B, 3, H, W)."""
    return apply_jitter(images, *draw_jitter(generator))


def normalize_unit(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of [0, 1] images."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def normalise_map(maps: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """anomalib's map normalisation: 0.1 * (map - q_a) / (q_b - q_a)."""
    return 0.1 * (maps - q_a) / (q_b - q_a).clamp_min(1e-12)


def read_provenance(path: Path, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A teacher file's provenance: the one inside it, else ``<path>.json`` beside it, else {}."""
    if stored:
        return dict(stored)
    sidecar = provenance_path(path)
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}
    return {}


OPEN_FRACTION = Interval(float, 0, 1, closed="neither")  # a map quantile


@METHODS.register("efficientad")
class EfficientAD(AnomalyMethod):
    hyperparameters = {
        "model_size": Param("small", Options(*MODEL_SIZES)),  # small | medium (seed 003's counts are medium's)
        "out_channels": Param(384, POSITIVE_INT),
        "padding": Param(False, bool),  # PDN convolutions without padding for detection (EfficientAD, anomalib)
        "pad_maps": Param(True, bool),  # pad the maps by 4 before upsampling (anomalib)
        "batch_size": Param(1, POSITIVE_INT),  # seed 003: 1 (+1 replayed)
        "epochs": Param(70, POSITIVE_INT),
        "patience": Param(7, POSITIVE_INT),
        "lr": Param(1e-4, NON_NEGATIVE),
        "weight_decay": Param(1e-5, NON_NEGATIVE),
        # fraction of the step's iterations after which the lr drops 10x (1: never)
        "lr_drop_at": Param(0.95, FRACTION),
        "optimizer_state": "reset",  # reset: fresh Adam per step | keep: one Adam for the stream (clad)
        "hard_quantile": Param(0.999, FRACTION),
        "q_a": Param(0.9, OPEN_FRACTION),  # map quantiles of the normalisation, q_a < q_b (parameter_rules)
        "q_b": Param(0.995, OPEN_FRACTION),
        "teacher_stats": Param("step", Options("step", "cumulative")),
        # PDN teacher file (clbench distill-teacher); None: a stand-in (warned)
        "teacher_weights": Param(None, [None, PATH]),
        # the stand-in teacher's distillation source (run's weights setting)
        "backbone": Param("wide_resnet50_2", BACKBONE),
        "layers": Param(["layer2", "layer3"], LAYERS),
        # generic images the stand-in teacher is distilled on (never task images)
        "standin_images": Param(200, POSITIVE_INT),
        "distill_epochs": Param(20, POSITIVE_INT),
        "distill_batch_size": Param(16, POSITIVE_INT),
        "distill_lr": Param(1e-4, NON_NEGATIVE),
        "teacher_cache": Param(None, [None, PATH]),  # None: $CLBENCH_CACHE/teachers or ~/.cache/clbench/teachers
        "penalty_dir": Param(None, [None, PATH]),  # e.g. imagenette2/train; None: procedural penalty images
        "penalty_images": Param(200, POSITIVE_INT),  # pool size
    }
    parameter_rules = (Rule(("q_a", "q_b"), lambda p: p["q_a"] < p["q_b"], "q_a < q_b"),)

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
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
        self._teacher_seconds = 0.0
        if p["teacher_weights"]:
            self._load_teacher_file(p["teacher_weights"])
        elif context.require_pretrained:
            raise ValueError(
                "method_params: teacher_weights is required when pretrained components are required (paper "
                f"profile): make one with `{DISTILL_COMMAND}` and pass --param teacher_weights=PATH"
            )
        else:
            message = (
                f"EfficientAD: no teacher_weights, so a stand-in teacher will be distilled from '{p['backbone']}' "
                f"(weights: {self._backbone_weights()}) on {self._standin_label()}, not EfficientAD's ImageNet "
                f"teacher; pass --param teacher_weights=PATH, made with `{DISTILL_COMMAND}`"
            )
            warnings.warn(message, stacklevel=2)
            log.warning(message)

    # -- teacher ---------------------------------------------------------------------------------
    @property
    def teacher_info(self) -> dict[str, Any]:
        """The teacher's provenance (where its weights come from), {} before the teacher is set."""
        raw = bytes(self.teacher_provenance.cpu().tolist())
        return json.loads(raw.decode()) if raw else {}

    def _set_provenance(self, provenance: Mapping[str, Any]) -> None:
        raw = json.dumps(dict(provenance), sort_keys=True, default=str).encode()
        self.teacher_provenance = torch.tensor(list(raw), dtype=torch.uint8, device=self.teacher_mean.device)

    def _backbone_weights(self) -> str:
        return str(getattr(self.context.backbones, "weights", "auto"))

    def _standin_label(self) -> str:
        p = self.params
        if p["penalty_dir"]:
            return f"{p['standin_images']} images of penalty_dir '{p['penalty_dir']}'"
        return f"{p['standin_images']} procedural generic images (methods.penalty, seed {self.context.seed})"

    def _load_teacher_file(self, file: str | Path) -> None:
        """Load ``teacher_weights`` (weights_only) and check its provenance against ``require_pretrained``."""
        start = time.perf_counter()
        path = Path(file).expanduser().resolve()
        stored = read_provenance(path, load_pdn_weights(self.teacher, path))
        pretrained = stored.get("pretrained")
        if self.context.require_pretrained and pretrained is False:
            raise ValueError(
                f"teacher_weights: '{path}' was distilled from a random-init backbone ({stored.get('backbone', '?')}); "
                f"pretrained components are required: make one with `{DISTILL_COMMAND}`"
            )
        provenance = {
            "kind": "file", "source": "file", "file": str(path),
            "backbone": stored.get("backbone", "unknown"),
            "pretrained": "unknown" if pretrained is None else bool(pretrained),
            "source_images": stored.get("images", "unknown"),
        }
        if stored:
            provenance["distillation"] = stored
        self._set_provenance(provenance)
        self.teacher_ready.fill_(True)
        self._teacher_seconds = time.perf_counter() - start

    def _distil_standin(self) -> None:
        """Distil (or load from the cache) a stand-in teacher on generic images, never the task data."""
        p = self.params
        start = time.perf_counter()
        n = int(p["standin_images"])
        penalty = self._penalty_source()
        pool = penalty.pool if len(penalty) == n else PenaltySource(
            self.context.image_size, p["penalty_dir"], n, self.context.seed).pool
        if p["penalty_dir"]:
            label = f"{penalty.folder} (penalty_dir: {len(pool)} images, resize 2S + centre crop, seed {self.context.seed})"
        else:
            label = f"procedural (methods.penalty: {len(pool)} images, seed {self.context.seed})"
        log.info("EfficientAD: distilling a stand-in teacher from %s on %s", p["backbone"], label)
        result = distill_teacher(
            p["backbone"], pool.cpu(), None, cache_dir=p["teacher_cache"], model_size=p["model_size"],
            out_channels=self.channels, layers=tuple(p["layers"]), weights=self._backbone_weights(),
            epochs=self.num_epochs(p["distill_epochs"]), batch_size=p["distill_batch_size"], lr=p["distill_lr"],
            seed=self.context.seed, device=self.context.device, progress=self.context.progress, images_label=label,
        )
        self.teacher.load_state_dict(result.model.state_dict())
        stored = result.provenance
        self._set_provenance({
            "kind": "stand-in", "source": "cache" if result.reused else "distilled", "file": str(result.path),
            "backbone": stored["backbone"], "pretrained": bool(stored["pretrained"]), "source_images": label,
            "distillation": stored,
        })
        self.teacher_ready.fill_(True)
        self._teacher_seconds = time.perf_counter() - start

    def _teacher_fit_info(self) -> dict[str, float]:
        info = self.teacher_info
        pretrained = info.get("pretrained")
        distillation = info.get("distillation") or {}
        return {
            "teacher_source": TEACHER_SOURCES.get(info.get("source", ""), math.nan),
            "teacher_standin": float(info.get("kind") == "stand-in"),
            "teacher_pretrained_backbone": 1.0 if pretrained is True else 0.0 if pretrained is False else math.nan,
            "teacher_distill_images": float(distillation.get("num_images", math.nan)),
            "teacher_distill_epochs": float(distillation.get("epochs", math.nan)),
            "teacher_distill_loss": float(distillation.get("final_loss", math.nan)),
        }

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
        x_aug = normalize_unit(colour_jitter(pixels.float() / 255.0, generator))
        n, c = len(x), self.channels
        teacher = self._teacher(torch.cat([x, x_aug]))
        # the student once per input group, as anomalib: each loss reads half of its own call's channels,
        # so backward zero-fills one group's output per slice, not the stacked batch's three times
        # (a stacked call measured 6.5% slower per iteration at 256 px; the student has no batch norm,
        # so the outputs are the same either way)
        ae = self.autoencoder(x_aug)
        return {
            "st": hard_feature_loss((teacher[:n] - self.student(x)[:, :c]) ** 2, self.params["hard_quantile"], generator),
            "penalty": self.student(penalty.to(device))[:, :c].pow(2).mean(),
            "ae": (teacher[n:] - ae).pow(2).mean(),
            "stae": (ae - self.student(x_aug)[:, c:]).pow(2).mean(),
        }

    def continual_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The student's two halves (``student/local``: the channels trained on the teacher,
        ``student/global``: those trained on the autoencoder) and the ``autoencoder``'s output, each
        (B, C, h, w), on the clean normalised images (no augmentation, no penalty images): the
        trained networks' outputs that EfficientAD's four losses compare."""
        x = batch.normalized(self.context.device)
        student = self.student(x)
        c = self.channels
        return {"student/local": student[:, :c], "student/global": student[:, c:], "autoencoder": self.autoencoder(x)}

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
            self._distil_standin()
        info.update(self._teacher_fit_info())
        if self._teacher_seconds:
            info["seconds_teacher"], self._teacher_seconds = self._teacher_seconds, 0.0
        self.teacher.eval()
        penalty = self._penalty_source()
        info["penalty_procedural"] = float(penalty.kind == "procedural")
        info["penalty_images"] = float(len(penalty))
        info["teacher_stats_images"] = float(self._update_teacher_stats(data.train))

        trainable = list(self.student.parameters()) + list(self.autoencoder.parameters())
        optimiser = self.task_optimiser(lambda: adam(trainable, p["lr"], p["weight_decay"]))
        epochs = self.num_epochs(p["epochs"])
        per_epoch = math.ceil(len(data.train) / p["batch_size"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=max(1, int(p["lr_drop_at"] * epochs * per_epoch)), gamma=0.1)
        generator = torch.Generator().manual_seed(data.seed)

        def loss(batch: Batch) -> dict[str, torch.Tensor]:
            """The iteration's four named losses; the penalty images are drawn first (the order of draws)."""
            return self.training_losses(batch.pixels, penalty.sample(p["batch_size"], generator, self.context.device), generator)

        result = train_task(
            self, data, loss, optimiser, epochs=epochs, batch_size=p["batch_size"],
            modules=[self.student, self.autoencoder],  # the teacher stays frozen, in eval mode
            scheduler=scheduler, scheduler_interval="iteration", average="iterations",
            validate=(lambda: self._validation_loss(data)) if len(data.val) else None, patience=p["patience"],
        )

        from_val = len(data.val) > 0
        quantile_images = self._compute_quantiles(data.val if from_val else data.train, data.seed)
        (qa_st, qb_st), (qa_ae, qb_ae) = self.quantiles.tolist()
        info.update({
            "epochs_run": result.epochs_run, "epochs_max": epochs, "iterations": result.iterations,
            "iterations_per_epoch": per_epoch, "best_epoch": result.best_epoch, "train_loss_first": result.first_loss,
            "train_loss_last": result.last_loss, "val_loss_best": result.best_val_loss,
            **{f"loss_{k}_last": v for k, v in result.last_parts.items()},
            "quantiles_from_val": float(from_val), "quantile_images": float(quantile_images),
            "q_a_local": qa_st, "q_b_local": qb_st, "q_a_global": qa_ae, "q_b_global": qb_ae,
            "seconds_train": result.seconds, "seconds_fit": time.perf_counter() - start,
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
    def add_cli_commands(cls, subparsers) -> None:
        """``clbench distill-teacher``: EfficientAD's offline teacher (``methods.efficientad.distill``)."""
        add_distill_parser(subparsers)

    @classmethod
    def pretrained_backbones(cls, params: Mapping[str, Any]) -> list[str]:
        """None: EfficientAD's only pretrained component is its teacher file (checked at construction);
        ``backbone`` only distils a stand-in, which ``require_pretrained`` refuses anyway."""
        return []

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
