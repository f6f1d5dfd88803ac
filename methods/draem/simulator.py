"""DRAEM's anomaly simulator: Perlin-noise masks, anomaly-source textures and their blending, and
DRAEM's rotation of the normal training images.

Everything draws from an explicit ``torch.Generator`` (CPU), so the same seed gives the same masks,
textures and blends on any device, and a resumed run reproduces the uninterrupted one.

* ``perlin_noise`` - 2-D gradient (Perlin) noise with the quintic fade 6t^5 - 15t^4 + 10t^3, values
  in about [-1, 1], on a grid of ``res`` lattice cells (Perlin, "Improving noise", 2002).
* ``perlin_mask`` - DRAEM's mask: noise at 2^a x 2^b lattice cells (a, b uniform integers in
  [min_scale, max_scale], ``perlin_scales``), rotated by a uniform angle in [-90, 90] degrees,
  thresholded at 0.5. DRAEM's code (and the benchmark paper's copy, and anomalib) draws
  ``torch.randint(0, 6)``: a, b in [0, 5] at 256 px (the bound 6 is exclusive), so the finest
  lattice has 32 cells of 8 px. Here ``max_scale=None`` keeps that finest cell of 8 px at any
  resolution: max_scale = min(5, log2(nextpow2(size)) - 3), i.e. 5 at 256 px, 3 at 64 px, 2 at
  32 px. The noise is generated at the next power of two and cropped, as DRAEM.
* ``rotate_normal_images`` - DRAEM's ``MVTecDRAEMTrainDataset`` rotates 30 % of the *normal*
  training images (``torch.rand(1) > 0.7``, imgaug ``Affine(rotate=(-90, 90))``) before the anomaly
  is simulated, so the rotated image is also the reconstruction target. Bilinear, about the image
  centre, corners filled with 0 (black): imgaug's ``Affine`` defaults (order 1, mode constant,
  cval 0), on uint8 pixels with the result rounded back to uint8 as imgaug returns it.
* ``AnomalySource`` - the anomaly-source set A: images of a folder (DTD in the paper), resized to the
  training resolution, or, with no folder, a deterministic *procedural* texture (coloured fractal
  Perlin noise, stripes, a checkerboard, or two-colour Perlin blobs, with random colours, scales and
  angles). Each drawn texture then gets 3 distinct random transforms out of DRAEM's list of 10
  (gamma contrast, brightness multiply/add, sharpness, hue/saturation (approximated by a
  per-channel colour shift), solarize with p 0.5, posterize 1-8 bits, invert, autocontrast,
  equalize, rotation by +-45 degrees), implemented here in torch (DRAEM uses imgaug).
* ``synthesize_anomalies`` - DRAEM's blend: with probability ``p_anomalous`` an image gets a mask M
  and a texture A, and I_a = (1 - M) * I + (1 - beta) * M * I + beta * M * A with beta uniform in
  [0.1, 1.0) (DRAEM paper and anomalib: the opacity of the texture; DRAEM's code draws the texture
  opacity in (0.2, 1.0]: pass ``beta=(0.2, 1.0)`` for that); otherwise I_a = I and M = 0.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from clbench.data import load_rgb8

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
DRAEM_MAX_SCALE = 5  # 2^5 lattice cells at 256 px (DRAEM: torch.randint(0, 6), exclusive bound)
MIN_CELL_PIXELS = 8  # DRAEM's finest cell: 256 / 2^5


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


def rotate_normal_images(
    pixels: torch.Tensor, generator: torch.Generator, *, p: float = 0.3, degrees: float = 90.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's rotation of normal training images: each of the (B, C, H, W) uint8 images is rotated
    with probability ``p`` by an angle uniform in [-degrees, degrees] (counter-clockwise positive,
    as torchvision's ``rotate``), bilinear, corners black, rounded back to uint8.

    Returns the images and the angles (B,), NaN where an image was left as it is. ``p == 0`` draws
    nothing from the generator and returns the input unchanged.
    """
    if pixels.dtype != torch.uint8:
        raise ValueError(f"rotate_normal_images: uint8 pixels expected, got {pixels.dtype}")
    if pixels.shape[-1] != pixels.shape[-2]:
        raise ValueError(f"rotate_normal_images: square images expected, got {tuple(pixels.shape[-2:])}")
    angles = torch.full((pixels.shape[0],), math.nan)
    if p <= 0:
        return pixels, angles
    out = pixels.clone()
    with single_thread():
        for i in range(pixels.shape[0]):
            if not _coin(generator, p):
                continue
            angles[i] = float(_uniform(generator, -degrees, degrees))
            out[i] = _rotate(pixels[i].float(), float(angles[i])).round().clamp(0, 255).to(torch.uint8)
    return out, angles


def default_max_scale(size: int) -> int:
    """Largest lattice exponent whose cells stay >= 8 px (DRAEM's 5 at 256 px)."""
    return int(min(DRAEM_MAX_SCALE, max(0, round(math.log2(next_pow2(size) / MIN_CELL_PIXELS)))))


def perlin_scales(size: int, generator: torch.Generator, *, min_scale: int = 0, max_scale: int | None = None) -> tuple[int, int]:
    """The mask's lattice (rows, cols): 2^a, 2^b with a, b uniform in [min_scale, max_scale]."""
    n = next_pow2(size)
    top = default_max_scale(size) if max_scale is None else min(int(max_scale), int(math.log2(n)))
    low = min(int(min_scale), top)
    return 2 ** _randint(generator, low, top), 2 ** _randint(generator, low, top)


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
    res_y, res_x = perlin_scales(size, generator, min_scale=min_scale, max_scale=max_scale)
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


def _sharpness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """imgaug's ``pillike.EnhanceSharpness()`` (PIL ``ImageEnhance.Sharpness``), factor U[0, 2]:
    blend of PIL's SMOOTH-filtered image (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, border pixels
    kept) and the image."""
    factor = float(_uniform(g, 0.0, 2.0))
    kernel = torch.ones(3, 3)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13).expand(x.shape[0], 1, 3, 3)
    smooth = x.clone()
    smooth[:, 1:-1, 1:-1] = F.conv2d(x.unsqueeze(0), kernel, groups=x.shape[0]).squeeze(0)
    return smooth + factor * (x - smooth)


def _colour_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # stands in for hue/saturation
    return x + _uniform(g, -50.0, 50.0, (3, 1, 1)) / 255


def _solarize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """imgaug's ``Solarize(0.5, threshold=(32, 128))``: with probability 0.5 invert values >= threshold."""
    threshold = float(_uniform(g, 32.0, 128.0)) / 255
    if not _coin(g, 0.5):
        return x
    return torch.where(x >= threshold, 1 - x, x)


def _posterize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """imgaug's ``Posterize()``: keep 1 to 8 bits."""
    step = 2 ** (8 - _randint(g, 1, 8))
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
    _gamma, _brightness, _sharpness, _colour_shift, _solarize, _posterize, _invert, _autocontrast, _equalize,
    _rotate_texture,
)  # DRAEM's 10 augmenters, in its order


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
            cached = torch.from_numpy(load_rgb8(self.paths[index], self.size).copy()).permute(2, 0, 1).contiguous()
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
    "perlin_noise", "perlin_scales", "procedural_texture", "rotate_normal_images", "synthesize_anomalies",
]
