"""Built-in procedural dataset in MVTec AD layout (the default data for the quickstart and tests).

No real dataset can be downloaded everywhere, so this package draws one: 15 categories (9
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

``profiles``: ``default`` (the small set above: 40 train, 8 good, 4 per defect type) or ``mvtec``
(each category MVTec AD's counts and original size; see ``profiles.MVTEC`` for the pairing).

Every image has its own generator, seeded by (seed, category, split, index), so a category's
images do not depend on which other categories are generated, nor on the order.

clbench never deletes or overwrites what it did not generate: ``synthesize`` (``clbench data
synth``, runs) writes only into a new or empty folder, which it marks with ``MARKER`` (listing the
categories and settings it generated there), or into a folder so marked; ``generate`` replaces an
existing category only if that marker lists it.

Modules: ``primitives`` (``Scene``, drawing helpers), ``textures`` and ``objects`` (the renderers),
``defects`` (defect types and painters), ``catalogue`` (the categories), ``profiles`` (counts and
sizes per category), ``render`` (one sample and its exact mask), ``marker`` (which folders and
categories are clbench's) and ``writer`` (``generate``, ``synthesize``).
"""
from __future__ import annotations

from clbench.data.synth.catalogue import CATEGORY_NAMES, GRAYSCALE_CATEGORIES, describe
from clbench.data.synth.defects import DEFECT_TYPES
from clbench.data.synth.marker import MARKER, folder_state, read_marker
from clbench.data.synth.render import (
    CHANGE_THRESHOLD, MAX_DEFECT_FRACTION, MIN_DEFECT_FRACTION, MIN_SIZE, NOISE_SIGMA, render_sample,
)
from clbench.data.synth.writer import STAGING_MARKER, generate, synthesize

__all__ = ["CATEGORY_NAMES", "GRAYSCALE_CATEGORIES", "DEFECT_TYPES", "MARKER", "generate", "synthesize", "describe",
           "render_sample", "read_marker", "folder_state", "STAGING_MARKER", "MIN_SIZE", "CHANGE_THRESHOLD",
           "MIN_DEFECT_FRACTION", "MAX_DEFECT_FRACTION", "NOISE_SIGMA"]
