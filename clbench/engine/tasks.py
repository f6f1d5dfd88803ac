"""The task stream: which categories, in which order, one task each."""
from __future__ import annotations

import random
from pathlib import Path
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
KEYWORDS = ("all", *PRESETS)
ORDERS = ("given", "shuffle")


def normalize_spec(spec: str | int | Sequence[str]) -> int | str | list[str]:
    """One form per meaning, whoever wrote the spec (a flag, YAML): ``" 2"`` is the count 2,
    ``"a, b"`` the list [a, b], a keyword stays a keyword and any other word is one category."""
    if isinstance(spec, bool):
        raise ValueError(f"tasks: expected a list, 'all', a preset or a count, got {spec!r}")
    if isinstance(spec, int):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.isdigit():
            return int(text)
        if "," in text:
            return [t.strip() for t in text.split(",") if t.strip()]
        if text in KEYWORDS:
            return text
        return [text] if text else []
    return list(spec)


def is_counted(spec: str | int | Sequence[str]) -> bool:
    """A count or ``all``: categories are picked from the root, not named (presets name theirs)."""
    spec = normalize_spec(spec)
    return isinstance(spec, int) or spec == "all"


def resolve_tasks(
    spec: str | int | Sequence[str],
    available: Sequence[str],
    order: str = "given",
    seed: int = 0,
    *,
    root: str | Path | None = None,
    incomplete: Sequence[str] = (),
) -> list[str]:
    """Turn a task spec into the ordered list of categories.

    ``spec``: a list of names (or one name); ``"all"`` (every available category, sorted); a count
    N (the first N sorted); or a preset name (``mvtec``, ``paper10``). ``order="shuffle"`` applies a
    seeded permutation. Every name must be an available category. ``root`` (named in every error)
    and ``incomplete`` (its folders without train/good) only make the errors say what is wrong.
    """
    if order not in ORDERS:
        raise ValueError(f"task_order: unknown value '{order}' (use one of: {', '.join(ORDERS)})")
    where = f" in {root}" if root is not None else ""
    available_sorted = sorted(available)
    spec = normalize_spec(spec)
    _check_unambiguous(spec, available_sorted, where)
    if not available_sorted:
        raise ValueError(f"tasks: no categories{where} (a category is a folder with train/good)"
                         + _incomplete_note(incomplete))
    if isinstance(spec, int):
        if not 1 <= spec <= len(available_sorted):
            raise ValueError(f"tasks: count {spec} out of range 1..{len(available_sorted)} "
                             f"(categories{where}: {', '.join(available_sorted)})")
        names = available_sorted[:spec]
    elif spec == "all":
        names = available_sorted
    elif isinstance(spec, str):
        names = list(PRESETS[spec])
    else:
        names = list(spec)
    if not names:
        raise ValueError("tasks: empty task list")
    for name in names:
        if name not in available:
            raise ValueError(_unknown_message(name, available_sorted, where, incomplete))
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: duplicate categories in {names}")
    if order == "shuffle":
        random.Random(seed).shuffle(names)
    return names


def _check_unambiguous(spec: int | str | list[str], available: list[str], where: str) -> None:
    """A keyword or a count that is also a category's name could mean either: refused, with the way out."""
    if isinstance(spec, str) and spec in available:
        raise ValueError(f"tasks: '{spec}' is both a keyword and a category{where}: "
                         f"write it as a list for the category (tasks: [{spec}], --tasks {spec},)")
    if isinstance(spec, int):
        numbered = [name for name in available if name.isdigit() and int(name) == spec]
        if numbered:
            raise ValueError(f"tasks: {spec} is a count, but a category{where} is named '{numbered[0]}': "
                             f"write a list for categories (tasks: ['{numbered[0]}'], --tasks {numbered[0]},)")


def _unknown_message(name: str, available: list[str], where: str, incomplete: Sequence[str]) -> str:
    if name in incomplete:
        return (f"tasks: category '{name}'{where} has no train/good folder "
                "(every category needs one, with its good training images)")
    return f"tasks: unknown category '{name}'{where} (available: {', '.join(available) or 'none'})"


def _incomplete_note(incomplete: Sequence[str]) -> str:
    return f"; folders without train/good: {', '.join(incomplete)}" if incomplete else ""
