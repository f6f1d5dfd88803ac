"""One synthetic sample: the clean render through a camera (lighting, colour cast, sensor noise) to
uint8, and a defect painted until its exact mask covers a plausible fraction of the image."""
from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
from scipy import ndimage

from clbench.data.synth.catalogue import _SPECS, CATEGORY_NAMES
from clbench.data.synth.defects import _PAINTERS, DEFECT_TYPES
from clbench.data.synth.primitives import Array, Rng, Scene, _Spec


MIN_SIZE = 32
CHANGE_THRESHOLD = 26  # grey levels (of 255): a masked pixel changed by at least this; noise sigma is ~3
MIN_DEFECT_FRACTION = 0.004  # of the image area; defects are redrawn until they fall in range
MAX_DEFECT_FRACTION = 0.09
MAX_DEFECT_TRIES = 40
NOISE_SIGMA = 0.012  # sensor noise, fraction of full scale
_SPLITS = {"train": 0, "test_good": 1}  # defect splits use 2 + index in DEFECT_TYPES (append only!)


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



def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)
