"""``clbench data check``: every fault of a dataset in MVTec AD layout, per category.

A run stops at the first layout fault and decodes each image only when it needs it; the check
instead collects every fault and decodes every image and mask once, so that nothing a run would
trip over, or silently accept, goes unsaid:

- errors (a run refuses them; one ``clbench: error:`` line each on stderr, exit 2): folders without ``train/good``, missing or empty folders,
  missing masks, mask/image size mismatches, two images sharing a stem, broken links, unreadable
  or corrupt files, decompression bombs, float images;
- warnings (a run accepts them, but they change what is measured): defect masks that are empty in
  the file or at ``--image-size``, masks with values other than 0/255 or 0/1 (every non-zero pixel
  is a defect);
- notes: the mask convention found (0/255, 0/1, ...), images with 16 bits per channel (scaled to 8
  bits), hidden entries that are ignored (``.ipynb_checkpoints``), a category's own held-out split
  (``validation/good``), and for a dataset ``clbench data convert`` wrote, its source and the source's
  mask convention (from the conversion marker).

The ``masks`` column is the convention found on disk with the file type (e.g. "0/255 png", "0/1 png",
"0/255 bmp": a converted dataset's masks are links to the source's files, or merged 0/255 PNGs).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clbench.data import (WIDE_GREY_MODES, Category, DatasetError, ImageStore, Sample, empty_mask_message,
                          inspect_category, is_hidden, is_wide, mask_pixels, open_image, scan_root, to_rgb8)
from clbench.data.formats.convert import MARKER as CONVERSION_MARKER
from clbench.data.formats.convert import read_conversion_marker

@dataclass
class Finding:
    """One line of the report: how serious, where (a category, or "" for the root) and what."""

    level: str
    category: str
    message: str


@dataclass
class Report:
    """The table rows (one per category) and every finding."""

    rows: list[dict] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def count(self, level: str) -> int:
        return sum(f.level == level for f in self.findings)


def mask_convention(img: Image.Image) -> tuple[str, list[int]]:
    """How a mask marks defects, from its distinct values: 0/255 (MVTec), 0/1 (VisA), 1-bit,
    0/65535 (16-bit), "empty" (all zero) or "other non-zero" (e.g. anti-aliased edges)."""
    if img.mode == "1":
        values = np.unique(np.asarray(img).astype(np.uint8))
    elif img.mode in ("L",) or img.mode in WIDE_GREY_MODES:
        values = np.unique(np.asarray(img))
    elif img.mode == "LA":
        values = np.unique(np.asarray(img.getchannel(0)))
    else:
        values = np.unique(np.asarray(to_rgb8(img)).max(axis=2))
    found = {int(v) for v in values}
    if found <= {0}:
        return "empty", sorted(found)
    if img.mode == "1":
        return "1-bit", sorted(found)
    for name, allowed in (("0/255", {0, 255}), ("0/1", {0, 1}), ("0/65535", {0, 65535})):
        if found <= allowed:
            return name, sorted(found)
    return "other non-zero", sorted(found)


def check_dataset(root: str | Path, val_fraction: float = 0.1, seed: int = 0, image_size: int | None = None,
                  crop_size: int | None = None) -> Report:
    """The whole report; raises DatasetError only when ``root`` itself is not a folder."""
    root = Path(root)
    scan = scan_root(root)
    report = Report()
    converted = read_conversion_marker(root)  # its marker is reported as the source, not as a hidden entry
    hidden = [name for name in _hidden_entries(root) if not (converted and name == CONVERSION_MARKER)]
    if hidden:
        report.findings.append(Finding("note", "", f"{root}: hidden entries ignored: {', '.join(hidden)}"))
    for name in scan.incomplete:
        report.findings.append(Finding("error", name, f"{root / name}: not a category, no train/good folder "
                                                      "(a run names it as such, and leaves it out of counted tasks)"))
    if not scan.categories:
        report.findings.append(Finding("error", "", f"{root}: no categories (folders with train/good)"))
    store = ImageStore(image_size, crop_size) if image_size else None
    for name in scan.categories:
        _check_category(root, name, val_fraction, seed, store, report)
        report.findings += _conversion_notes(root, name, converted)
    return report


def _conversion_notes(root: Path, name: str, marker: dict | None) -> list[Finding]:
    """Where a converted category came from and how its source stores masks (the marker's record)."""
    if marker is None:
        return []
    record = (marker.get("categories") or {}).get(name)
    if not isinstance(record, dict):
        return [Finding("note", name, f"{root / name}: not listed in {root}'s conversion marker (added by hand?)")]
    line = f"{root / name}: converted from {marker.get('source')} as '{marker.get('format')}'"
    if record.get("mask_convention"):
        line += f"; source masks: {record['mask_convention']}"
    if record.get("merged_masks"):
        line += f" ({record['merged_masks']} images' masks merged into 0/255 PNGs)"
    return [Finding("note", name, line)] + [Finding("note", name, f"{root / name}: {note}")
                                            for note in record.get("notes", [])]


def _hidden_entries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if is_hidden(p))
    except OSError:
        return []


def _check_category(root: Path, name: str, val_fraction: float, seed: int, store: ImageStore | None,
                    report: Report) -> None:
    category, errors = inspect_category(root, name, val_fraction, seed)
    findings = [Finding("error", name, message) for message in errors]
    for sub in ("train/good", "validation/good", "test", "ground_truth"):
        hidden = _hidden_entries(root / name / sub)
        if hidden:
            findings.append(Finding("note", name, f"{root / name / sub}: hidden entries ignored: {', '.join(hidden)}"))
    wide = 0
    for sample in category.train + category.val + category.test:
        try:
            wide += _decode_image(sample.image)
        except DatasetError as err:
            findings.append(Finding("error", name, str(err)))
    conventions = _check_masks(category, root / name, store, findings)
    if wide:
        findings.append(Finding("note", name, f"{root / name}: {wide} images with 16 bits per channel (scaled to 8 bits)"))
    if category.val_source != "sample":
        findings.append(Finding("note", name, f"{root / name / category.val_source}: the held-out set "
                                              f"({len(category.val)} images; all of train/good is trained on)"))
    report.rows.append(_row(category, conventions))
    report.findings.extend(findings)


def _decode_image(path: Path) -> bool:
    """Decode fully, as a run would; True if the file has 16 bits per channel."""
    with open_image(path) as img:
        wide = is_wide(img)
        to_rgb8(img, path).load()
    return wide


def _check_masks(category: Category, folder: Path, store: ImageStore | None, findings: list[Finding]) -> Counter:
    """Each defect mask: its convention, and whether it is empty in the file or at the run's resolution.
    Returns the count per convention and file type ("0/255 png"), as the table shows it."""
    conventions: Counter = Counter()
    shown: Counter = Counter()
    others: list[str] = []
    for sample in (s for s in category.test if s.mask is not None):
        try:
            with open_image(sample.mask) as img:
                convention, values = mask_convention(img)
                file_type = (img.format or sample.mask.suffix.lstrip(".")).lower()
        except DatasetError as err:
            findings.append(Finding("error", category.name, str(err)))
            continue
        conventions[convention] += 1
        shown[f"{convention} {file_type}"] += 1
        if convention == "empty":
            findings.append(Finding("warning", category.name, empty_mask_message(sample.mask, 0)))
        elif convention == "other non-zero":
            others.append(f"{sample.mask.name}: {_values_text(values)}")
        elif store is not None:
            _check_resized(sample, store, findings, category.name)
    unusual = sorted(k for k in conventions if k not in ("0/255", "empty", "other non-zero"))
    if unusual:
        findings.append(Finding("note", category.name, f"{folder}: masks {', '.join(unusual)}: "
                                                       "every non-zero pixel is a defect (as with 0/255)"))
    if others:
        findings.append(Finding("warning", category.name,
                                f"{folder}: {len(others)} masks with values other than 0/255 or 0/1, every non-zero pixel is a "
                                f"defect (e.g. {others[0]})"))
    return shown


def _check_resized(sample: Sample, store: ImageStore, findings: list[Finding], name: str) -> None:
    """A mask with defect pixels in the file that are all lost at the run's resolution."""
    if not store.mask_array(sample.mask).any():
        with open_image(sample.mask) as img:
            pixels = int(mask_pixels(img).sum())
        findings.append(Finding("warning", name, empty_mask_message(sample.mask, pixels, store.size, store.crop)))


def _values_text(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:6])
    return f"values {shown}{', ...' if len(values) > 6 else ''}"


def _row(category: Category, conventions: Counter) -> dict:
    sizes = ", ".join(f"{w}x{h}" for w, h in category.image_sizes)
    masks = ", ".join(f"{k} ({v})" if len(conventions) > 1 else k for k, v in sorted(conventions.items()))
    return dict(category=category.name, train=len(category.train), val=len(category.val),
                test_good=sum(s.label == 0 for s in category.test),
                test_defect=sum(s.label == 1 for s in category.test),
                defects=", ".join(category.defects), image_sizes=sizes, masks=masks or "-")


def format_report(report: Report) -> tuple[list[str], list[str]]:
    """(stdout, stderr) lines: the table, the notes and warnings and the verdict; the errors, one
    line each as every clbench error (``clbench: error: PATH: fault``)."""
    import pandas as pd

    out: list[str] = []
    if report.rows:
        with pd.option_context("display.width", 250, "display.max_colwidth", 60):
            out += pd.DataFrame(report.rows).to_string(index=False).splitlines()
    for level in ("note", "warning"):
        out += [f"{level}: {f.message}" for f in report.findings if f.level == level]
    errors, warnings = report.count("error"), report.count("warning")
    if errors or warnings:
        out.append(f"{len(report.rows)} categories checked: {errors} errors, {warnings} warnings")
    else:
        out.append(f"{len(report.rows)} categories OK")
    return out, [f"clbench: error: {f.message}" for f in report.findings if f.level == "error"]
