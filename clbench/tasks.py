"""The task stream: which categories, in which order, one task each."""
from __future__ import annotations

import random
from typing import Sequence

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
# The 10-category order used by the benchmark paper's code.
PAPER_ORDER: tuple[str, ...] = (
    "hazelnut", "bottle", "cable", "capsule", "metal_nut", "pill", "toothbrush", "transistor", "zipper", "screw",
)
PRESETS: dict[str, tuple[str, ...]] = {"mvtec": MVTEC_CATEGORIES, "paper10": PAPER_ORDER}
ORDERS = ("given", "shuffle")


def resolve_tasks(
    spec: str | int | Sequence[str], available: Sequence[str], order: str = "given", seed: int = 0
) -> list[str]:
    """Turn a task spec into the ordered list of categories.

    ``spec``: a list of names; ``"all"`` (every available category, sorted); an int N (the first
    N sorted); or a preset name (``mvtec``, ``paper10``). ``order="shuffle"`` applies a seeded
    permutation. Every name must be an available category.
    """
    available_sorted = sorted(available)
    if isinstance(spec, bool):
        raise ValueError(f"tasks: expected a list, 'all', a preset or a count, got {spec!r}")
    if isinstance(spec, int):
        if not 1 <= spec <= len(available_sorted):
            raise ValueError(f"tasks: count {spec} out of range 1..{len(available_sorted)} (categories available)")
        names = available_sorted[:spec]
    elif isinstance(spec, str):
        if spec == "all":
            names = available_sorted
        elif spec in PRESETS:
            names = list(PRESETS[spec])
        else:
            raise ValueError(f"tasks: unknown spec '{spec}' (use a list of categories, 'all', a count or a preset: {', '.join(PRESETS)})")
    else:
        names = list(spec)
    if not names:
        raise ValueError("tasks: empty task list")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"tasks: unknown category '{unknown[0]}' (available: {', '.join(available_sorted)})")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: duplicate categories in {names}")
    if order not in ORDERS:
        raise ValueError(f"task_order: unknown value '{order}' (use one of: {', '.join(ORDERS)})")
    if order == "shuffle":
        random.Random(seed).shuffle(names)
    return names
