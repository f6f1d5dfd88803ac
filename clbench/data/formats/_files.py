"""File listing shared by the dataset formats: the visible image
files of a folder, and one sniffed mask convention. Every fault is one ``DatasetError`` naming the
path, so a format's ``plan`` stops on bad data with the line the user needs."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from clbench.data.dataset import IMAGE_EXTENSIONS, DatasetError, is_hidden, open_image


def image_files(folder: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The visible image files of ``folder``, sorted; a missing folder or two images sharing a stem
    (their converted names and masks would collide) is a ``DatasetError`` naming it."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing (expected a folder of images)")
    allowed = {ext.lower() for ext in extensions}
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if is_hidden(path) or path.suffix.lower() not in allowed:
            continue
        if path.is_symlink() and not path.exists():
            raise DatasetError(f"{path}: broken symbolic link (its target is missing, or the link is a loop)")
        if not path.is_file():
            continue
        first = by_stem.setdefault(path.stem, path)
        if first is not path:
            raise DatasetError(f"{folder}: {first.name} and {path.name} share the name '{path.stem}': keep one of them")
    return sorted(by_stem.values())


def training_images(folder: Path, extensions: Iterable[str]) -> list[Path]:
    """``image_files`` of a category's good training folder, which must not be empty: a category
    without training images cannot be learned (one line naming the folder and the expected types)."""
    files = image_files(folder, extensions)
    if not files:
        raise DatasetError(f"{folder}: no images ({' or '.join(extensions)})")
    return files


def subfolders(folder: Path) -> list[Path]:
    """Visible subfolders of ``folder``, sorted (none if it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p))


def categories_having(src: Path, marker: str, what: str) -> list[str]:
    """The subfolders of ``src`` that hold ``marker`` (e.g. "train/good"), sorted; none is one
    ``DatasetError`` naming ``src`` and what was expected (``what``: "BTAD product", ...)."""
    found = [p.name for p in subfolders(src) if (p / marker).is_dir()]
    if not found:
        raise DatasetError(f"{src}: no {what} found (expected <{what.split()[-1]}>/{marker})")
    return found


def sniff_mask_values(mask: Path) -> str:
    """How one mask file marks defects ("0/255", "0/1", ...), as ``data check`` names it."""
    from clbench.data.check import mask_convention  # the one classifier of mask values

    with open_image(mask) as img:
        return mask_convention(img)[0]
