"""Penalty images for EfficientAD's student: images from the teacher's pretraining distribution.

EfficientAD adds ``mean(S(P)[:, :C]^2)`` for a random pretraining image P (ImageNet; anomalib uses
Imagenette) to the student's loss, so the student does not imitate the teacher outside the
training distribution. Two sources:

* ``folder``: every image under a folder (recursive; e.g. Imagenette's ``train``), a seeded subset
  of ``pool_size`` decoded once; each is resized to twice the input size and centre-cropped to it
  (anomalib's ``Resize(2S) + CenterCrop(S)``: the central half of the image).
* ``procedural`` (when no folder is given: nothing can be downloaded here): ``pool_size`` seeded
  images, each drawn by its own generator (seed, index), cycling through three families with
  natural-image statistics:

  0. *dead leaves*: 150-400 occluding discs, ellipses, rectangles and triangles with a power-law
     size distribution (radius density ~ r^-3 between S/40 and S/2, the scale-invariant
     occlusion model of natural images; the shapes cover the image ~3 times over), flat colours
     with correlated channels (a luminance plus a moderate chroma offset), on a random linear-gradient background;
  1. *fractal colour fields*: 1/f^beta noise (beta in [1.6, 3.0]: natural spectra are ~1/f^2) in
     three channels mixed by a random colour matrix around a random mean colour;
  2. *textured leaves*: a dead-leaves image multiplied by a fractal luminance texture, plus a few
     thin random lines (edges and texture together).

  A mild Gaussian blur (sigma 0.5 px, 50% of images) varies the sharpness. This is a stand-in,
  not ImageNet: it keeps the penalty's role (discourage the student from matching the teacher on
  images unlike the training category) but not its exact content.

Both return uint8 (N, 3, S, S); ``sample`` draws ImageNet-normalised batches with anomalib's
random grayscale (p = 0.3) from a seeded generator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from clbench.data import IMAGE_EXTENSIONS, load_rgb8, normalize

GRAYSCALE_P = 0.3
LUMA = (0.299, 0.587, 0.114)


def fractal_noise(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Real 2-D noise with power spectrum ~ 1/f^beta, scaled to [0, 1]: (size, size) float32."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2.0)
    amplitude[0, 0] = 0.0
    phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
    spectrum = amplitude * (np.cos(phase) + 1j * np.sin(phase))
    field = np.fft.irfft2(spectrum, s=(size, size))
    lo, hi = field.min(), field.max()
    return ((field - lo) / (hi - lo + 1e-12)).astype(np.float32)


def _gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / (t.max() - t.min() + 1e-12)
    return (a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]).astype(np.uint8)


def _natural_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour with correlated channels (a luminance plus a moderate chroma offset)."""
    rgb = rng.uniform(0, 255) + rng.normal(0, 45, 3)
    return tuple(int(c) for c in np.clip(rgb, 0, 255))


def dead_leaves(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.fromarray(_gradient_background(rng, size))
    draw = ImageDraw.Draw(img)
    r_min, r_max = max(1.0, size / 40), size / 2
    for _ in range(int(rng.integers(150, 400))):
        # inverse-CDF sample of density ~ r^-3 on [r_min, r_max]
        u = rng.uniform()
        r = 1.0 / np.sqrt(1.0 / r_min**2 - u * (1.0 / r_min**2 - 1.0 / r_max**2))
        cx, cy = rng.uniform(-r, size + r, 2)
        colour = _natural_colour(rng)
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == 1:
            e = rng.uniform(0.3, 1.0)
            draw.ellipse([cx - r, cy - r * e, cx + r, cy + r * e], fill=colour)
        elif kind == 2:
            w, h = r * rng.uniform(0.5, 1.5), r * rng.uniform(0.5, 1.5)
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=colour)
        else:
            angles = rng.uniform(0, 2 * np.pi, 3)
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)
    return img


def fractal_colour_field(rng: np.random.Generator, size: int) -> Image.Image:
    beta = rng.uniform(1.6, 3.0)
    channels = np.stack([fractal_noise(rng, size, beta) - 0.5 for _ in range(3)], axis=-1)
    mix = rng.normal(0, 1, (3, 3)) * 0.5 + np.eye(3) * rng.uniform(0.2, 1.0)
    mean = rng.uniform(0.2, 0.8, 3)
    out = mean + channels @ mix.T * rng.uniform(0.6, 1.4)
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def textured_leaves(rng: np.random.Generator, size: int) -> Image.Image:
    base = np.asarray(dead_leaves(rng, size)).astype(np.float32)
    texture = 0.6 + 0.8 * fractal_noise(rng, size, rng.uniform(1.0, 2.2))
    img = Image.fromarray(np.clip(base * texture[..., None], 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 12))):
        points = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return img


FAMILIES = (dead_leaves, fractal_colour_field, textured_leaves)


def procedural_image(seed: int, index: int, size: int) -> np.ndarray:
    """One penalty image, uint8 (size, size, 3), a function of (seed, index, size) only."""
    rng = np.random.default_rng([seed, index, 7919])
    img = FAMILIES[index % len(FAMILIES)](rng, size)
    if rng.uniform() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=0.5 * size / 64))
    return np.asarray(img.convert("RGB"))


def procedural_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` procedural penalty images as uint8 (n, 3, size, size)."""
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        out[i] = torch.from_numpy(procedural_image(seed, i, size).copy()).permute(2, 0, 1)
    return out


def folder_images(folder: str | Path, n: int, size: int, seed: int = 0) -> torch.Tensor:
    """A seeded subset of ``n`` images under ``folder``, resized to 2*size and centre-cropped to size."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"penalty_dir: '{folder}' is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"penalty_dir: no images under '{folder}'")
    rows = np.random.default_rng(seed).permutation(len(files))[: min(n, len(files))]
    out = torch.empty(len(rows), 3, size, size, dtype=torch.uint8)
    start = size // 2
    for i, row in enumerate(sorted(rows)):
        crop = load_rgb8(files[row], 2 * size)[start:start + size, start:start + size]
        out[i] = torch.from_numpy(crop.copy()).permute(2, 0, 1)
    return out


class PenaltySource:
    """A pool of penalty images and seeded sampling from it."""

    def __init__(self, image_size: int, folder: str | Path | None = None, pool_size: int = 200, seed: int = 0) -> None:
        if pool_size < 1:
            raise ValueError(f"penalty_images: must be >= 1, got {pool_size}")
        self.kind = "folder" if folder else "procedural"
        self.folder = str(Path(folder).expanduser().resolve()) if folder else None
        if folder:
            self.pool = folder_images(folder, pool_size, image_size, seed)
        else:
            self.pool = procedural_images(pool_size, image_size, seed)

    def __len__(self) -> int:
        return len(self.pool)

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` random pool images, grayscale with probability 0.3, ImageNet-normalised: (n, 3, S, S)."""
        rows = torch.randint(len(self.pool), (n,), generator=generator)
        pixels = self.pool[rows].to(device).float()
        gray = torch.rand(n, generator=generator) < GRAYSCALE_P
        if gray.any():
            luma = torch.tensor(LUMA, device=pixels.device).view(1, 3, 1, 1)
            mono = (pixels[gray] * luma).sum(dim=1, keepdim=True)
            pixels[gray] = mono.expand(-1, 3, -1, -1)
        return normalize(pixels)
