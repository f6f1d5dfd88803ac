"""The task stream: which categories, in which order, and which of them each step teaches.

A *schedule* is the list of steps, each a tuple of the categories taught together at that step.
Every ``tasks:`` form of before (a list, ``all``, a count, a preset) teaches one category per step;
a list of lists and the protocol presets (``<order>:<setting>``, e.g. ``mvtec:10-5``; a bare setting
such as ``10-5`` over the first N sorted categories of any dataset) teach several per step.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Sequence

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # alphabetical: UCAD's order, and IUF's (its MVTec 3x5 configs c3, c6, ... end at capsule, ...)
# VisA's 12 objects, alphabetical (UCAD; IUF's VisA 8-4 last step tests pipe_fryum).
VISA_CATEGORIES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
# The 10-category order used by the benchmark paper's code.
PAPER_ORDER: tuple[str, ...] = (
    "hazelnut", "bottle", "cable", "capsule", "metal_nut", "pill", "toothbrush", "transistor", "zipper", "screw",
)
# DNE's MVTec order (dataset_order 1, the default: vijaylee/Continual_Anomaly_Detection,
# datasets/utils/__init__.py, get_mvtec_classes); its 'one' setting is 10 base classes then 1 per step.
DNE_ORDER: tuple[str, ...] = (
    "leather", "bottle", "metal_nut", "grid", "screw", "zipper", "tile", "hazelnut", "toothbrush",
    "wood", "transistor", "pill", "carpet", "capsule", "cable",
)
PRESETS: dict[str, tuple[str, ...]] = {"mvtec": MVTEC_CATEGORIES, "paper10": PAPER_ORDER, "visa": VISA_CATEGORIES,
                                       "dne": DNE_ORDER}
# A preset that is a protocol by itself: DNE's 10 base classes, then one per step.
PROTOCOL_ALIASES: dict[str, str] = {"dne": "dne:10-1x5"}
KEYWORDS = ("all", *PRESETS)
ORDERS = ("given", "shuffle")
# A setting: parts joined by '-', each 'N' (one step of N) or 'NxK' (K steps of N): 14-1, 10-1x5, 3x5.
SETTING = re.compile(r"[0-9]+(x[0-9]+)?(-[0-9]+(x[0-9]+)?)*")

Schedule = list[tuple[str, ...]]


def parse_protocol(spec: Any) -> tuple[str | None, list[int]] | None:
    """``(preset or None, step sizes)`` if ``spec`` is a protocol string, else None. A bare count
    (``"3"``) is not a protocol; a malformed one (``mvtec:10-x``, ``cars:3x5``) is a ValueError."""
    if not isinstance(spec, str):
        return None
    text = PROTOCOL_ALIASES.get(spec.strip(), spec.strip())
    if ":" in text:
        preset, _, setting = (part.strip() for part in text.partition(":"))
        if preset not in PRESETS:
            raise ValueError(f"tasks: '{spec}': unknown preset '{preset}' (presets: {', '.join(PRESETS)})")
    elif SETTING.fullmatch(text) and not text.isdigit():
        preset, setting = None, text
    else:
        return None
    if not SETTING.fullmatch(setting):
        raise ValueError(f"tasks: '{spec}': '{setting}' is not a setting such as 14-1, 10-5, 3x5 or 10-1x5")
    sizes: list[int] = []
    for part in setting.split("-"):
        size, _, times = part.partition("x")
        sizes += [int(size)] * int(times or 1)
    if 0 in sizes:
        raise ValueError(f"tasks: '{spec}': a step of 0 categories")
    if preset is not None and sum(sizes) > len(PRESETS[preset]):
        raise ValueError(f"tasks: '{spec}' needs {sum(sizes)} categories, preset {preset} has {len(PRESETS[preset])}")
    return preset, sizes


def step_sizes(spec: Any) -> list[int] | None:
    """How many categories each step teaches; None: one per step (every form but protocols and lists of lists)."""
    protocol = parse_protocol(spec)
    if protocol is not None:
        return protocol[1]
    if isinstance(spec, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in spec):
        return [len(item) if isinstance(item, (list, tuple)) else 1 for item in spec]
    return None


def spec_problem(spec: Any) -> str | None:
    """Why ``spec`` is not a task spec (None if it is): what a config can say before any data is read."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int, list)):
        return f"got {spec!r}"
    if isinstance(spec, list):
        for item in spec:
            if isinstance(item, list):
                if not item or not all(isinstance(t, str) for t in item):
                    return f"a step must be a non-empty list of category names, got {item!r}"
            elif not isinstance(item, str):
                return f"expected category names or lists of them, got {item!r}"
        return None
    try:
        parse_protocol(spec)
    except ValueError as err:
        return str(err).removeprefix("tasks: ")
    return None


def normalize_spec(spec: Any) -> int | str | list[str]:
    """The categories a spec uses, one form per meaning, whoever wrote it (a flag, YAML): ``" 2"``
    is the count 2, ``"a, b"`` the list [a, b], a keyword stays a keyword and any other word is one
    category. Steps are left out (``step_sizes`` has them): a bare protocol ``10-5`` is the count
    15, ``mvtec:10-5`` the list of its 15 categories, a list of lists the flat list."""
    if isinstance(spec, bool):
        raise ValueError(f"tasks: expected a list, 'all', a preset or a count, got {spec!r}")
    if isinstance(spec, int):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.isdigit():
            return int(text)
        protocol = parse_protocol(text)
        if protocol is not None:
            preset, sizes = protocol
            return sum(sizes) if preset is None else list(PRESETS[preset][: sum(sizes)])
        if "," in text:
            return [t.strip() for t in text.split(",") if t.strip()]
        if text in KEYWORDS:
            return text
        return [text] if text else []
    return [name for item in spec for name in (item if isinstance(item, (list, tuple)) else [item])]


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
    N (the first N sorted); a preset name (``mvtec``, ``paper10``, ``visa``, ``dne``); a list of
    lists or a protocol (their categories, flat: ``resolve_schedule`` has the steps).
    ``order="shuffle"`` applies a seeded permutation. Every name must be an available category.
    ``root`` (named in every error) and ``incomplete`` (its folders without train/good) only make
    the errors say what is wrong.
    """
    if order not in ORDERS:
        raise ValueError(f"task_order: unknown value '{order}' (use one of: {', '.join(ORDERS)})")
    where = f" in {root}" if root is not None else ""
    available_sorted = sorted(available)
    protocol = _protocol_text(spec, available_sorted, where)
    spec = normalize_spec(spec)
    if protocol is None:
        _check_unambiguous(spec, available_sorted, where)
    if not available_sorted:
        raise ValueError(f"tasks: no categories{where} (a category is a folder with train/good)"
                         + _incomplete_note(incomplete))
    if isinstance(spec, int):
        if not 1 <= spec <= len(available_sorted):
            if protocol is not None:
                raise ValueError(f"tasks: {protocol} needs {spec} categories, {len(available_sorted)} found{where} "
                                 f"({', '.join(available_sorted)})")
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
            if protocol is not None and name not in incomplete:
                raise ValueError(f"tasks: {protocol} needs category '{name}', not found{where} "
                                 f"(available: {', '.join(available_sorted) or 'none'})")
            raise ValueError(_unknown_message(name, available_sorted, where, incomplete))
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: duplicate categories in {names}")
    if order == "shuffle":
        random.Random(seed).shuffle(names)
    return names


def resolve_schedule(
    spec: Any,
    available: Sequence[str],
    order: str = "given",
    seed: int = 0,
    *,
    root: str | Path | None = None,
    incomplete: Sequence[str] = (),
) -> Schedule:
    """The steps a spec teaches: ``resolve_tasks``'s categories (shuffled if asked) cut into the
    spec's step sizes (one category per step for every form but protocols and lists of lists).
    ``shuffle`` permutes the categories and keeps the step sizes."""
    if isinstance(spec, (list, tuple)) and any(isinstance(item, (list, tuple)) and not item for item in spec):
        raise ValueError(f"tasks: a step with no categories in {list(spec)}")
    names = resolve_tasks(spec, available, order, seed, root=root, incomplete=incomplete)
    sizes = step_sizes(spec) or [1] * len(names)
    schedule: Schedule = []
    start = 0
    for size in sizes:
        schedule.append(tuple(names[start:start + size]))
        start += size
    return schedule


def as_schedule(tasks: Sequence[Any]) -> Schedule:
    """A resolved ``tasks`` value (a flat list: one category per step; or a list of steps, each a
    category or a list of them) as a schedule."""
    return [tuple(item) if isinstance(item, (list, tuple)) else (item,) for item in tasks]


def schedule_value(schedule: Sequence[Sequence[str]]) -> list[Any]:
    """The schedule as ``config.yaml`` writes ``tasks``: the flat list when every step teaches one
    category (as before protocols existed), else the list of steps."""
    if all(len(step) == 1 for step in schedule):
        return [step[0] for step in schedule]
    return [list(step) for step in schedule]


def categories_of(tasks: Sequence[Any]) -> list[str]:
    """Every category of a resolved ``tasks`` value or schedule, in stream order."""
    return [name for step in as_schedule(tasks) for name in step]


def step_label(names: Sequence[str]) -> str:
    """What the results call a step's trained task(s): the category, ``a+b`` or ``a+b+c``, and for
    larger steps ``first+...+last (N)``, short enough for a matrix row and a plot tick."""
    if len(names) <= 3:
        return "+".join(names)
    return f"{names[0]}+...+{names[-1]} ({len(names)})"


def _protocol_text(spec: Any, available: list[str], where: str) -> str | None:
    """The protocol a spec names (its text, for errors), None if it is none; a protocol's text that
    is also a category is refused (either could be meant)."""
    if parse_protocol(spec) is None:
        return None
    text = spec.strip()
    if text in available:
        raise ValueError(f"tasks: '{text}' is both a protocol and a category{where}: "
                         f"write it as a list for the category (tasks: [{text}], --tasks {text},)")
    return text


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
