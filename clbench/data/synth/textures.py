"""The nine texture categories of the synthetic dataset: each a renderer ``(rng, size) -> Scene``."""
from __future__ import annotations

from typing import Callable

import numpy as np

from clbench.data.synth.primitives import (
    Array, Rng, Scene, _blob, _coords, _cov, _fill, _gray, _mix, _noise, _pick, _shade, _smooth,
)


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
