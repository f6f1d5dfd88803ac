"""DRAEM's anomaly simulator: Perlin-noise masks, anomaly-source textures and their blending.

Everything draws from an explicit ``torch.Generator`` (CPU), so the same seed gives the same masks,
textures and blends on any device, and a resumed run reproduces the uninterrupted one.

* ``perlin_noise`` - 2-D gradient (Perlin) noise with the quintic fade 6t^5 - 15t^4 + 10t^3, values
  in about [-1, 1], on a grid of ``res`` lattice cells (Perlin, "Improving noise", 2002).
* ``perlin_mask`` - DRAEM's mask: noise at 2^a x 2^b lattice cells (a, b uniform integers in
  [min_scale, max_scale]), rotated by a uniform angle in [-90, 90] degrees, thresholded at 0.5.
  DRAEM draws a, b in [0, 6] at 256 px (smallest cell: 4 px). Here ``max_scale=None`` keeps that
  smallest cell of 4 px at any resolution: max_scale = min(6, log2(nextpow2(size)) - 2), i.e. 6 at
  256 px, 4 at 64 px, 3 at 32 px. (A 1-px cell would be all zeros: Perlin noise vanishes on the
  lattice.) The noise is generated at the next power of two and cropped, as DRAEM.
* ``AnomalySource`` - the anomaly-source set A: images of a folder (DTD in the paper), resized to the
  training resolution, or, with no folder, a deterministic *procedural* texture (coloured fractal
  Perlin noise, stripes, a checkerboard, or two-colour Perlin blobs, with random colours, scales and
  angles). Each drawn texture then gets 3 distinct random transforms out of DRAEM's list (gamma
  contrast, brightness multiply/add, per-channel colour shift, solarize, posterize, invert,
  autocontrast, equalize, rotation), implemented here in torch (DRAEM uses imgaug).
* ``synthesize_anomalies`` - DRAEM's blend: with probability ``p_anomalous`` an image gets a mask M
  and a texture A, and I_a = (1 - M) * I + (1 - beta) * M * I + beta * M * A with beta uniform in
  [0.1, 1.0) (DRAEM paper: the opacity of the texture); otherwise I_a = I and M = 0.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
DRAEM_MAX_SCALE = 6  # 2^6 lattice cells at 256 px
MIN_CELL_PIXELS = 4  # DRAEM's finest cell: 256 / 2^6


# -- random helpers (all through an explicit generator) ---------------------------------------------
def _uniform(generator: torch.Generator, low: float, high: float, shape: Sequence[int] = ()) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator) * (high - low) + low


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _coin(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator)) < p


@contextmanager
def single_thread():
    """Run small CPU tensor ops on one intra-op thread (restored after).

    The simulator works on (H, W) maps one image at a time; with several OpenMP threads on a
    loaded machine such tiny ops spend ~100x longer spinning than computing (measured: 86 ms vs
    0.8 ms for one 64x64 noise map on 2 shared cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def next_pow2(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, value))))


# -- Perlin noise ------------------------------------------------------------------------------------
def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(h, w) gradient noise over ``res`` = (rows, cols) lattice cells; h, w multiples of res."""
    h, w = shape
    ry, rx = res
    if h % ry or w % rx:
        raise ValueError(f"perlin_noise: shape {shape} must be a multiple of res {res}")
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1, generator=generator)
    gy, gx = torch.sin(angles), torch.cos(angles)  # unit gradients at the lattice points
    ys = torch.arange(h, dtype=torch.float32) * (ry / h)
    xs = torch.arange(w, dtype=torch.float32) * (rx / w)
    yi, xi = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]  # position inside the cell, (h, 1) and (1, w)
    Y, X = yi[:, None], xi[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        # dot(gradient at corner, offset from corner)
        return gy[Y + dy, X + dx] * (fy - dy) + gx[Y + dy, X + dx] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2.0) * torch.lerp(top, bottom, ty)


def fractal_noise(size: int, base_res: int, octaves: int, generator: torch.Generator, persistence: float = 0.5) -> torch.Tensor:
    """Sum of Perlin octaves (frequency x2, amplitude x persistence) on a (size, size) power-of-2 grid."""
    noise = torch.zeros(size, size)
    amplitude, res = 1.0, base_res
    for _ in range(octaves):
        if res > size:
            break
        noise += amplitude * perlin_noise((size, size), (res, res), generator)
        amplitude *= persistence
        res *= 2
    return noise


def _rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (C, H, W) about the centre, bilinear, zero fill outside (imgaug's Affine default)."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32).unsqueeze(0)
    x = images.unsqueeze(0).float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(0)


def default_max_scale(size: int) -> int:
    """Largest lattice exponent whose cells stay >= 4 px (DRAEM's 6 at 256 px)."""
    return int(min(DRAEM_MAX_SCALE, max(0, round(math.log2(next_pow2(size) / MIN_CELL_PIXELS)))))


def perlin_mask(
    size: int,
    generator: torch.Generator,
    *,
    threshold: float = 0.5,
    min_scale: int = 0,
    max_scale: int | None = None,
    rotate: bool = True,
) -> torch.Tensor:
    """DRAEM's binary anomaly mask (size, size), bool: thresholded, rotated Perlin noise."""
    n = next_pow2(size)
    top = default_max_scale(size) if max_scale is None else min(int(max_scale), int(math.log2(n)))
    low = min(int(min_scale), top)
    res_y = 2 ** _randint(generator, low, top)
    res_x = 2 ** _randint(generator, low, top)
    noise = perlin_noise((n, n), (res_y, res_x), generator)
    if rotate:
        noise = _rotate(noise.unsqueeze(0), float(_uniform(generator, -90.0, 90.0))).squeeze(0)
    return noise[:size, :size] > threshold


# -- procedural textures ----------------------------------------------------------------------------
def _coords(size: int, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates in [0, 1) rotated by ``degrees`` (u along the rotated x axis)."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = t[:, None].expand(size, size), t[None, :].expand(size, size)
    a = math.radians(degrees)
    return x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)


def _two_colours(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    c1, c2 = torch.rand(3, generator=generator), torch.rand(3, generator=generator)
    return c1[:, None, None] * (1 - weight) + c2[:, None, None] * weight


def procedural_texture(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random texture (3, size, size) in [0, 1]: one of four deterministic procedural families."""
    n = next_pow2(size)
    kind = _randint(generator, 0, 3)
    if kind == 0:  # coloured fractal noise: an independent fractal Perlin field per channel
        base = 2 ** _randint(generator, 0, min(3, int(math.log2(n))))
        channels = []
        for _ in range(3):
            field = fractal_noise(n, base, 4, generator)
            field = (field - field.min()) / (field.max() - field.min()).clamp_min(1e-6)
            channels.append(field)
        texture = torch.stack(channels)
    elif kind == 1:  # stripes, hard or soft edged
        u, _ = _coords(n, float(_uniform(generator, 0.0, 180.0)))
        cycles = float(_uniform(generator, 2.0, 16.0))
        wave = 0.5 + 0.5 * torch.sin(2 * math.pi * (cycles * u + float(torch.rand((), generator=generator))))
        weight = (wave > 0.5).float() if _coin(generator, 0.5) else wave
        texture = _two_colours(weight, generator)
    elif kind == 2:  # checkerboard
        u, v = _coords(n, float(_uniform(generator, 0.0, 90.0)))
        cells = float(_uniform(generator, 2.0, 12.0))
        weight = ((torch.floor(u * cells) + torch.floor(v * cells)) % 2).float()
        texture = _two_colours(weight, generator)
    else:  # two-colour Perlin blobs with a little grain
        res = 2 ** _randint(generator, 1, min(4, int(math.log2(n))))
        weight = (perlin_noise((n, n), (res, res), generator) > 0).float()
        texture = _two_colours(weight, generator) + 0.05 * torch.randn(3, n, n, generator=generator)
    return texture[:, :size, :size].clamp(0, 1)


# -- DRAEM's source-image augmentations (3 distinct ones per texture) --------------------------------
def _gamma(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x.clamp_min(0).pow(_uniform(g, 0.5, 2.0, (3, 1, 1)))


def _brightness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x * float(_uniform(g, 0.8, 1.2)) + float(_uniform(g, -30.0, 30.0)) / 255


def _colour_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # stands in for hue/saturation
    return x + _uniform(g, -50.0, 50.0, (3, 1, 1)) / 255


def _solarize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    threshold = float(_uniform(g, 32.0, 128.0)) / 255
    return torch.where(x > threshold, 1 - x, x)


def _posterize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    step = 2 ** (8 - _randint(g, 1, 7))
    return torch.floor(x * 255 / step) * step / 255


def _invert(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1 - x


def _autocontrast(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    low = x.flatten(1).amin(1)[:, None, None]
    high = x.flatten(1).amax(1)[:, None, None]
    return (x - low) / (high - low).clamp_min(1e-6)


def _equalize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-channel histogram equalisation on 256 levels."""
    levels = (x.clamp(0, 1) * 255).round().long().flatten(1)
    out = torch.empty_like(x).flatten(1)
    for c in range(x.shape[0]):
        hist = torch.bincount(levels[c], minlength=256).float()
        cdf = hist.cumsum(0)
        cdf = (cdf - cdf[cdf > 0].min()) / (cdf[-1] - cdf[cdf > 0].min()).clamp_min(1)
        out[c] = cdf.clamp_min(0)[levels[c]]
    return out.view_as(x)


def _rotate_texture(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _rotate(x, float(_uniform(g, -45.0, 45.0)))


SOURCE_AUGMENTATIONS: tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor], ...] = (
    _gamma, _brightness, _colour_shift, _solarize, _posterize, _invert, _autocontrast, _equalize, _rotate_texture,
)


def augment_texture(texture: torch.Tensor, generator: torch.Generator, count: int = 3) -> torch.Tensor:
    """Apply ``count`` distinct random transforms of DRAEM's list, in random order."""
    order = torch.randperm(len(SOURCE_AUGMENTATIONS), generator=generator)[:count].tolist()
    for index in order:
        texture = SOURCE_AUGMENTATIONS[index](texture, generator).clamp(0, 1)
    return texture


# -- anomaly sources ---------------------------------------------------------------------------------
class AnomalySource:
    """The anomaly-source set: a folder of images (e.g. DTD), else procedural textures.

    Folder images are found recursively (sorted, so the draw is reproducible), decoded once, resized
    (bilinear) to the training resolution and kept as uint8. Not method state: it is rebuilt from
    the folder path on resume.
    """

    def __init__(self, folder: str | Path | None, size: int) -> None:
        self.size = size
        self.folder = None if folder in (None, "") else Path(folder).expanduser()
        self.paths: list[Path] = []
        self._cache: dict[int, torch.Tensor] = {}
        if self.folder is not None:
            if not self.folder.is_dir():
                raise ValueError(f"anomaly_source: '{self.folder}' is not a folder")
            self.paths = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self.paths:
                raise ValueError(f"anomaly_source: no images under '{self.folder}'")

    @property
    def procedural(self) -> bool:
        return not self.paths

    def _image(self, index: int) -> torch.Tensor:
        cached = self._cache.get(index)
        if cached is None:
            with Image.open(self.paths[index]) as img:
                img = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
                cached = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
            self._cache[index] = cached
        return cached

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One augmented texture (3, size, size), float in [0, 1]."""
        if self.procedural:
            texture = procedural_texture(self.size, generator)
        else:
            texture = self._image(_randint(generator, 0, len(self.paths) - 1)).float() / 255
        return augment_texture(texture, generator)


def synthesize_anomalies(
    images: torch.Tensor,
    source: AnomalySource,
    generator: torch.Generator,
    *,
    p_anomalous: float = 0.5,
    beta: tuple[float, float] = (0.1, 1.0),
    threshold: float = 0.5,
    min_scale: int = 0,
    max_scale: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's simulated anomalies on (B, 3, H, W) images in [0, 1] (CPU).

    Returns the augmented images and float masks (B, 1, H, W) in {0, 1}.
    """
    batch, _, height, width = images.shape
    if height != width:
        raise ValueError(f"synthesize_anomalies: square images expected, got {height}x{width}")
    images = images.detach().float().cpu()
    augmented = images.clone()
    masks = torch.zeros(batch, 1, height, width)
    with single_thread():
        for i in range(batch):
            if not _coin(generator, p_anomalous):
                continue
            mask = perlin_mask(height, generator, threshold=threshold, min_scale=min_scale, max_scale=max_scale).float()
            texture = source.sample(generator)
            opacity = float(_uniform(generator, beta[0], beta[1]))
            augmented[i] = images[i] * (1 - mask) + (1 - opacity) * images[i] * mask + opacity * texture * mask
            masks[i, 0] = mask
    return augmented, masks


__all__ = [
    "AnomalySource", "single_thread", "augment_texture", "default_max_scale", "fractal_noise", "next_pow2", "perlin_mask",
    "perlin_noise", "procedural_texture", "synthesize_anomalies",
]
