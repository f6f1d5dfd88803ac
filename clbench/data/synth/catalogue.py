"""The categories of the synthetic dataset: renderer, defect types, kind, colours of foreign matter,
image mode (``describe()`` prints the table in the package docstring)."""
from __future__ import annotations

from clbench.data.synth.objects import _bottle_cap, _capsule, _nut, _screw, _transistor, _zipper
from clbench.data.synth.primitives import _Spec
from clbench.data.synth.textures import (
    _blobs, _brushed_metal, _checker, _dots, _granite, _stripes, _tile, _weave, _wood,
)


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
