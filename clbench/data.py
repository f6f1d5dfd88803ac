"""Datasets in MVTec AD layout: discovery, validation, the held-out split, decoding and batching.

Layout (any dataset that follows it works)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png              (test/good: no masks, all-zero)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

A held-out part of the *good training* images (``val_fraction``, seeded) is the validation set
for anything that needs one (early stopping, map normalisation); the test set is only ever used
for evaluation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """Bad dataset on disk; the message is one line naming the path and the fault."""


@dataclass(frozen=True)
class Sample:
    """One image of a category: where it is, its mask (defects only) and its label."""

    key: str  # unique within a dataset: "<category>/<split>/<defect>/<stem>"
    image: Path
    mask: Path | None
    label: int  # 0 = good, 1 = defective
    defect: str  # "good" or the defect type


@dataclass(frozen=True)
class Category:
    """A category (one task): its training, held-out validation and test samples."""

    name: str
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    defects: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]  # distinct (width, height) seen


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _image_size(path: Path, verify: bool) -> tuple[int, int]:
    """Open the header (and with ``verify`` decode the pixels) so a corrupt file fails here."""
    try:
        with Image.open(path) as img:
            if verify:
                img.load()
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable or corrupt image ({err.__class__.__name__}: {err})") from None


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the folders under ``root`` that have a ``train/good`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found (expected a folder in MVTec AD layout)")
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def _split_train_val(files: list[Path], val_fraction: float, seed: int, name: str) -> tuple[list[Path], list[Path]]:
    """Seeded hold-out of good training images; at least one image always stays for training."""
    n_val = int(round(len(files) * val_fraction))
    n_val = min(n_val, len(files) - 1)
    order = list(files)
    random.Random(f"{seed}:{name}").shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return train, val


def load_category(
    root: str | Path, name: str, val_fraction: float = 0.1, seed: int = 0, verify_images: bool = False
) -> Category:
    """Discover and validate one category; raises DatasetError naming the first fault found.

    With ``verify_images`` every image is fully decoded (slow on big sets; ``clbench data check``).
    Otherwise only headers are read, and a truncated file is reported when it is decoded.
    """
    root = Path(root)
    folder = root / name
    if not folder.is_dir():
        available = ", ".join(list_categories(root)) or "none"
        raise DatasetError(f"{folder}: category '{name}' not found (available: {available})")
    good_dir = folder / "train" / "good"
    if not good_dir.is_dir():
        raise DatasetError(f"{good_dir}: missing (every category needs train/good)")
    train_files = _images_in(good_dir)
    if not train_files:
        raise DatasetError(f"{good_dir}: no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: missing (every category needs a test folder)")

    sizes: set[tuple[int, int]] = set()
    for path in train_files:
        sizes.add(_image_size(path, verify_images))
    train, val = _split_train_val(train_files, val_fraction, seed, name)

    def good(path: Path, split: str) -> Sample:
        return Sample(f"{name}/{split}/good/{path.stem}", path, None, 0, "good")

    test: list[Sample] = []
    defects: list[str] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        images = _images_in(defect_dir)
        if not images:
            raise DatasetError(f"{defect_dir}: no images")
        if defect == "good":
            for path in images:
                sizes.add(_image_size(path, verify_images))
                test.append(good(path, "test"))
            continue
        defects.append(defect)
        mask_dir = folder / "ground_truth" / defect
        if not mask_dir.is_dir():
            raise DatasetError(f"{mask_dir}: missing (defect folder {defect_dir} needs masks)")
        for path in images:
            mask = mask_dir / f"{path.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"{mask}: mask missing for test image {path}")
            image_size = _image_size(path, verify_images)
            mask_size = _image_size(mask, verify_images)
            if image_size != mask_size:
                raise DatasetError(
                    f"{mask}: size {mask_size[0]}x{mask_size[1]} differs from its image {path} "
                    f"({image_size[0]}x{image_size[1]})"
                )
            sizes.add(image_size)
            test.append(Sample(f"{name}/test/{defect}/{path.stem}", path, mask, 1, defect))
    if not test:
        raise DatasetError(f"{test_dir}: no test images")
    return Category(
        name=name,
        train=tuple(good(p, "train") for p in train),
        val=tuple(good(p, "train") for p in val),
        test=tuple(test),
        defects=tuple(defects),
        image_sizes=tuple(sorted(sizes)),
    )


class ImageStore:
    """Decodes each image once at the run's resolution and keeps it as a uint8 CHW tensor.

    Images: bilinear resize to ``size`` x ``size``, grayscale expanded to 3 channels, then (with
    ``crop``) a center crop of ``crop`` x ``crop`` (torchvision's ``CenterCrop`` offsets: round((size -
    crop) / 2)), as the benchmark paper's code and PaDiM/PatchCore/CFA do (resize 256, crop 224).
    Masks: nearest resize, binarised, the same crop. ``out_size`` is what methods see and what is
    evaluated. Keeping uint8 (not float) is 4x smaller and is also the replay buffer's storage format.
    """

    def __init__(self, size: int, crop: int | None = None) -> None:
        if size <= 0:
            raise ValueError(f"image_size must be positive, got {size}")
        if crop is not None and not 0 < crop <= size:
            raise ValueError(f"crop_size must be in 1..image_size ({size}), got {crop}")
        self.size = size
        self.crop = crop
        self.out_size = crop or size
        self._offset = int(round((size - self.out_size) / 2.0))
        self._images: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}

    def _decode(self, path: Path, mode: str, resample: Image.Resampling) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img = img.convert(mode).resize((self.size, self.size), resample)
                array = np.asarray(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DatasetError(f"{path}: unreadable or corrupt image ({err.__class__.__name__}: {err})") from None
        o, n = self._offset, self.out_size
        return array[o:o + n, o:o + n]

    def image(self, sample: Sample) -> torch.Tensor:
        cached = self._images.get(sample.key)
        if cached is None:
            array = self._decode(sample.image, "RGB", Image.Resampling.BILINEAR)
            cached = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
            self._images[sample.key] = cached
        return cached

    def mask(self, sample: Sample) -> torch.Tensor:
        if sample.mask is None:
            return torch.zeros(self.out_size, self.out_size, dtype=torch.bool)
        cached = self._masks.get(sample.key)
        if cached is None:
            array = self._decode(sample.mask, "L", Image.Resampling.NEAREST)
            cached = torch.from_numpy(array > 127)
            self._masks[sample.key] = cached
        return cached


@dataclass
class Batch:
    """A batch of images as uint8 pixels plus what evaluation needs."""

    pixels: torch.Tensor  # uint8 (B, 3, H, W)
    keys: list[str]
    labels: torch.Tensor  # int64 (B,)
    masks: torch.Tensor  # bool (B, H, W)

    def __len__(self) -> int:
        return len(self.keys)

    def normalized(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float images with ImageNet normalisation, on ``device``."""
        return normalize(self.pixels.to(device))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def collate(samples: Sequence[Sample], store: ImageStore) -> Batch:
    return Batch(
        pixels=torch.stack([store.image(s) for s in samples]),
        keys=[s.key for s in samples],
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        masks=torch.stack([store.mask(s) for s in samples]),
    )


class SampleSet:
    """An ordered set of samples that yields batches; the unit a method trains or is scored on."""

    def __init__(self, samples: Sequence[Sample], store: ImageStore) -> None:
        self.samples = tuple(samples)
        self.store = store

    def __len__(self) -> int:
        return len(self.samples)

    def __add__(self, other: "SampleSet") -> "SampleSet":
        return SampleSet(self.samples + other.samples, self.store)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Batches in order, or shuffled with a seeded generator (reproducible across resumes)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = list(range(len(self.samples)))
        if shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([self.samples[i] for i in order[start : start + batch_size]], self.store)
