"""Defect types of the synthetic dataset and their painters: ``(scene, spec, rng, size) ->
(defective image, candidate region)``; the exact mask is what the painted defect visibly changed
(``render``)."""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from clbench.data.synth.primitives import (
    Array, Rng, Scene, _bezier, _blob, _coords, _edge, _gray, _mix, _noise, _pick, _Spec, _stroke, _walk,
)


DEFECT_TYPES = (
    "scratch", "hole", "color_spot", "stain", "missing_part", "contamination", "deformation", "crack", "print_error",
)


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
