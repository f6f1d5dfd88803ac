"""The one interface of a dataset format: what a distributed dataset holds, per category, as a plan
that ``convert`` turns into MVTec layout.

Why convert instead of reading each format in place: the MVTec-layout loader (``clbench.data.dataset``)
is the one reader every run, ``data check``, the fingerprint and the held-out split go through, and it
is tested hard (masks, sizes, 16-bit, bad files). A format only has to say *where* its files are; the
conversion links them (symlinks, never copies: VisA or Real-IAD are tens of GB) into a new folder and
writes only what the layout cannot link (a merged mask of several files, a mask that must change
format). The source is never written to.

A format module registers itself (``@FORMATS.register("visa")``) and implements ``categories`` and
``plan``; ``clbench.data.formats.convert`` does the rest (refusing a destination it may not write,
links, merged masks, the marker that records the format and mask convention per category).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from clbench.registry import Registry

FORMATS: Registry["DatasetFormat"] = Registry("dataset format", "clbench.data.formats")


@dataclass(frozen=True)
class TestImage:
    """One test image of a plan: ``defect`` is "good" for a normal image; ``masks``: the source mask
    files of an anomalous image (several are merged: defect = any of them); empty for a good one."""

    image: Path
    defect: str
    masks: tuple[Path, ...] = ()
    name: str | None = None  # file stem in the converted layout (default: the image's stem)


@dataclass(frozen=True)
class TrainImage:
    image: Path
    name: str | None = None  # file stem in the converted layout (default: the image's stem)


@dataclass
class CategoryPlan:
    """Where one category's files are, as the format distributes them.

    ``validation``: the format's own held-out good images (MVTec LOCO, MVTec AD 2), written to
    ``validation/good`` and used as the held-out set instead of a sample of train/good (no test
    leakage either way). ``mask_convention``: how the source stores masks, as ``data check`` prints it
    (e.g. "suffix _mask.png, 0/255, one file", "same stem .png, 0/1, one file",
    "folder per image, 0/255, several files merged").
    """

    name: str
    train: list[TrainImage]
    test: list[TestImage]
    validation: list[TrainImage] = field(default_factory=list)
    mask_convention: str = ""
    notes: list[str] = field(default_factory=list)  # what the conversion left out, and why (one line each)


class DatasetFormat(ABC):
    """A dataset as distributed (VisA, MVTec LOCO, ...). ``options``: format-specific choices given on
    the command line (e.g. Real-IAD's camera ``view``), declared in ``options_help``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options_help: ClassVar[Mapping[str, str]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options_help))
        if unknown:
            known = ", ".join(sorted(self.options_help)) or "none"
            raise ValueError(f"format '{self.name}': unknown option '{unknown[0]}' (known: {known})")
        self.options = dict(options)

    @abstractmethod
    def categories(self, src: Path) -> list[str]:
        """The categories found under ``src`` (a one-line ``DatasetError`` naming ``src`` if none)."""

    @abstractmethod
    def plan(self, src: Path, category: str) -> CategoryPlan:
        """Where the category's files are; a missing or malformed piece is a one-line
        ``DatasetError`` naming the file or folder at fault."""
