"""Generation profiles: how many images of which size each synthetic category gets.

``default`` is the small set the quickstart, CI and tests use (the same counts for every category,
one size for all). ``mvtec`` gives each of the 15 synthetic categories the train/test counts and
original image side of one MVTec AD category, so that a full-scale run (3,629 train and 1,725
test images of 700-1024 px, resized on load like the real thing) can be measured without the
real dataset. Source: Bergmann et al., "MVTec AD", CVPR 2019, Table 1 (the totals, 3,629 train +
1,725 test = 5,354 images, match the paper's abstract; anomalib lists only the category names).

The mapping pairs categories by name where they share one (capsule, screw, tile, transistor,
wood, zipper), then by kind and look: the grayscale texture ``brushed_metal`` takes MVTec's
grayscale ``grid``, so the three grayscale categories are the same as MVTec's (grid, screw,
zipper). The pairing decides counts and sizes only; what is drawn stays the synthetic category.

Counts scaled by ``count_scale`` round half up and never drop a non-empty split to zero
(``scaled``); a category's defective images are split over its defect types as evenly as
possible, the first types taking one more (``split_defects``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from clbench.data.synth.catalogue import _SPECS


PROFILES = ("default", "mvtec")
DEFAULT_SIZE = 128
DEFAULT_COUNTS = (40, 8, 4)  # train good, test good, test per defect type


@dataclass(frozen=True)
class MVTecCategory:
    """One MVTec AD category's numbers: train good, test good, test defective, original side (px)."""

    name: str
    n_train: int
    n_test_good: int
    n_test_defective: int
    size: int


# synthetic category -> the MVTec AD category whose counts and original size it takes
MVTEC: dict[str, MVTecCategory] = {
    "stripes": MVTecCategory("toothbrush", 60, 12, 30, 1024),
    "nut": MVTecCategory("metal_nut", 220, 22, 93, 700),
    "checker": MVTecCategory("cable", 224, 58, 92, 1024),
    "capsule": MVTecCategory("capsule", 219, 23, 109, 1000),
    "wood": MVTecCategory("wood", 247, 19, 60, 1024),
    "screw": MVTecCategory("screw", 320, 41, 119, 1024),
    "granite": MVTecCategory("leather", 245, 32, 92, 1024),
    "bottle_cap": MVTecCategory("bottle", 209, 20, 63, 900),
    "weave": MVTecCategory("carpet", 280, 28, 89, 1024),
    "transistor": MVTecCategory("transistor", 213, 60, 40, 1024),
    "dots": MVTecCategory("pill", 267, 26, 141, 800),
    "zipper": MVTecCategory("zipper", 240, 32, 119, 1024),
    "brushed_metal": MVTecCategory("grid", 264, 21, 57, 1024),
    "tile": MVTecCategory("tile", 230, 33, 84, 840),
    "blobs": MVTecCategory("hazelnut", 391, 40, 70, 1024),
}


@dataclass(frozen=True)
class Plan:
    """What one category gets: image side, train and test-good counts, test count per defect type."""

    size: int
    n_train: int
    n_test_good: int
    n_defect: dict[str, int]


def scaled(n: int, scale: float) -> int:
    """``n * scale`` rounded half up; a non-empty split keeps at least one image."""
    return 0 if n == 0 else max(1, math.floor(n * scale + 0.5))


def split_defects(total: int, defects: tuple[str, ...]) -> dict[str, int]:
    """``total`` images over the defect types as evenly as possible, the first types one more."""
    q, r = divmod(total, len(defects))
    return {d: q + (i < r) for i, d in enumerate(defects)}


def plan(profile: str, name: str, size: int | None, counts: tuple[int, int, int] | None,
         count_scale: float = 1.0) -> Plan:
    """The plan for category ``name`` (arguments validated by the caller). ``size`` None: the
    profile's size; ``counts`` (train, test good, test per defect) only for ``default``."""
    defects = _SPECS[name].defects
    if profile == "mvtec":
        m = MVTEC[name]
        total = scaled(m.n_test_defective, count_scale)
        return Plan(size or m.size, scaled(m.n_train, count_scale), scaled(m.n_test_good, count_scale),
                    split_defects(total, defects))
    n_train, n_good, n_per = counts or DEFAULT_COUNTS
    per = scaled(n_per, count_scale)
    return Plan(size or DEFAULT_SIZE, scaled(n_train, count_scale), scaled(n_good, count_scale),
                {d: per for d in defects})


def settings(profile: str, seed: int, p: Plan) -> dict:
    """What the folder's marker records for a category (a category is regenerated when it differs).
    The default profile's record is the one older versions wrote, so their folders stay up to date."""
    if profile == "default":
        per = next(iter(p.n_defect.values()))
        return dict(size=p.size, seed=seed, n_train=p.n_train, n_test_good=p.n_test_good, n_test_per_defect=per)
    return dict(profile=profile, size=p.size, seed=seed, n_train=p.n_train, n_test_good=p.n_test_good,
                n_test_defective=dict(p.n_defect))
