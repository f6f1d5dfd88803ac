"""EfficientAD's teacher distillation and its command, ``clbench distill-teacher`` (registered on the CLI
by ``EfficientAD.add_cli_commands``).

Teacher distillation (paper, appendix A.1): the PDN (with padding) regresses the features of a
pretrained backbone, channel-normalised, with MSE; Adam lr 1e-4, weight decay 1e-5, batch 16.
Features: ``layer2`` and ``layer3`` of a timm backbone (``wide_resnet50_2`` by default; the paper
uses WRN-101) on the image at twice the PDN's resolution, each averaged over 3x3 neighbourhoods,
``layer3`` upsampled to ``layer2``'s grid, concatenated and projected to 384 channels by average
pooling over channels (PatchCore's feature pipeline), so the target grid is the padded PDN's
(64x64 at 256 px). The intended use is ``clbench distill-teacher --backbone wide_resnet50_2
--weights imagenet --images DIR --out PATH`` on a generic image set (ImageNet, or Imagenette as
anomalib), never on the benchmark's task images. Differences from the paper, for an offline
benchmark: the schedule is epochs over the folder instead of 60 000 iterations, images are
resized whole to the PDN size, and the random grayscale (p=0.1) is not applied (targets are
computed once per image). ``distill_teacher`` writes the weights file atomically with its
provenance (images, their hash, backbone, pretrained or not, schedule) inside it and in a JSON
beside it (``<out>.json``), and is cached: a call whose provenance matches the files already
there loads them instead of training. Weights are always read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.efficientad.networks import MODEL_SIZES, adam, build_pdn, load_pdn_weights, pdn_output_size
from methods.training import train_loop


PROVENANCE_FORMAT = "clbench-pdn-teacher/1"
# Provenance entries that are not part of a cache hit's identity: results of the distillation, and
# where the images were read from (their content hash is what counts).
RESULT_KEYS = ("final_loss", "first_loss", "seconds", "created", "images")


# -- distillation -------------------------------------------------------------------------------
@dataclass
class DistilledTeacher:
    """What ``distill_teacher`` returns: the PDN (frozen, eval), its provenance and where it is."""

    model: nn.Module
    provenance: dict[str, Any]
    path: Path
    reused: bool  # True: loaded from the cache, no training


def provenance_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".json")


def default_cache_dir() -> Path:
    """``$CLBENCH_CACHE/teachers`` if set, else ``~/.cache/clbench/teachers``."""
    root = os.environ.get("CLBENCH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "clbench"
    return base / "teachers"


def provenance_key(provenance: dict[str, Any]) -> dict[str, Any]:
    """The inputs of a distillation (what a cache hit must match): all but ``RESULT_KEYS``."""
    return {k: v for k, v in provenance.items() if k not in RESULT_KEYS}


def cache_file_for(provenance: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """A cache file name unique to the distillation's inputs."""
    digest = hashlib.sha256(json.dumps(provenance_key(provenance), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"pdn-{provenance['model_size']}-{provenance['backbone']}-{digest}.pt"


def load_images(folder: str | Path, image_size: int, max_images: int | None = None, seed: int = 0) -> torch.Tensor:
    """Every image under ``folder`` (recursive, sorted; a seeded subset of ``max_images``) as uint8 (N, 3, S, S)."""
    from clbench.data import IMAGE_EXTENSIONS, load_rgb8

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images: '{folder}' is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"images: no images under '{folder}' (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if max_images is not None and len(files) > max_images:
        rows = np.random.default_rng(seed).permutation(len(files))[:max_images]
        files = [files[i] for i in sorted(rows)]
    out = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, path in enumerate(files):
        out[i] = torch.from_numpy(load_rgb8(path, image_size).copy()).permute(2, 0, 1)
    return out


def images_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def project_features(features: Sequence[torch.Tensor], out_channels: int) -> torch.Tensor:
    """PatchCore's pipeline: 3x3 local averaging, resize to the first layer's grid, concatenate,
    average-pool the channels down to ``out_channels``: list of (B, C_i, h_i, w_i) -> (B, out, h_0, w_0)."""
    size = features[0].shape[-2:]
    parts = []
    for f in features:
        f = F.avg_pool2d(f, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        parts.append(f)
    x = torch.cat(parts, dim=1)
    b, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
    x = F.adaptive_avg_pool1d(x, out_channels)
    return x.reshape(b, h, w, out_channels).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _backbone_targets(backbone: nn.Module, pixels: torch.Tensor, out_channels: int, out_size: int, device) -> torch.Tensor:
    from clbench.data import normalize

    x = normalize(pixels.to(device))
    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    y = project_features([f.float() for f in backbone(x)], out_channels)
    if y.shape[-1] != out_size:
        y = F.interpolate(y, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return y


def distill_teacher(
    backbone_name: str,
    images: str | Path | torch.Tensor,
    out_path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    model_size: str = "small",
    out_channels: int = 384,
    layers: Sequence[str] = ("layer2", "layer3"),
    weights: str = "auto",
    image_size: int = 256,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    progress: bool = False,
    target_cache_bytes: int = 1 << 30,
    images_label: str | None = None,
) -> DistilledTeacher:
    """Distil a PDN teacher from a timm backbone on ``images`` and write it to ``out_path``.

    ``images``: a folder (read recursively, resized to ``image_size``) or uint8 images
    (N, 3, S, S) at the PDN's input size (``image_size`` is then S). ``weights``: the backbone's
    weights as in a run config (auto | none | imagenet | PATH). If ``out_path`` and its
    provenance ``<out_path>.json`` exist and the provenance matches this call, the file is loaded
    and nothing is trained (``reused=True``). Otherwise the weights file is written atomically
    (``{"state_dict", "provenance"}``), then the provenance JSON. ``out_path=None``: a file
    named after the provenance's hash in ``cache_dir`` (default ``default_cache_dir()``).
    ``images_label``: what the provenance calls the images (default: the folder, or "tensor").
    """
    from tqdm.auto import tqdm

    from clbench.engine import atomic
    from clbench.features.backbones import create_feature_model, resolve_weights
    from clbench.data import normalize

    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size: '{model_size}' is not one of {', '.join(MODEL_SIZES)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"distill: epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = torch.device(device)
    if isinstance(images, (str, Path)):
        source = str(Path(images).resolve())
        pixels = load_images(images, image_size, max_images, seed)
    else:
        pixels = images if torch.is_tensor(images) else torch.stack(list(images))
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"images: expected uint8 (N, 3, S, S), got {pixels.dtype} {tuple(pixels.shape)}")
        if max_images is not None and len(pixels) > max_images:
            rows = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))[:max_images]
            pixels = pixels[rows.sort().values]
        source = "tensor"
        image_size = int(pixels.shape[-1])
    pixels = pixels.cpu().contiguous()
    if len(pixels) == 0:
        raise ValueError("images: no images to distil on")
    info = resolve_weights(backbone_name, weights)
    provenance: dict[str, Any] = {
        "format": PROVENANCE_FORMAT,
        "backbone": backbone_name,
        "layers": list(layers),
        "weights_requested": info.requested,
        "weights_source": info.source,
        "weights_file": info.file,
        "pretrained": info.pretrained,
        "images": images_label or source,
        "num_images": int(len(pixels)),
        "images_sha256": images_digest(pixels),
        "image_size": image_size,
        "model_size": model_size,
        "out_channels": int(out_channels),
        "padding": True,
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "seed": int(seed),
    }
    out_path = cache_file_for(provenance, cache_dir) if out_path is None else Path(out_path).expanduser()
    meta_path = provenance_path(out_path)
    model = build_pdn(model_size, out_channels, padding=True)
    if out_path.is_file() and meta_path.is_file():
        try:
            saved = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved is not None and provenance_key(saved) == provenance_key(provenance):
            stored = load_pdn_weights(model, out_path)
            if provenance_key(stored) == provenance_key(provenance):
                return DistilledTeacher(_frozen(model), saved, out_path, reused=True)

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_pdn(model_size, out_channels, padding=True).to(device)
        backbone = create_feature_model(backbone_name, layers, info, seed).to(device)
        out_size = pdn_output_size(image_size, padding=True)
        n = len(pixels)
        chunk = 8
        per_image = out_channels * out_size * out_size * 4
        cached: torch.Tensor | None = None
        if n * per_image <= target_cache_bytes:
            cached = torch.cat([_backbone_targets(backbone, pixels[i:i + chunk], out_channels, out_size, device).cpu()
                                for i in range(0, n, chunk)])

        def targets(rows: torch.Tensor) -> torch.Tensor:
            if cached is not None:
                return cached[rows].to(device)
            return _backbone_targets(backbone, pixels[rows], out_channels, out_size, device)

        # channel normalisation of the targets (paper: over 10 000 images; here over all of them)
        total = torch.zeros(out_channels, dtype=torch.float64)
        total_sq = torch.zeros(out_channels, dtype=torch.float64)
        count = 0
        for i in range(0, n, chunk):
            y = targets(torch.arange(i, min(n, i + chunk))).double().cpu()
            total += y.sum(dim=(0, 2, 3))
            total_sq += (y**2).sum(dim=(0, 2, 3))
            count += y.shape[0] * y.shape[2] * y.shape[3]
        mean = total / count
        std = (total_sq / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
        mean = mean.float().view(1, -1, 1, 1).to(device)
        std = std.float().view(1, -1, 1, 1).to(device)

        optimiser = adam(model.parameters(), lr, weight_decay)
        generator = torch.Generator().manual_seed(seed)
        batch = min(batch_size, n)
        steps = epochs * math.ceil(n / batch)
        bar = tqdm(total=steps, desc=f"distil PDN-{model_size} from {backbone_name}", unit="it", disable=not progress, leave=False)

        def epoch_rows(epoch: int) -> Iterator[torch.Tensor]:
            """The epoch's batches of image rows, from one seeded permutation per epoch."""
            order = torch.randperm(n, generator=generator)
            for i in range(0, n, batch):
                yield order[i:i + batch]
                bar.update(1)

        def loss(rows: torch.Tensor) -> torch.Tensor:
            target = (targets(rows) - mean) / std
            return F.mse_loss(model(normalize(pixels[rows].to(device))), target)

        result = train_loop(loss, optimiser, epochs=epochs, batches=epoch_rows, modules=[model], label="distill_teacher")
        bar.close()
    model = model.cpu()
    provenance.update(
        first_loss=result.first_loss, final_loss=result.last_loss, seconds=round(time.perf_counter() - start, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    state = {"state_dict": model.state_dict(), "provenance": provenance}
    atomic.write_with(out_path, lambda tmp: torch.save(state, tmp))
    atomic.write_json(meta_path, provenance)
    return DistilledTeacher(_frozen(model), provenance, out_path, reused=False)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# -- command line ------------------------------------------------------------------------------
def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``clbench distill-teacher`` on the CLI's subparsers (``set_defaults(func=...)``)."""
    p = subparsers.add_parser(
        "distill-teacher",
        help="distil an EfficientAD PDN teacher from a timm backbone on a folder of images",
        description="Train a PDN to regress a backbone's channel-normalised layer2+layer3 features "
                    "(EfficientAD's teacher) on a generic image set (ImageNet or Imagenette, never the "
                    "benchmark's task images), writing OUT and OUT.json (provenance: images, backbone, "
                    "pretrained or not). Cached: an identical call loads OUT instead of training. "
                    "Use it in a run with --param teacher_weights=OUT.",
    )
    p.add_argument("--backbone", default="wide_resnet50_2", help="timm model (default: wide_resnet50_2)")
    p.add_argument("--images", type=Path, required=True, help="folder of images (recursive), e.g. Imagenette")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (provenance: OUT.json)")
    p.add_argument("--weights", default="auto", help="backbone weights: auto | none | imagenet | PATH (default: auto)")
    p.add_argument("--layers", default="layer2,layer3", help="comma list of backbone layers (default: layer2,layer3)")
    p.add_argument("--model-size", dest="model_size", choices=MODEL_SIZES, default="small")
    p.add_argument("--out-channels", dest="out_channels", type=int, default=384)
    p.add_argument("--image-size", dest="image_size", type=int, default=256, help="PDN input size (backbone: twice)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-images", dest="max_images", type=int, help="seeded subset of the folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--no-progress", dest="no_progress", action="store_true")
    p.set_defaults(func=cmd_distill_teacher)
    return p


def cmd_distill_teacher(args: argparse.Namespace) -> int:
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    result = distill_teacher(
        args.backbone, args.images, args.out, model_size=args.model_size, out_channels=args.out_channels,
        layers=layers, weights=args.weights, image_size=args.image_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        max_images=args.max_images, progress=not args.no_progress,
    )
    prov = result.provenance
    state = "reused (provenance matches)" if result.reused else f"distilled in {prov.get('seconds', 0):.1f}s"
    print(f"{result.path}: PDN-{prov['model_size']} teacher from {prov['backbone']} "
          f"({'pretrained' if prov['pretrained'] else 'random-init'} backbone, {prov['num_images']} images, "
          f"{prov['epochs']} epochs), {state}; final loss {prov.get('final_loss', float('nan')):.4f}")
    print(f"provenance: {provenance_path(result.path)}")
    if not prov["pretrained"]:
        print("warning: the backbone was random-init (no pretrained weights found): this is not EfficientAD's "
              "teacher, and runs with require_pretrained refuse it; pass --weights imagenet or --weights PATH")
    return 0
