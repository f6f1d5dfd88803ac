"""Writing the synthetic dataset: ``generate`` (one category at a time into a staging folder, renamed
into place when complete) and ``synthesize`` (``generate`` into a folder clbench owns)."""
from __future__ import annotations

import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from clbench.data.synth.catalogue import _SPECS, CATEGORY_NAMES
from clbench.data.synth.marker import MARKER, _record, _refuse_foreign_categories, _up_to_date, folder_state
from clbench.data.synth.primitives import Array
from clbench.data.synth.profiles import DEFAULT_COUNTS, PROFILES, Plan, plan, settings
from clbench.data.synth.render import MIN_SIZE, _check_int, render_sample


STAGING_MARKER = ".clbench-staging"  # marks a staging folder as clbench's (only those are cleaned up)


# --------------------------------------------------------------------------------------------
# Writing: one category at a time into a staging folder, renamed into place when complete
# --------------------------------------------------------------------------------------------


def _save_png(path: Path, pixels: Array, gray: bool) -> None:
    Image.fromarray(pixels[..., 0] if gray and pixels.ndim == 3 else pixels).save(path, compress_level=1)


def _write_category(folder: Path, name: str, seed: int, plan: Plan) -> None:
    """Write every image and mask of one category under ``folder`` (which must not exist), one image
    at a time (memory stays at one image's layers however many are written)."""
    spec = _SPECS[name]
    size = plan.size
    width = max(3, len(str(max(plan.n_train, plan.n_test_good, *plan.n_defect.values()) - 1)))
    jobs = [("train", folder / "train" / "good", plan.n_train), ("test_good", folder / "test" / "good", plan.n_test_good)]
    jobs += [(d, folder / "test" / d, plan.n_defect[d]) for d in spec.defects]
    for split, target, count in jobs:
        if count == 0 and split != "train":
            continue  # an empty test folder would only make loaders fail
        target.mkdir(parents=True)
        mask_dir = folder / "ground_truth" / split
        if split in spec.defects:
            mask_dir.mkdir(parents=True)
        for i in range(count):
            _, image, mask = render_sample(name, split, i, size, seed)
            _save_png(target / f"{i:0{width}d}.png", image, spec.gray)
            if mask is not None:
                _save_png(mask_dir / f"{i:0{width}d}_mask.png", mask.astype(np.uint8) * 255, True)


def _publish(staged: Path, target: Path, staging: Path) -> None:
    """Replace ``target`` (a category of clbench's own, checked before) by the complete ``staged``
    folder; the old one is moved aside into the staging folder first."""
    if target.exists() or target.is_symlink():
        old = staging / f"old-{target.name}"
        os.rename(target, old)
    os.rename(staged, target)


def _generate_category(out: Path, name: str, seed: int, plan: Plan) -> None:
    """Build the category in a hidden staging folder (no ``train/good`` at its top, so loaders never
    mistake it for a category) and rename it into place only once complete."""
    staging = Path(tempfile.mkdtemp(prefix=f".synth-{name}-{os.getpid()}-", dir=out))
    try:
        (staging / STAGING_MARKER).touch()  # what lets a later generation recognise it as clbench's
        staged = staging / name
        _write_category(staged, name, seed, plan)
        _publish(staged, out / name, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(out: Path) -> None:
    """Delete staging folders left by generations that were killed (their process is gone); only
    folders clbench marked as its staging, never a user's folder that happens to match the name."""
    for path in out.glob(".synth-*"):
        match = re.fullmatch(r"\.synth-[a-z0-9_]+-(\d+)-[a-z0-9_]+", path.name)
        if (match and path.is_dir() and not path.is_symlink() and (path / STAGING_MARKER).is_file()
                and not _alive(int(match.group(1)))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but is not ours
    return True


def _resolve_categories(categories: int | Sequence[str]) -> list[str]:
    if isinstance(categories, (int, np.integer)) and not isinstance(categories, bool):
        if not 1 <= categories <= len(CATEGORY_NAMES):
            raise ValueError(f"categories={categories} is out of range: choose 1..{len(CATEGORY_NAMES)}")
        return list(CATEGORY_NAMES[: int(categories)])
    names = [categories] if isinstance(categories, str) else list(categories)
    if not names:
        raise ValueError("categories=[] is empty: give a count or at least one name")
    for name in names:
        if name not in _SPECS:
            raise ValueError(f"unknown category {name!r}: choose from {', '.join(CATEGORY_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"categories={names} has duplicates")
    return names



def _validated(categories: int | Sequence[str], size: int | None, seed: int, counts: dict[str, int | None],
               workers: int | None, profile: str, count_scale: float) -> tuple[list[str], int, dict[str, Plan], int]:
    """Every argument checked (one-line ValueError) before anything is written; the plan of each category."""
    names = _resolve_categories(categories)
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is unknown: choose from {', '.join(PROFILES)}")
    size = None if size is None else _check_int("size", size, MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    given = {k: _check_int(k, v, 0) for k, v in counts.items() if v is not None}
    if profile != "default" and given:
        key = next(iter(given))
        raise ValueError(f"{key}={given[key]}: the {profile} profile sets its own counts (scale them with count_scale)")
    if isinstance(count_scale, bool) or not isinstance(count_scale, (int, float)) or not 0 < count_scale < math.inf:
        raise ValueError(f"count_scale={count_scale!r} must be a positive number")
    n = tuple(given.get(k, default) for k, default in zip(counts, DEFAULT_COUNTS))
    workers = _auto_workers(len(names)) if workers is None else _check_int("workers", workers, 1)
    plans = {name: plan(profile, name, size, n, float(count_scale)) for name in names}  # type: ignore[arg-type]
    return names, seed, plans, workers


def generate(
    out_dir: str | Path,
    categories: int | Sequence[str] = 15,
    size: int | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_test_good: int | None = None,
    n_test_per_defect: int | None = None,
    workers: int | None = None,
    profile: str = "default",
    count_scale: float = 1.0,
) -> list[str]:
    """Write the dataset; return the category names written. Deterministic for (categories, size,
    seed, counts): a category's images are the same whatever else is generated with it, and
    whatever ``workers`` is.

    ``categories`` is a count (the first N of CATEGORY_NAMES) or a list of names. ``profile``
    (``profiles``): ``default`` (``size`` 128 and counts 40/8/4 per defect type unless given) or
    ``mvtec`` (each category MVTec AD's counts and original size; ``size`` one side for all;
    counts are the profile's); ``count_scale`` scales the counts (rounded half up, at least one).
    An existing category folder is replaced, only by a complete one, and only if clbench generated
    it (listed in the folder's marker, see ``synthesize``); a category of the user's is refused.
    ``workers``: processes writing categories in parallel (None: one per CPU when there are enough
    categories to pay off). This low-level call writes no marker: ``synthesize`` claims a folder.
    """
    counts = dict(n_train=n_train, n_test_good=n_test_good, n_test_per_defect=n_test_per_defect)
    names, seed, plans, workers = _validated(categories, size, seed, counts, workers, profile, count_scale)
    out = Path(out_dir)
    _refuse_foreign_categories(out, names)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    jobs = [(out, name, seed, plans[name]) for name in names]
    if workers > 1 and len(names) > 1 and sys.platform.startswith("linux"):
        # fork: children only run numpy/Pillow code, and nothing needs re-importing (unlike spawn)
        with ProcessPoolExecutor(min(workers, len(names)), mp_context=multiprocessing.get_context("fork")) as pool:
            for future in [pool.submit(_generate_category, *job) for job in jobs]:
                future.result()
    else:
        for job in jobs:
            _generate_category(*job)  # type: ignore[arg-type]
    return names


def synthesize(
    out_dir: str | Path,
    categories: int | Sequence[str] = 15,
    size: int | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_test_good: int | None = None,
    n_test_per_defect: int | None = None,
    workers: int | None = None,
    profile: str = "default",
    count_scale: float = 1.0,
) -> list[str]:
    """``generate`` into a folder clbench owns (``clbench data synth`` and runs): a missing or empty
    folder is claimed (marked with ``MARKER``), a marked one is completed; any other folder, or a
    category of the user's in a marked one, is refused with one line before anything is written.
    Categories already generated there with the same settings are kept, not rewritten. A write
    that fails (read-only, disk full) is one line naming the folder."""
    counts = dict(n_train=n_train, n_test_good=n_test_good, n_test_per_defect=n_test_per_defect)
    names, seed, plans, workers = _validated(categories, size, seed, counts, workers, profile, count_scale)
    out = Path(out_dir)
    state = folder_state(out)
    if state == "file":
        raise ValueError(f"{out}: is a file, not a folder")
    if state == "foreign":
        raise ValueError(f"{out}: exists, is not empty and is not a clbench synthetic dataset (no {MARKER}): "
                         "not writing into it; choose a new or empty folder")
    _refuse_foreign_categories(out, names)
    recorded = {name: settings(profile, seed, plans[name]) for name in names}
    todo = [name for name in names if not _up_to_date(out, name, recorded[name])]
    if not todo:
        return names
    try:
        out.mkdir(parents=True, exist_ok=True)
        _record(out, {name: recorded[name] for name in todo})
        generate(out, todo, size, seed, workers=workers, profile=profile, count_scale=count_scale, **counts)
        return names
    except OSError as err:
        where = err.filename or out
        raise ValueError(f"{where}: cannot write the synthetic dataset ({err.strerror or err})") from None


def _auto_workers(n_categories: int) -> int:
    """One process per available CPU, but none extra for a few categories (start-up would dominate)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if n_categories < 4 else max(1, min(cpus, n_categories, 8))
