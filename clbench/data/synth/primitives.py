"""What the synthetic dataset is drawn with: the ``Scene`` a renderer hands to the defect painters, a
category's ``_Spec``, and the drawing primitives (coordinates, value noise, signed distances, blobs,
strokes), all in image fractions so that shapes scale with the image size."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage


Array = np.ndarray
Rng = np.random.Generator
Color = tuple[float, float, float]


# --------------------------------------------------------------------------------------------
# Scene: what a renderer hands to the defect painters
# --------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """A clean render plus the layers defects need (all float32, HxWx3 in [0, 1])."""

    image: Array
    place: Array | None = None  # bool HxW: where surface defects may land (None: anywhere)
    parts: Array | None = None  # bool HxW: structure a missing_part can remove
    under: Array | None = None  # what a removed part reveals
    misprint: Callable[[Rng], tuple[Array, Array]] | None = None  # -> (wrong print image, coverage)


@dataclass(frozen=True)
class _Spec:
    """A category: how to draw it, its defect types and the colours of foreign matter on it."""

    render: Callable[[Rng, int], Scene]
    defects: tuple[str, ...]
    kind: str  # "texture" or "object"
    stain: Color
    foreign: Color
    gray: bool = False


# --------------------------------------------------------------------------------------------
# Drawing primitives
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _coords(s: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (y, x) as fractions of the image side, so shapes scale with size."""
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    y, x = np.meshgrid(c, c, indexing="ij")
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def _noise(rng: Rng, s: int, cells_y: int, cells_x: int | None = None) -> Array:
    """Smooth value noise (unit std): a coarse random grid upsampled bicubically; anisotropic if asked."""
    cells_x = cells_y if cells_x is None else cells_x
    grid = rng.standard_normal((cells_y + 1, cells_x + 1)).astype(np.float32)
    out = np.asarray(Image.fromarray(grid).resize((s, s), Image.Resampling.BICUBIC), dtype=np.float32)
    return out / (out.std() + 1e-6)


def _shade(rng: Rng, s: int, cells: int, amount: float) -> Array:
    """Multiplicative surface grain, HxWx1."""
    return (1.0 + amount * _noise(rng, s, cells))[..., None]


def _smooth(e0: float, e1: float, v: Array) -> Array:
    t = np.clip((v - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _cov(sd: Array, s: int) -> Array:
    """Anti-aliased coverage of the region ``sd < 0`` (sd in image fractions, 1-pixel ramp)."""
    return np.clip(0.5 - sd * s, 0.0, 1.0).astype(np.float32)


def _mix(a: Array | Color, b: Array | Color, t: Array) -> Array:
    """Blend a -> b by t (HxW); a and b are colours or HxWx3 images."""
    a = np.asarray(a, np.float32)
    return (a + (np.asarray(b, np.float32) - a) * t[..., None]).astype(np.float32, copy=False)


def _fill(s: int, color: Color) -> Array:
    return np.broadcast_to(np.asarray(color, np.float32), (s, s, 3)).copy()


def _gray(v: Array) -> Array:
    return np.repeat(v[..., None].astype(np.float32), 3, axis=2)


def _frame(rng: Rng, s: int, jitter: float, rot_deg: float) -> tuple[Array, Array]:
    """Object-local coordinates (lx, ly) after a random shift of +-jitter and rotation of +-rot_deg."""
    y, x = _coords(s)
    cy = 0.5 + rng.uniform(-jitter, jitter)
    cx = 0.5 + rng.uniform(-jitter, jitter)
    a = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    dx, dy = x - cx, y - cy
    return dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)


def _sd_box(lx: Array, ly: Array, hx: float, hy: float) -> Array:
    qx, qy = np.abs(lx) - hx, np.abs(ly) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _sd_round_box(lx: Array, ly: Array, hx: float, hy: float, r: float) -> Array:
    return _sd_box(lx, ly, hx - r, hy - r) - r


def _sd_hex(lx: Array, ly: Array, r: float) -> Array:
    """Signed distance to a hexagon of inradius r (flat top and bottom)."""
    kx, ky, kz = -0.8660254, 0.5, 0.57735027
    px, py = np.abs(ly), np.abs(lx)
    d = np.minimum(kx * px + ky * py, 0.0)
    px, py = px - 2 * d * kx, py - 2 * d * ky
    px = px - np.clip(px, -kz * r, kz * r)
    py = py - r
    return np.hypot(px, py) * np.sign(py)


def _blob(rng: Rng, s: int, cy: float, cx: float, r: float, wobble: float = 0.25, soft: float = 0.0) -> Array:
    """Coverage of an irregular disc (radius modulated by low harmonics); ``soft`` widens the edge."""
    y, x = _coords(s)
    dy, dx = y - cy, x - cx
    theta = np.arctan2(dy, dx)
    rr = np.full_like(theta, r)
    for k in range(2, 6):
        rr += r * rng.uniform(0, wobble) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    sd = np.hypot(dy, dx) - rr
    if soft > 0:
        return (1.0 - _smooth(-soft * r, 0.0, sd)).astype(np.float32)
    return _cov(sd, s)


def _bezier(p0: Array, p1: Array, p2: Array, s: int) -> Array:
    """Points (y, x) densely along a quadratic Bezier curve (two per pixel of length)."""
    length = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)
    t = np.linspace(0, 1, int(length * s * 2) + 2)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _walk(rng: Rng, start: Array, length: float, s: int, turn: float = 0.5) -> Array:
    """Points along a jagged random walk (a crack), densely resampled."""
    step = 0.02
    angle = rng.uniform(0, 2 * np.pi)
    vertices = [np.asarray(start, np.float64)]
    for _ in range(max(2, int(length / step))):
        angle += rng.normal(0, turn)
        vertices.append(vertices[-1] + step * np.array([np.sin(angle), np.cos(angle)]))
    n = max(2, int(step * s * 2))
    t = np.linspace(0, 1, n, endpoint=False)[:, None]
    segs = [a + (b - a) * t for a, b in zip(vertices[:-1], vertices[1:])]
    return np.concatenate(segs + [vertices[-1][None]])


def _stroke(s: int, pts: Array, width_px: float) -> Array:
    """Coverage of a stroke of ``width_px`` pixels along points (y, x) given in image fractions."""
    canvas = np.ones((s, s), bool)
    iy = np.clip((pts[:, 0] * s).astype(int), 0, s - 1)
    ix = np.clip((pts[:, 1] * s).astype(int), 0, s - 1)
    canvas[iy, ix] = False
    dist = ndimage.distance_transform_edt(canvas)
    return np.clip(width_px / 2 + 0.5 - dist, 0, 1).astype(np.float32)


def _pick(rng: Rng, where: Array | None, margin: float = 0.12) -> tuple[float, float]:
    """A random point (y, x) in image fractions: on ``where`` if given, else away from the border."""
    if where is None or not where.any():
        return tuple(rng.uniform(margin, 1 - margin, 2))  # type: ignore[return-value]
    s = where.shape[0]
    idx = rng.choice(np.flatnonzero(where))
    return ((idx // s + 0.5) / s, (idx % s + 0.5) / s)


def _edge(mask: Array) -> Array:
    return mask & ~ndimage.binary_erosion(mask, iterations=2)
