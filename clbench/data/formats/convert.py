"""``clbench data convert``: a distributed dataset (a ``DatasetFormat``'s plan) laid out in MVTec layout.

What is written under ``dst`` (and nothing anywhere else; the source is only read)::

    <dst>/.clbench-converted.json                      the marker, written first
    <dst>/<cat>/train/good/<name><ext>                 symlink -> source image (absolute)
    <dst>/<cat>/validation/good/<name><ext>            symlink, when the format has its own held-out split
    <dst>/<cat>/test/<defect>/<name><ext>              symlink
    <dst>/<cat>/ground_truth/<defect>/<name>_mask.png  symlink to a one-file mask (any file type, 0/1 or
                                                       0/255: the loader reads every non-zero pixel as a
                                                       defect), or a written 0/255 PNG, the logical OR of
                                                       an image's several mask files

Links, not copies: VisA and Real-IAD are tens of GB. Why the rules:

- never into the source: ``dst`` inside ``src`` or ``src`` inside ``dst`` (resolved paths) is refused;
- never over someone's folder: a non-empty ``dst`` without the marker is refused, and so is a marked
  one converted from another source, format or options;
- a killed conversion is completed by running it again: every category is built in a hidden sibling
  (``.<cat>.partial``, ignored by the loader) and renamed into place, so a category is whole or absent;
  complete categories are kept as they are (delete one to convert it again);
- every source file is checked before anything is written, so a bad source is one ``DatasetError`` line
  naming the file and leaves ``dst`` untouched;
- two source images that would get one name in a folder (the loader keys an image, and finds its mask,
  by its stem) are an error naming both: a format gives them distinct ``name``s if its data has such pairs.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from clbench.data.dataset import DatasetError, mask_pixels, open_image
from clbench.data.formats.base import FORMATS, CategoryPlan

MARKER = ".clbench-converted.json"  # marks a folder ``convert`` wrote; records the source and each category
PARTIAL = ".{name}.partial"  # a category being built; renamed into place when whole


def read_conversion_marker(root: str | Path) -> dict | None:
    """The marker of a converted dataset (None: not a converted folder, or an unreadable marker)."""
    path = Path(root) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def convert_dataset(format_name: str, src: str | Path, dst: str | Path, categories: Sequence[str] | None = None,
                    **options: Any) -> list[str]:
    """Lay the dataset at ``src`` (in format ``format_name``) out in MVTec layout under ``dst``; returns
    the categories converted (all the source has, or ``categories``), those already complete included."""
    fmt = FORMATS.get(format_name)(**options)
    source = Path(src)
    if not source.is_dir():
        raise DatasetError(f"{source}: source dataset {'is not a folder' if source.exists() else 'not found'}")
    source = source.resolve()
    target = Path(dst).resolve()
    _refuse_overlap(source, target)
    settings = {"format": format_name, "source": str(source), "options": dict(sorted(options.items()))}
    marker = _claimable(target, settings)
    names = _select(fmt.categories(source), categories, source, format_name)
    recorded = dict((marker or {}).get("categories") or {})
    for name in names:
        if (target / name).exists() or (target / name).is_symlink():
            if name not in recorded:
                raise DatasetError(f"{target / name}: exists and was not written by this conversion "
                                   f"(not listed in {target / MARKER}): not replacing it; choose another DST")
    todo = [name for name in names if not (target / name).is_dir()]
    plans = [fmt.plan(source, name) for name in todo]
    for plan in plans:
        _check_plan(plan)  # every source file, before anything is written
    from clbench import __version__

    recorded.update({plan.name: _record(plan) for plan in plans})
    target.mkdir(parents=True, exist_ok=True)
    _write_marker(target, {"generator": "clbench.convert", **settings, "clbench_version": __version__,
                           "categories": recorded})
    for plan in plans:
        _write_category(plan, target)
    return list(names)


# --------------------------------------------------------------------------------------------
# Where conversion may write
# --------------------------------------------------------------------------------------------


def _refuse_overlap(source: Path, target: Path) -> None:
    if target == source or target.is_relative_to(source):
        raise DatasetError(f"{target}: the destination is inside the source dataset {source}: "
                           "conversion never writes into the source; choose a DST outside it")
    if source.is_relative_to(target):
        raise DatasetError(f"{target}: the destination contains the source dataset {source}: choose a DST outside it")


def _claimable(target: Path, settings: dict) -> dict | None:
    """The marker of a folder this conversion may complete (None: a new or empty folder); refuses the rest."""
    if not target.exists() and not target.is_symlink():
        return None
    if not target.is_dir():
        raise DatasetError(f"{target}: exists and is not a folder; choose another DST")
    marker = read_conversion_marker(target)
    if marker is None:
        if (target / MARKER).exists():
            raise DatasetError(f"{target / MARKER}: unreadable conversion marker; delete {target} to convert again")
        if any(target.iterdir()):
            raise DatasetError(f"{target}: not empty and not written by clbench data convert (no {MARKER}): "
                               "not writing into it; choose a new or empty DST")
        return None
    before = {key: marker.get(key) for key in settings}
    if before != settings:
        raise DatasetError(f"{target}: converted from {before['source']} as '{before['format']}' "
                           f"(options {before['options'] or 'none'}), not from {settings['source']} as "
                           f"'{settings['format']}' (options {settings['options'] or 'none'}); choose another DST")
    return marker


def _select(available: list[str], wanted: Sequence[str] | None, source: Path, format_name: str) -> list[str]:
    if not available:
        raise DatasetError(f"{source}: no categories found for format '{format_name}'")
    if not wanted:
        return list(available)
    missing = [name for name in wanted if name not in available]
    if missing:
        raise DatasetError(f"{source}: category '{missing[0]}' not found (available: {', '.join(available)})")
    return list(dict.fromkeys(wanted))


def _write_marker(target: Path, data: dict) -> None:
    from clbench.engine import atomic

    atomic.write_json(target / MARKER, data)


# --------------------------------------------------------------------------------------------
# A plan: checked whole, then written in a hidden sibling and renamed into place
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One file of the converted layout: its path under the category folder and its source file(s)."""

    path: Path  # relative to the category folder
    sources: tuple[Path, ...]  # one: a symlink; several: masks merged into a written PNG


def _entries(plan: CategoryPlan) -> list[_Entry]:
    """Every file of the category's converted layout; refuses two sources that would share a name."""
    entries: list[_Entry] = []
    owners: dict[tuple[str, str], Path] = {}

    def add(folder: str, image: Path, name: str | None) -> str:
        stem = name or image.stem
        first = owners.setdefault((folder, stem), image)
        if first != image:
            raise DatasetError(f"{image}: would be named '{stem}' in {plan.name}/{folder}, as {first} is "
                               "(the loader keys an image and finds its mask by its name)")
        entries.append(_Entry(Path(folder) / f"{stem}{image.suffix}", (image,)))
        return stem

    for item in plan.train:
        add("train/good", item.image, item.name)
    for item in plan.validation:
        add("validation/good", item.image, item.name)
    for item in plan.test:
        stem = add(f"test/{item.defect}", item.image, item.name)
        if item.defect != "good":
            entries.append(_Entry(Path("ground_truth") / item.defect / f"{stem}_mask.png", tuple(item.masks)))
    return entries


def _check_name(name: str, what: str, plan: CategoryPlan) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name in ("..",):
        raise DatasetError(f"{plan.name}: {what} '{name}' cannot be a folder name in MVTec layout")


def _check_plan(plan: CategoryPlan) -> None:
    """Everything the category's conversion will read exists, before anything is written."""
    _check_name(plan.name, "category", plan)
    if not plan.train:
        raise DatasetError(f"{plan.name}: the source has no good training images for this category")
    if not plan.test:
        raise DatasetError(f"{plan.name}: the source has no test images for this category")
    for item in plan.test:
        _check_name(item.defect, "defect type", plan)
        if item.defect != "good" and not item.masks:
            raise DatasetError(f"{item.image}: anomalous test image ({item.defect}) without a mask")
    for entry in _entries(plan):
        for path in entry.sources:
            if not path.is_file():
                raise DatasetError(f"{path}: {'missing' if not path.exists() else 'not a file'} "
                                   f"(needed for {plan.name}/{entry.path})")


def _record(plan: CategoryPlan) -> dict:
    """What the marker says of a category: the source's mask convention, the notes, the counts."""
    anomalous = [item for item in plan.test if item.defect != "good"]
    merged = sum(len(item.masks) > 1 for item in anomalous)
    return {"mask_convention": plan.mask_convention, "notes": list(plan.notes),
            "counts": {"train": len(plan.train), "validation": len(plan.validation),
                       "test_good": len(plan.test) - len(anomalous), "test_anomalous": len(anomalous)},
            "defects": sorted({item.defect for item in anomalous}), "merged_masks": merged}


def _write_category(plan: CategoryPlan, target: Path) -> None:
    partial = target / PARTIAL.format(name=plan.name)
    _remove(partial)  # left by a killed conversion: this conversion's own, never the source
    partial.mkdir()
    for entry in _entries(plan):
        path = partial / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(entry.sources) == 1:
            os.symlink(os.path.abspath(entry.sources[0]), path)
        else:
            Image.fromarray(merge_masks(entry.sources).astype(np.uint8) * 255).save(path, format="PNG")
    os.rename(partial, target / plan.name)


def _remove(path: Path) -> None:
    """Delete a leftover staging folder; its symlinks are removed, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def merge_masks(paths: Iterable[Path]) -> np.ndarray:
    """The logical OR of an image's mask files (bool HxW; every non-zero pixel is a defect)."""
    merged: np.ndarray | None = None
    first: Path | None = None
    for path in paths:
        with open_image(path) as img:
            pixels = mask_pixels(img)
        if merged is None:
            merged, first = pixels.copy(), path
        elif pixels.shape != merged.shape:
            raise DatasetError(f"{path}: size {pixels.shape[1]}x{pixels.shape[0]} differs from {first} "
                               f"({merged.shape[1]}x{merged.shape[0]}); an image's masks are merged")
        else:
            merged |= pixels
    if merged is None:
        raise DatasetError("merge_masks: no mask files given")
    return merged
