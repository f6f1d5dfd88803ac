"""Built-in procedural dataset in MVTec AD layout (the default data for the quickstart and tests).

No real dataset can be downloaded everywhere, so this module draws one: 15 categories (9
textures, 6 objects; 3 grayscale), each with its own palette and structure, normal images that
vary like real captures (random texture phase, small object shift/rotation, lighting and sensor
noise) and 3-5 defect types with *exact* masks::

    <out>/<category>/train/good/000.png
    <out>/<category>/test/good/000.png
    <out>/<category>/test/<defect>/000.png
    <out>/<category>/ground_truth/<defect>/000_mask.png    (mode "L", 0/255)

A mask is exactly the set of pixels the defect changed by at least ``CHANGE_THRESHOLD`` grey
levels (far above the sensor noise); every other pixel equals the clean render bit for bit.

Categories and defects (``describe()`` prints this table):

    stripes        texture RGB  scratch, color_spot, hole, deformation
    nut            object  RGB  scratch, hole, missing_part, print_error, contamination
    checker        texture RGB  color_spot, crack, print_error, scratch
    capsule        object  RGB  crack, print_error, missing_part, deformation, color_spot
    wood           texture RGB  scratch, hole, color_spot, crack
    screw          object  L    scratch, missing_part, contamination, deformation
    granite        texture RGB  hole, color_spot, crack, contamination
    bottle_cap     object  RGB  crack, contamination, missing_part, color_spot
    weave          texture RGB  hole, contamination, color_spot, deformation
    transistor     object  RGB  missing_part, deformation, contamination, print_error
    dots           texture RGB  missing_part, print_error, color_spot, contamination
    zipper         object  L    missing_part, contamination, deformation, scratch
    brushed_metal  texture L    scratch, hole, stain, contamination
    tile           texture RGB  crack, hole, color_spot, missing_part
    blobs          texture RGB  scratch, hole, color_spot, contamination

Every image has its own generator, seeded by (seed, category, split, index), so a category's
images do not depend on which other categories are generated, nor on the order.

clbench never deletes or overwrites what it did not generate: ``synthesize`` (``clbench data
synth``, runs) writes only into a new or empty folder, which it marks with ``MARKER`` (listing the
categories and settings it generated there), or into a folder so marked; ``generate`` replaces an
existing category only if that marker lists it.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["CATEGORY_NAMES", "GRAYSCALE_CATEGORIES", "DEFECT_TYPES", "MARKER", "generate", "synthesize", "describe",
           "render_sample"]

Array = np.ndarray
Rng = np.random.Generator
Color = tuple[float, float, float]

MARKER = ".clbench-synthetic.json"  # marks a folder clbench generated; lists the categories it wrote there
STAGING_MARKER = ".clbench-staging"  # marks a staging folder as clbench's (only those are cleaned up)
MIN_SIZE = 32
CHANGE_THRESHOLD = 26  # grey levels (of 255): a masked pixel changed by at least this; noise sigma is ~3
MIN_DEFECT_FRACTION = 0.004  # of the image area; defects are redrawn until they fall in range
MAX_DEFECT_FRACTION = 0.09
MAX_DEFECT_TRIES = 40
NOISE_SIGMA = 0.012  # sensor noise, fraction of full scale
DEFECT_TYPES = (
    "scratch", "hole", "color_spot", "stain", "missing_part", "contamination", "deformation", "crack", "print_error",
)
_SPLITS = {"train": 0, "test_good": 1}  # defect splits use 2 + index in DEFECT_TYPES (append only!)


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


# --------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------


def _texture_misprint(s: int, alternative: Callable[[], Array]) -> Callable[[Rng], tuple[Array, Array]]:
    """A print error on a texture: a blob where the pattern is printed out of register."""

    def misprint(rng: Rng) -> tuple[Array, Array]:
        cy, cx = _pick(rng, None)
        return alternative(), _blob(rng, s, cy, cx, rng.uniform(0.07, 0.14), 0.3)

    return misprint


def _stripes(rng: Rng, s: int) -> Scene:
    """Navy/mustard diagonal stripes, random phase, slightly wavy."""
    y, x = _coords(s)
    angle = np.deg2rad(35.0 + rng.normal(0, 1.5))
    wave = 0.004 * _noise(rng, s, 3)
    u = (x * np.cos(angle) + y * np.sin(angle) + wave) / 0.125
    t = _smooth(-0.45, 0.45, np.sin(2 * np.pi * u + rng.uniform(0, 2 * np.pi)))
    return Scene(_mix((0.12, 0.2, 0.55), (0.93, 0.78, 0.25), t) * _shade(rng, s, 24, 0.04))


def _checker_image(s: int, oy: float, ox: float, grain: Array, angle: float = 0.0) -> Array:
    y, x = _coords(s)
    cell = 0.125
    if angle:
        x, y = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    v = np.sin(np.pi * (x + ox) / cell) * np.sin(np.pi * (y + oy) / cell)
    t = np.clip(0.5 + v * (s * cell / np.pi), 0, 1)
    return _mix((0.93, 0.9, 0.82), (0.72, 0.1, 0.15), t) * grain


def _checker(rng: Rng, s: int) -> Scene:
    """Crimson/ivory checkerboard at a random offset; a misprint is a patch printed askew.

    (A patch merely shifted would look normal inside: the offset is random anyway.)"""
    oy, ox = rng.uniform(0, 0.25, 2)
    grain = _shade(rng, s, 20, 0.03)
    angle = np.deg2rad(rng.uniform(25, 45)) * rng.choice([-1, 1])
    return Scene(
        _checker_image(s, oy, ox, grain),
        misprint=_texture_misprint(s, lambda: _checker_image(s, oy, ox, grain, angle)),
    )


def _wood(rng: Rng, s: int) -> Scene:
    """Horizontal wood grain: warped dark growth lines over fine streaks."""
    y, _ = _coords(s)
    warp = _noise(rng, s, 3)
    streak = _noise(rng, s, 40, 3)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (y * 6.0 + 0.25 * warp) + rng.uniform(0, 2 * np.pi))
    t = np.clip(0.7 * rings**3 + 0.12 * streak + 0.15, 0, 1)
    return Scene(_mix((0.8, 0.58, 0.34), (0.42, 0.24, 0.1), t))


def _granite(rng: Rng, s: int) -> Scene:
    """Lavender 'blue pearl' granite: dark and pale mineral grains on a mottled violet base."""
    base = _mix((0.52, 0.42, 0.68), (0.4, 0.33, 0.56), _smooth(-1, 1, _noise(rng, s, 5)))
    img = _mix(base, (0.2, 0.15, 0.3), 0.6 * _smooth(0.9, 1.3, _noise(rng, s, 32)))
    img = _mix(img, (0.8, 0.76, 0.9), 0.6 * _smooth(1.0, 1.4, _noise(rng, s, 36)))
    return Scene(img * _shade(rng, s, 48, 0.04))


def _weave(rng: Rng, s: int) -> Scene:
    """Green plain-weave fabric: alternating over/under threads with rounded profiles."""
    y, x = _coords(s)
    p = 1 / 12
    u = (x + rng.uniform(0, 2 * p)) / p
    v = (y + rng.uniform(0, 2 * p)) / p
    over = ((np.floor(u) + np.floor(v)) % 2) == 0
    weft = _mix((0.06, 0.18, 0.1), (0.55, 0.78, 0.45), np.sin(np.pi * (v % 1)) ** 0.6)
    warp = _mix((0.06, 0.18, 0.1), (0.22, 0.52, 0.32), np.sin(np.pi * (u % 1)) ** 0.6)
    return Scene(np.where(over[..., None], weft, warp) * _shade(rng, s, 40, 0.04))


def _dots_layer(s: int, oy: float, ox: float) -> Array:
    y, x = _coords(s)
    p = 0.125
    du = ((x + ox) / p) % 1 - 0.5
    dv = ((y + oy) / p) % 1 - 0.5
    return _cov(np.hypot(du, dv) * p - 0.34 * p, s)


def _dots(rng: Rng, s: int) -> Scene:
    """Magenta dots on a cream ground; a missing dot shows the ground, a misprint is a ghost print
    (a second, offset impression: a plain shift would look normal inside, the offset being random)."""
    oy, ox = rng.uniform(0, 0.125, 2)
    ground = _fill(s, (0.96, 0.93, 0.82)) * _shade(rng, s, 16, 0.02)
    ink = (0.75, 0.12, 0.55)
    dots = _dots_layer(s, oy, ox)
    offset = rng.uniform(0.04, 0.085)

    def ghost() -> Array:
        return _dots_layer(s, oy + offset, ox + offset)

    return Scene(
        _mix(ground, ink, dots),
        parts=dots > 0,
        under=ground,
        misprint=_texture_misprint(s, lambda: _mix(ground, ink, np.maximum(dots, ghost()))),
    )


def _brushed_metal(rng: Rng, s: int) -> Scene:
    """Grey brushed metal: long horizontal streaks under a soft light gradient (grayscale)."""
    _, x = _coords(s)
    light = 0.56 + 0.08 * (x - 0.5) + 0.03 * _noise(rng, s, 2)
    v = light + 0.045 * _noise(rng, s, 64, 2) + 0.02 * _noise(rng, s, 96, 8)
    return Scene(_gray(v))


def _blobs(rng: Rng, s: int) -> Scene:
    """Teal camouflage: thresholded low-frequency noise in three tones."""
    img = _mix((0.1, 0.5, 0.58), (0.03, 0.2, 0.3), 0.8 * _smooth(-0.2, 0.2, _noise(rng, s, 14)))
    img = _mix(img, (0.8, 0.78, 0.55), 0.8 * _smooth(0.7, 0.95, _noise(rng, s, 20)))
    return Scene(img * _shade(rng, s, 32, 0.03))


def _tile(rng: Rng, s: int) -> Scene:
    """Terracotta tiles with light grout; a chipped tile reveals grey substrate."""
    y, x = _coords(s)
    p = 0.25
    u = (x + rng.uniform(0, p)) / p
    v = (y + rng.uniform(0, p)) / p
    fu, fv = u % 1, v % 1
    dist = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) * p
    tiles = _cov(0.016 - dist, s)  # tile where far from a grout line
    gains = 1.0 + 0.04 * rng.standard_normal((8, 8)).astype(np.float32)
    gain = gains[np.floor(v).astype(int) % 8, np.floor(u).astype(int) % 8][..., None]
    surface = _fill(s, (0.78, 0.42, 0.26)) * gain * _shade(rng, s, 40, 0.06)
    grout = _fill(s, (0.74, 0.73, 0.7)) * _shade(rng, s, 30, 0.04)
    substrate = _fill(s, (0.42, 0.41, 0.4)) * _shade(rng, s, 30, 0.08)
    image = _mix(grout, surface, tiles)
    return Scene(image, parts=tiles > 0, under=_mix(grout, substrate, tiles))


# --------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------


def _nut(rng: Rng, s: int) -> Scene:
    """Brass hex nut on slate blue with a dashed red printed circle; misprint: circle off-centre."""
    background = _fill(s, (0.16, 0.2, 0.3)) * _shade(rng, s, 6, 0.05)
    lx, ly = _frame(rng, s, 0.03, 5)
    r = np.hypot(lx, ly)
    theta = np.arctan2(ly, lx)
    body = _cov(_sd_hex(lx, ly, 0.3), s) * _cov(0.14 - r, s)
    brass = _fill(s, (0.84, 0.67, 0.32)) * (0.9 - 0.5 * ly)[..., None]
    thread = _cov(r - 0.175, s) * (0.6 + 0.4 * np.sin(24 * theta))
    face = _mix(brass, (0.5, 0.38, 0.18), thread)

    def ring(dy: float, dx: float) -> Array:
        rr, th = np.hypot(lx - dx, ly - dy), np.arctan2(ly - dy, lx - dx)
        return _cov(np.abs(rr - 0.235) - 0.011, s) * _smooth(-0.4, 0.0, np.sin(3 * th))

    def compose(print_cov: Array) -> Array:
        return _mix(background, _mix(face, (0.75, 0.08, 0.08), print_cov), body)

    printed = ring(0.0, 0.0)

    def misprint(r_: Rng) -> tuple[Array, Array]:
        a, d = r_.uniform(0, 2 * np.pi), r_.uniform(0.03, 0.05)
        return compose(ring(d * np.sin(a), d * np.cos(a)) * (body > 0.99)), np.ones((s, s), np.float32)

    return Scene(
        compose(printed * (body > 0.99)), place=body > 0.5, parts=body > 0, under=background, misprint=misprint
    )


def _glyphs(lx: Array, ly: Array, s: int, dy: float = 0.0, dx: float = 0.0, drop: int = -1) -> Array:
    """Coverage of three printed 'O' glyphs on the capsule's white half."""
    cov = np.zeros_like(lx)
    for i, gx in enumerate((0.07, 0.14, 0.21)):
        if i != drop:
            sd = np.abs(_sd_round_box(lx - gx - dx, ly - dy, 0.026, 0.045, 0.015)) - 0.0075
            cov = np.maximum(cov, _cov(sd, s))
    return cov


def _capsule(rng: Rng, s: int) -> Scene:
    """Orange/white pill on near-black with printed glyphs."""
    background = _fill(s, (0.08, 0.08, 0.09)) * _shade(rng, s, 6, 0.08)
    lx, ly = _frame(rng, s, 0.03, 3)
    body = _cov(np.hypot(np.maximum(np.abs(lx) - 0.24, 0), ly) - 0.12, s)
    shade = np.clip(1.0 - 0.45 * (ly / 0.12) ** 2, 0.4, 1.0) + 0.12 * np.exp(-(((ly + 0.05) / 0.02) ** 2))
    shell = _mix((0.93, 0.45, 0.08), (0.95, 0.94, 0.9), np.clip(0.5 + lx * s, 0, 1)) * shade[..., None]

    def compose(glyphs: Array) -> Array:
        return _mix(background, _mix(shell, (0.15, 0.15, 0.17), glyphs), body)

    def misprint(r_: Rng) -> tuple[Array, Array]:
        if r_.random() < 0.4:
            wrong = _glyphs(lx, ly, s, drop=int(r_.integers(0, 3)))
        else:
            wrong = _glyphs(lx, ly, s, dy=r_.uniform(0.025, 0.04) * r_.choice([-1, 1]), dx=r_.uniform(-0.02, 0.02))
        return compose(wrong * (body > 0.99)), np.ones((s, s), np.float32)

    printed = _glyphs(lx, ly, s) * (body > 0.99)
    return Scene(compose(printed), place=body > 0.5, parts=body > 0, under=background, misprint=misprint)


def _screw(rng: Rng, s: int) -> Scene:
    """Bright threaded screw (side view) on a dark ground, grayscale."""
    background = 0.12 * (1.0 + 0.1 * _noise(rng, s, 6))
    lx, ly = _frame(rng, s, 0.03, 6)
    half = 0.05 * np.clip((lx + 0.38) / 0.1, 0, 1)
    shaft = _cov(np.maximum(np.maximum(np.abs(ly) - half, -0.38 - lx), lx - 0.19), s)
    head = _cov(_sd_round_box(lx - 0.235, ly, 0.05, 0.12, 0.02), s)
    threads = 0.72 + 0.28 * np.sin(2 * np.pi * (lx + 0.3 * ly) / 0.035)
    metal_shaft = 0.85 * np.clip(1.0 - 0.5 * (ly / 0.05) ** 2, 0.3, 1.0) * threads
    metal_head = 0.78 * np.clip(1.0 - 0.3 * (ly / 0.12) ** 2, 0.5, 1.0)
    metal = np.where(lx > 0.185, metal_head, metal_shaft)
    cover = np.maximum(shaft, head)
    image = background * (1 - cover) + metal * cover
    return Scene(_gray(image), place=cover > 0.5, parts=cover > 0, under=_gray(background))


def _bottle_cap(rng: Rng, s: int) -> Scene:
    """Red knurled bottle cap from above on white, with a white printed ring and centre dot."""
    background = _fill(s, (0.88, 0.88, 0.85)) * _shade(rng, s, 6, 0.03)
    lx, ly = _frame(rng, s, 0.03, 10)
    r = np.hypot(lx, ly)
    theta = np.arctan2(ly, lx)
    cap = _cov(r - 0.36, s)
    red = _fill(s, (0.8, 0.1, 0.12)) * (1.0 - 0.6 * r)[..., None]
    knurl = _cov(0.315 - r, s) * (0.5 + 0.5 * np.sin(48 * theta))
    top = _mix(red, (0.45, 0.04, 0.06), knurl)
    printed = np.maximum(_cov(np.abs(r - 0.2) - 0.011, s), _cov(r - 0.05, s))
    top = _mix(top, (0.95, 0.93, 0.9), printed)
    return Scene(_mix(background, top, cap), place=cap > 0.5, parts=cap > 0, under=background)


def _transistor(rng: Rng, s: int) -> Scene:
    """Black transistor body with a metal tab and three legs on beige; printed label on the body."""
    background = _fill(s, (0.86, 0.8, 0.66)) * _shade(rng, s, 6, 0.03)
    lx, ly = _frame(rng, s, 0.025, 3)
    metal = _fill(s, (0.78, 0.78, 0.8))
    tab = _cov(_sd_box(lx, ly + 0.25, 0.17, 0.09), s) * _cov(0.04 - np.hypot(lx, ly + 0.27), s)
    legs = np.zeros_like(lx)
    for gx in (-0.12, 0.0, 0.12):
        legs = np.maximum(legs, _cov(_sd_box(lx - gx, ly - 0.265, 0.022, 0.135), s))
    leg_metal = metal * np.clip(1.0 - 0.4 * (((lx + 0.06) % 0.12 - 0.06) / 0.022) ** 2, 0.5, 1)[..., None]
    body = _cov(_sd_box(lx, ly + 0.02, 0.2, 0.15), s)
    housing = _fill(s, (0.1, 0.1, 0.12)) * (1.0 + 0.6 * (ly + 0.17))[..., None]
    base = _mix(_mix(background, metal, tab), leg_metal, legs)

    def label(dy: float = 0.0, dx: float = 0.0, drop: int = -1) -> Array:
        cov = np.zeros_like(lx)
        for i, (row, half) in enumerate(((-0.07, 0.12), (-0.01, 0.09), (0.05, 0.12))):
            if i != drop:
                cov = np.maximum(cov, _cov(_sd_box(lx - dx, ly - row - dy, half, 0.012), s))
        return cov * (body > 0.99)

    def compose(text: Array) -> Array:
        return _mix(base, _mix(housing, (0.92, 0.92, 0.9), text), body)

    def misprint(r_: Rng) -> tuple[Array, Array]:
        if r_.random() < 0.4:
            return compose(label(drop=int(r_.integers(0, 3)))), np.ones((s, s), np.float32)
        shift = r_.uniform(0.025, 0.04) * r_.choice([-1, 1])
        return compose(label(dy=shift, dx=r_.uniform(-0.03, 0.03))), np.ones((s, s), np.float32)

    place = (np.maximum(np.maximum(tab, legs), body)) > 0.5
    return Scene(compose(label()), place=place, parts=legs > 0, under=_mix(background, metal, tab), misprint=misprint)


def _zipper(rng: Rng, s: int) -> Scene:
    """Zipper: two rows of interlocking bright teeth on grey woven tape, grayscale."""
    y, x = _coords(s)
    tape = 0.42 + 0.035 * np.sin(2 * np.pi * x * 40) * np.sin(2 * np.pi * y * 40) + 0.02 * _noise(rng, s, 32)
    cx = 0.5 + rng.uniform(-0.015, 0.015)
    tape = tape - 0.12 * _cov(np.abs(np.abs(x - cx) - 0.14) - 0.006, s)  # stitching
    p, phase = 0.0625, rng.uniform(0, 1)
    teeth = np.zeros_like(x)
    shade = np.zeros_like(x)
    for side, shift in ((-1, 0.0), (1, 0.5)):
        ty = (((y / p - phase + shift) % 1) - 0.5) * p
        cov = _cov(_sd_round_box(x - (cx + side * 0.04), ty, 0.06, 0.36 * p, 0.01), s)
        teeth = np.maximum(teeth, cov)
        shade = np.where(cov > 0, 0.86 * (1.0 - 0.35 * (ty / (0.36 * p)) ** 2), shade)
    image = tape * (1 - teeth) + shade * teeth
    return Scene(_gray(image), parts=teeth > 0, under=_gray(tape))


# --------------------------------------------------------------------------------------------
# Defect painters: (scene, spec, rng, size) -> (defective image, candidate region)
# --------------------------------------------------------------------------------------------


def _contrast_tone(image: Array) -> Array:
    """Per pixel, near-white on dark surfaces and near-black on light ones: a scratch always shows."""
    light = image.mean(axis=2, keepdims=True) < 0.5
    return np.where(light, np.float32(0.93), np.float32(0.07)) * np.ones(3, np.float32)


def _scratch(sc: Scene, spec: _Spec, rng: Rng, s: int) -> tuple[Array, Array]:
    cy, cx = _pick(rng, sc.place)
    length = rng.uniform(0.22, 0.5)
    a = rng.uniform(0, np.pi)
    d = np.array([np.sin(a), np.cos(a)])
    c = np.array([cy, cx])
    bend = np.array([-d[1], d[0]]) * rng.uniform(-0.25, 0.25) * length
    width = max(1.0, rng.uniform(0.016, 0.03) * s)
    cov = _stroke(s, _bezier(c - d * length / 2, c + bend, c + d * length / 2, s), width)
    if sc.place is not None:
        cov = cov * sc.place
    return _mix(sc.image, _contrast_tone(sc.image), 0.9 * cov), cov > 0


def _hole(sc: Scene, spec: _Spec, rng: Rng, s: int) -> tuple[Array, Array]:
    cy, cx = _pick(rng, sc.place)
    r = rng.uniform(0.035, 0.085)
    cov = _blob(rng, s, cy, cx, r, 0.15)
    if sc.place is not None:
        cov = cov * sc.place
    y, x = _coords(s)
    depth = np.clip(np.hypot(y - cy, x - cx) / r, 0, 1)  # a little lighter towards the rim
    inside = _gray(0.03 + 0.08 * depth**2)
    return _mix(sc.image, inside, cov), cov > 0


def _color_spot(sc: Scene, spec: _Spec, rng: Rng, s: int) -> tuple[Array, Array]:
    cy, cx = _pick(rng, sc.place)
    cov = _blob(rng, s, cy, cx, rng.uniform(0.05, 0.13), 0.35, soft=0.35)
    if sc.place is not None:
        cov = cov * sc.place
    tone = np.clip(np.asarray(spec.stain) * (1 + rng.normal(0, 0.06, 3)), 0, 1)
    if spec.gray:
        tone = np.full(3, tone.mean())
    return _mix(sc.image, tone, rng.uniform(0.6, 0.85) * cov), cov > 0


def _missing_part(sc: Scene, spec: _Spec, rng: Rng, s: int) -> tuple[Array, Array]:
    assert sc.parts is not None and sc.under is not None, "category has no removable parts"
    cy, cx = _pick(rng, sc.parts)
    cov = _blob(rng, s, cy, cx, rng.uniform(0.08, 0.16), 0.3)
    return _mix(sc.image, sc.under, cov), cov > 0


def _contamination(sc: Scene, spec: _Spec, rng: Rng, s: int) -> tuple[Array, Array]:
    cy, cx = _pick(rng, sc.place)
    if rng.random() < 0.5:  # a foreign particle
        cov = _blob(rng, s, cy, cx, rng.uniform(0.03, 0.07), 0.45)
    else:  # a fibre / hair
        length = rng.uniform(0.25, 0.45)
        a = rng.uniform(0, np.pi)
        d = np.array([np.sin(a), np.cos(a)])
        c = np.array([cy, cx])
        bend = np.array([-d[1], d[0]]) * rng.uniform(0.2, 0.5) * length * rng.choice([-1, 1])
        cov = _stroke(s, _bezier(c - d * length / 2, c + bend, c + d * length / 2, s), max(1.5, 0.025 * s))
    matter = np.asarray(spec.foreign, np.float32) * (1.0 + 0.12 * _noise(rng, s, 16))[..., None]
    if spec.gray:
        matter = _gray(matter.mean(axis=2))
    return _mix(sc.image, np.clip(matter, 0, 1), cov), cov > 0


def _deformation(sc: Scene, spec: _Spec, rng: Rng, s: int) -> tuple[Array, Array]:
    """A local swirl: on objects centred on an outline so the shape itself bends."""
    where = _edge(sc.place) if sc.place is not None else (sc.parts if sc.parts is not None else None)
    cy, cx = _pick(rng, where)
    radius = rng.uniform(0.09, 0.15)
    y, x = _coords(s)
    dy, dx = y - cy, x - cx
    fall = np.clip(1.0 - np.hypot(dy, dx) / radius, 0, 1) ** 2
    a = rng.uniform(1.2, 2.2) * rng.choice([-1, 1]) * fall
    sy = cy + dy * np.cos(a) - dx * np.sin(a)
    sx = cx + dy * np.sin(a) + dx * np.cos(a)
    coords = np.stack([sy * s - 0.5, sx * s - 0.5])
    warped = np.stack(
        [ndimage.map_coordinates(sc.image[..., c], coords, order=1, mode="nearest") for c in range(3)], axis=2
    )
    return warped.astype(np.float32), fall > 0


def _crack(sc: Scene, spec: _Spec, rng: Rng, s: int) -> tuple[Array, Array]:
    start = np.array(_pick(rng, sc.place))
    length = rng.uniform(0.25, 0.5)
    pts = _walk(rng, start, length, s)
    if rng.random() < 0.6:
        pts = np.concatenate([pts, _walk(rng, pts[len(pts) // 2], length * 0.4, s)])
    cov = _stroke(s, pts, max(1.0, rng.uniform(0.012, 0.022) * s))
    if sc.place is not None:
        cov = cov * sc.place
    return _mix(sc.image, _gray(np.full((s, s), 0.04)), cov), cov > 0


def _print_error(sc: Scene, spec: _Spec, rng: Rng, s: int) -> tuple[Array, Array]:
    assert sc.misprint is not None, "category has no print"
    wrong, cov = sc.misprint(rng)
    return _mix(sc.image, wrong, cov), cov > 0


_PAINTERS: dict[str, Callable[[Scene, _Spec, Rng, int], tuple[Array, Array]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "color_spot": _color_spot,
    "stain": _color_spot,
    "missing_part": _missing_part,
    "contamination": _contamination,
    "deformation": _deformation,
    "crack": _crack,
    "print_error": _print_error,
}

# --------------------------------------------------------------------------------------------
# The categories
# --------------------------------------------------------------------------------------------

_SPECS: dict[str, _Spec] = {
    "stripes": _Spec(
        _stripes, ("scratch", "color_spot", "hole", "deformation"), "texture",
        stain=(0.55, 0.05, 0.08), foreign=(0.1, 0.6, 0.2),
    ),
    "nut": _Spec(
        _nut, ("scratch", "hole", "missing_part", "print_error", "contamination"), "object",
        stain=(0.1, 0.5, 0.8), foreign=(0.92, 0.92, 0.95),
    ),
    "checker": _Spec(
        _checker, ("color_spot", "crack", "print_error", "scratch"), "texture",
        stain=(0.15, 0.4, 0.85), foreign=(0.2, 0.6, 0.2),
    ),
    "capsule": _Spec(
        _capsule, ("crack", "print_error", "missing_part", "deformation", "color_spot"), "object",
        stain=(0.35, 0.2, 0.65), foreign=(0.3, 0.7, 0.3),
    ),
    "wood": _Spec(
        _wood, ("scratch", "hole", "color_spot", "crack"), "texture",
        stain=(0.12, 0.25, 0.5), foreign=(0.2, 0.7, 0.3),
    ),
    "screw": _Spec(
        _screw, ("scratch", "missing_part", "contamination", "deformation"), "object",
        stain=(0.3, 0.3, 0.3), foreign=(0.35, 0.35, 0.35), gray=True,
    ),
    "granite": _Spec(
        _granite, ("hole", "color_spot", "crack", "contamination"), "texture",
        stain=(0.15, 0.6, 0.3), foreign=(0.95, 0.8, 0.1),
    ),
    "bottle_cap": _Spec(
        _bottle_cap, ("crack", "contamination", "missing_part", "color_spot"), "object",
        stain=(0.25, 0.6, 0.25), foreign=(0.15, 0.2, 0.85),
    ),
    "weave": _Spec(
        _weave, ("hole", "contamination", "color_spot", "deformation"), "texture",
        stain=(0.7, 0.15, 0.55), foreign=(0.97, 0.85, 0.3),
    ),
    "transistor": _Spec(
        _transistor, ("missing_part", "deformation", "contamination", "print_error"), "object",
        stain=(0.2, 0.4, 0.8), foreign=(0.85, 0.2, 0.2),
    ),
    "dots": _Spec(
        _dots, ("missing_part", "print_error", "color_spot", "contamination"), "texture",
        stain=(0.2, 0.6, 0.85), foreign=(0.3, 0.22, 0.08),
    ),
    "zipper": _Spec(
        _zipper, ("missing_part", "contamination", "deformation", "scratch"), "object",
        stain=(0.15, 0.15, 0.15), foreign=(0.08, 0.08, 0.08), gray=True,
    ),
    "brushed_metal": _Spec(
        _brushed_metal, ("scratch", "hole", "stain", "contamination"), "texture",
        stain=(0.2, 0.2, 0.2), foreign=(0.95, 0.95, 0.95), gray=True,
    ),
    "tile": _Spec(
        _tile, ("crack", "hole", "color_spot", "missing_part"), "texture",
        stain=(0.12, 0.18, 0.45), foreign=(0.2, 0.6, 0.3),
    ),
    "blobs": _Spec(
        _blobs, ("scratch", "hole", "color_spot", "contamination"), "texture",
        stain=(0.9, 0.3, 0.08), foreign=(0.95, 0.92, 0.2),
    ),
}

CATEGORY_NAMES: tuple[str, ...] = tuple(_SPECS)
GRAYSCALE_CATEGORIES: frozenset[str] = frozenset(n for n, spec in _SPECS.items() if spec.gray)


def describe() -> str:
    """One line per category: name, kind, image mode and defect types."""
    lines = []
    for name, spec in _SPECS.items():
        lines.append(f"{name:<14} {spec.kind:<7} {'L' if spec.gray else 'RGB':<4} {', '.join(spec.defects)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Sampling: clean render -> lighting + sensor noise -> uint8, and exact defect masks
# --------------------------------------------------------------------------------------------


def _rng(seed: int, category: str, split: int, index: int) -> Rng:
    """One generator per image so images never depend on what else is generated."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), split, index])


def _capture(rng: Rng, s: int, gray: bool) -> Callable[[Array], Array]:
    """The camera for one shot: lighting gain, colour cast and sensor noise, applied identically to
    the clean and the defective render so that only the defect differs."""
    gain = np.float32(1.0 + rng.normal(0, 0.03)) * (1.0 + rng.normal(0, 0.01, 3)).astype(np.float32)
    noise = rng.standard_normal((s, s, 1 if gray else 3), dtype=np.float32) * np.float32(NOISE_SIGMA)
    if gray:
        gain = np.full(3, gain.mean(), np.float32)

    def shoot(image: Array) -> Array:
        return np.clip(np.rint((image * gain + noise) * 255.0), 0, 255).astype(np.uint8)

    return shoot


def _changed(clean: Array, defective: Array, region: Array) -> Array:
    """Pixels of ``region`` visibly changed, without isolated specks of 1-2 pixels."""
    diff = np.abs(defective.astype(np.int16) - clean.astype(np.int16)).max(axis=2)
    mask = region & (diff >= CHANGE_THRESHOLD)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n:
        sizes = np.bincount(labels.ravel())
        mask &= sizes[labels] >= 3
    return mask


def _paint(spec: _Spec, defect: str, scene: Scene, shoot: Callable[[Array], Array], rng: Rng, s: int,
           clean: Array) -> tuple[Array, Array]:
    """Draw the defect until its exact mask covers a plausible fraction of the image."""
    best: tuple[float, Array, Array] | None = None
    for _ in range(MAX_DEFECT_TRIES):
        image, region = _PAINTERS[defect](scene, spec, rng, s)
        defective = shoot(image)
        mask = _changed(clean, defective, region)
        frac = float(mask.mean())
        if MIN_DEFECT_FRACTION <= frac <= MAX_DEFECT_FRACTION:
            return np.where(mask[..., None], defective, clean), mask
        miss = MIN_DEFECT_FRACTION / frac if frac < MIN_DEFECT_FRACTION and frac > 0 else frac / MAX_DEFECT_FRACTION
        if frac > 0 and (best is None or miss < best[0]):
            best = (miss, np.where(mask[..., None], defective, clean), mask)
    if best is None:
        raise RuntimeError(f"could not draw a visible {defect!r} defect")
    return best[1], best[2]


def render_sample(category: str, split: str = "train", index: int = 0, size: int = 128, seed: int = 0
                  ) -> tuple[Array, Array, Array | None]:
    """One sample as arrays: (clean HxWx3 uint8, image HxWx3 uint8, mask HxW bool or None).

    ``split`` is "train", "test_good" or a defect type of the category. For good samples the image
    is the clean render. The saved PNG is this image (channel 0 for grayscale categories).
    """
    if category not in _SPECS:
        raise ValueError(f"unknown category {category!r}: choose from {', '.join(CATEGORY_NAMES)}")
    size = _check_int("size", size, MIN_SIZE)
    spec = _SPECS[category]
    if split in _SPLITS:
        split_id = _SPLITS[split]
    elif split in spec.defects:
        split_id = 2 + DEFECT_TYPES.index(split)
    else:
        raise ValueError(f"split={split!r} is not 'train', 'test_good' or a defect of {category!r} {spec.defects}")
    rng = _rng(seed, category, split_id, index)
    scene = spec.render(rng, size)
    shoot = _capture(rng, size, spec.gray)
    clean = shoot(scene.image)
    if split_id < 2:
        return clean, clean, None
    image, mask = _paint(spec, split, scene, shoot, rng, size, clean)
    return clean, image, mask


# --------------------------------------------------------------------------------------------
# Writing: one category at a time into a staging folder, renamed into place when complete
# --------------------------------------------------------------------------------------------


def _save_png(path: Path, pixels: Array, gray: bool) -> None:
    Image.fromarray(pixels[..., 0] if gray and pixels.ndim == 3 else pixels).save(path, compress_level=1)


def _write_category(folder: Path, name: str, size: int, seed: int, n_train: int, n_test_good: int,
                    n_test_per_defect: int) -> None:
    """Write every image and mask of one category under ``folder`` (which must not exist)."""
    spec = _SPECS[name]
    width = max(3, len(str(max(n_train, n_test_good, n_test_per_defect) - 1)))
    jobs = [("train", folder / "train" / "good", n_train), ("test_good", folder / "test" / "good", n_test_good)]
    jobs += [(d, folder / "test" / d, n_test_per_defect) for d in spec.defects]
    for split, target, count in jobs:
        if count == 0 and split != "train":
            continue  # an empty test folder would only make loaders fail
        target.mkdir(parents=True)
        mask_dir = folder / "ground_truth" / split
        if split in spec.defects:
            mask_dir.mkdir(parents=True)
        for i in range(count):
            _, image, mask = render_sample(name, split, i, size, seed)
            _save_png(target / f"{i:0{width}d}.png", image, spec.gray)
            if mask is not None:
                _save_png(mask_dir / f"{i:0{width}d}_mask.png", mask.astype(np.uint8) * 255, True)


def _publish(staged: Path, target: Path, staging: Path) -> None:
    """Replace ``target`` (a category of clbench's own, checked before) by the complete ``staged``
    folder; the old one is moved aside into the staging folder first."""
    if target.exists() or target.is_symlink():
        old = staging / f"old-{target.name}"
        os.rename(target, old)
    os.rename(staged, target)


def _generate_category(out: Path, name: str, size: int, seed: int, counts: tuple[int, int, int]) -> None:
    """Build the category in a hidden staging folder (no ``train/good`` at its top, so loaders never
    mistake it for a category) and rename it into place only once complete."""
    staging = Path(tempfile.mkdtemp(prefix=f".synth-{name}-{os.getpid()}-", dir=out))
    try:
        (staging / STAGING_MARKER).touch()  # what lets a later generation recognise it as clbench's
        staged = staging / name
        _write_category(staged, name, size, seed, *counts)
        _publish(staged, out / name, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(out: Path) -> None:
    """Delete staging folders left by generations that were killed (their process is gone); only
    folders clbench marked as its staging, never a user's folder that happens to match the name."""
    for path in out.glob(".synth-*"):
        match = re.fullmatch(r"\.synth-[a-z0-9_]+-(\d+)-[a-z0-9_]+", path.name)
        if (match and path.is_dir() and not path.is_symlink() and (path / STAGING_MARKER).is_file()
                and not _alive(int(match.group(1)))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but is not ours
    return True


def _resolve_categories(categories: int | Sequence[str]) -> list[str]:
    if isinstance(categories, (int, np.integer)) and not isinstance(categories, bool):
        if not 1 <= categories <= len(CATEGORY_NAMES):
            raise ValueError(f"categories={categories} is out of range: choose 1..{len(CATEGORY_NAMES)}")
        return list(CATEGORY_NAMES[: int(categories)])
    names = [categories] if isinstance(categories, str) else list(categories)
    if not names:
        raise ValueError("categories=[] is empty: give a count or at least one name")
    for name in names:
        if name not in _SPECS:
            raise ValueError(f"unknown category {name!r}: choose from {', '.join(CATEGORY_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"categories={names} has duplicates")
    return names


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Ownership: clbench writes categories only where it may, and replaces only what it generated
# --------------------------------------------------------------------------------------------


def read_marker(out: Path) -> dict | None:
    """The marker of a folder clbench generated (None: not marked). A marker without a
    ``categories`` record (written by older versions) is returned as ``{}``."""
    path = Path(out) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_state(out: Path) -> str:
    """``missing``, ``empty`` (may be claimed), ``marked`` (clbench's), ``file`` or ``foreign`` (the user's)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return "missing"
    if not out.is_dir():
        return "file"
    if (out / MARKER).is_file():
        return "marked"
    try:
        return "foreign" if any(out.iterdir()) else "empty"
    except OSError:
        return "foreign"


def _owned(out: Path, marker: dict | None, name: str) -> bool:
    """Whether category ``name`` under ``out`` is clbench's: listed in the marker (an old marker
    without a list: any category of a generated name in a marked folder)."""
    if marker is None:
        return False
    recorded = marker.get("categories")
    return name in recorded if isinstance(recorded, dict) else name in _SPECS


def _refuse_foreign_categories(out: Path, names: Sequence[str]) -> None:
    """A same-named category clbench did not generate is never replaced: refused before anything is written."""
    marker = read_marker(out)
    for name in names:
        target = out / name
        if (target.exists() or target.is_symlink()) and not _owned(out, marker, name):
            raise ValueError(f"{target}: exists and was not generated by clbench (not listed in {out / MARKER}): "
                             "not replacing it; choose another --out")


def _record(out: Path, names: Sequence[str], settings: dict) -> None:
    """Mark ``out`` as clbench's and list the categories about to be generated (before they are,
    so a killed generation is recognised and completed later)."""
    from clbench import atomic

    marker = read_marker(out)
    recorded = (marker or {}).get("categories")
    if not isinstance(recorded, dict):  # a new folder, or an old marker: list what it already generated
        recorded = {n: {} for n in _SPECS if marker is not None and (out / n).is_dir()}
    recorded.update({name: dict(settings) for name in names})
    atomic.write_json(out / MARKER, {"generator": "clbench.synth", "categories": recorded})


def _up_to_date(out: Path, name: str, settings: dict) -> bool:
    """A category generated before with the same settings (categories are published complete and
    are deterministic): nothing to write."""
    recorded = (read_marker(out) or {}).get("categories")
    return (isinstance(recorded, dict) and recorded.get(name) == settings
            and (out / name / "train" / "good").is_dir())


def _validated(categories: int | Sequence[str], size: int, seed: int, counts: dict[str, int],
               workers: int | None) -> tuple[list[str], int, int, tuple[int, int, int], int]:
    """Every argument checked (one-line ValueError) before anything is written."""
    names = _resolve_categories(categories)
    size = _check_int("size", size, MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    n = tuple(_check_int(k, v, 0) for k, v in counts.items())
    workers = _auto_workers(len(names)) if workers is None else _check_int("workers", workers, 1)
    return names, size, seed, n, workers  # type: ignore[return-value]


def generate(
    out_dir: str | Path,
    categories: int | Sequence[str] = 15,
    size: int = 128,
    seed: int = 0,
    n_train: int = 40,
    n_test_good: int = 8,
    n_test_per_defect: int = 4,
    workers: int | None = None,
) -> list[str]:
    """Write the dataset; return the category names written. Deterministic for (categories, size,
    seed, counts): a category's images are the same whatever else is generated with it, and
    whatever ``workers`` is.

    ``categories`` is a count (the first N of CATEGORY_NAMES) or a list of names. An existing
    category folder is replaced, only by a complete one, and only if clbench generated it (listed
    in the folder's marker, see ``synthesize``); a category of the user's is refused. ``workers``:
    processes writing categories in parallel (None: one per CPU when there are enough categories
    to pay off). This low-level call writes no marker: ``synthesize`` claims a folder.
    """
    counts = dict(n_train=n_train, n_test_good=n_test_good, n_test_per_defect=n_test_per_defect)
    names, size, seed, n, workers = _validated(categories, size, seed, counts, workers)
    out = Path(out_dir)
    _refuse_foreign_categories(out, names)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    jobs = [(out, name, size, seed, n) for name in names]
    if workers > 1 and len(names) > 1 and sys.platform.startswith("linux"):
        # fork: children only run numpy/Pillow code, and nothing needs re-importing (unlike spawn)
        with ProcessPoolExecutor(min(workers, len(names)), mp_context=multiprocessing.get_context("fork")) as pool:
            for future in [pool.submit(_generate_category, *job) for job in jobs]:
                future.result()
    else:
        for job in jobs:
            _generate_category(*job)  # type: ignore[arg-type]
    return names


def synthesize(
    out_dir: str | Path,
    categories: int | Sequence[str] = 15,
    size: int = 128,
    seed: int = 0,
    n_train: int = 40,
    n_test_good: int = 8,
    n_test_per_defect: int = 4,
    workers: int | None = None,
) -> list[str]:
    """``generate`` into a folder clbench owns (``clbench data synth`` and runs): a missing or empty
    folder is claimed (marked with ``MARKER``), a marked one is completed; any other folder, or a
    category of the user's in a marked one, is refused with one line before anything is written.
    Categories already generated there with the same settings are kept, not rewritten. A write
    that fails (read-only, disk full) is one line naming the folder."""
    counts = dict(n_train=n_train, n_test_good=n_test_good, n_test_per_defect=n_test_per_defect)
    names, size, seed, _, workers = _validated(categories, size, seed, counts, workers)
    out = Path(out_dir)
    state = folder_state(out)
    if state == "file":
        raise ValueError(f"{out}: is a file, not a folder")
    if state == "foreign":
        raise ValueError(f"{out}: exists, is not empty and is not a clbench synthetic dataset (no {MARKER}): "
                         "not writing into it; choose a new or empty folder")
    _refuse_foreign_categories(out, names)
    settings = dict(size=size, seed=seed, **counts)
    todo = [name for name in names if not _up_to_date(out, name, settings)]
    if not todo:
        return names
    try:
        out.mkdir(parents=True, exist_ok=True)
        _record(out, todo, settings)
        generate(out, todo, size, seed, workers=workers, **counts)
        return names
    except OSError as err:
        where = err.filename or out
        raise ValueError(f"{where}: cannot write the synthetic dataset ({err.strerror or err})") from None


def _auto_workers(n_categories: int) -> int:
    """One process per available CPU, but none extra for a few categories (start-up would dominate)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if n_categories < 4 else max(1, min(cpus, n_categories, 8))
