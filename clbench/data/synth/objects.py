"""The six object categories of the synthetic dataset: each a renderer ``(rng, size) -> Scene`` (the
object shifted and rotated a little per image, with the layers its defects need)."""
from __future__ import annotations

import numpy as np

from clbench.data.synth.primitives import (
    Array, Rng, Scene, _coords, _cov, _fill, _frame, _gray, _mix, _noise, _sd_box, _sd_hex, _sd_round_box, _shade,
    _smooth,
)


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
