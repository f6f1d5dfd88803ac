"""Datasets in MVTec AD layout: discovery, validation, the held-out split, decoding and batching.

Layout (any dataset that follows it works)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png              (test/good: no masks, all-zero)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

A held-out part of the *good training* images (``val_fraction``, seeded) is the validation set
for anything that needs one (early stopping, map normalisation); the test set is only ever used
for evaluation. A dataset with its own held-out split (MVTec LOCO AD, MVTec AD 2; ``clbench data
convert`` writes it) has ``<root>/<category>/validation/good/*.png``: those images are the held-out
set and every train/good image is trained on (``Category.val_source`` says which).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pillow modes whose grey values run over 16 bits (a 16-bit PNG opens as "I;16"; older Pillow: "I").
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

log = logging.getLogger("clbench")


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
    val_source: str = "sample"  # "sample": val_fraction of train/good; "validation/good": the dataset's own split


@dataclass(frozen=True)
class RootScan:
    """What a data root holds, from its folder names only (no image is opened)."""

    root: Path
    categories: tuple[str, ...]  # folders with train/good, sorted
    incomplete: tuple[str, ...]  # other visible folders (and broken links): not categories, but never silently


@dataclass
class _Faults:
    """Where a scan reports a fault: raised at once (a run stops at the first) or collected (data check)."""

    collect: bool = False
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        if not self.collect:
            raise DatasetError(message)
        self.errors.append(message)


def is_hidden(path: Path) -> bool:
    """Hidden entries (.ipynb_checkpoints, macOS ._x.png, clbench's own staging) are never data."""
    return path.name.startswith(".")


def _broken_link(path: Path) -> bool:
    """A symbolic link whose target is missing, or a link loop (``exists`` is False for both)."""
    return path.is_symlink() and not path.exists()


def _entries(folder: Path, faults: _Faults) -> list[Path]:
    """Visible entries of a folder, sorted. Never recursive, so a link loop cannot make a scan hang."""
    try:
        return sorted(p for p in folder.iterdir() if not is_hidden(p))
    except OSError as err:
        faults.error(f"{folder}: cannot list the folder ({err.strerror or err})")
        return []


def _images_in(folder: Path, faults: _Faults) -> list[Path]:
    """The image files of a folder. Two images with one stem would share a key (and a mask): refused."""
    images: list[Path] = []
    by_stem: dict[str, Path] = {}
    for path in _entries(folder, faults):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if _broken_link(path):
            faults.error(f"{path}: broken symbolic link (its target is missing, or the link is a loop)")
            continue
        if not path.is_file():
            continue
        first = by_stem.setdefault(path.stem, path)
        if first is not path:
            faults.error(f"{folder}: {first.name} and {path.name} share the name '{path.stem}' "
                         "(an image's key and mask come from its name): keep one of them")
            continue
        images.append(path)
    return images


def _subfolders(folder: Path, faults: _Faults) -> list[Path]:
    """Visible subfolders (none if ``folder`` is not one); a broken link among them is a fault."""
    if not folder.is_dir():
        return []
    subfolders = []
    for path in _entries(folder, faults):
        if _broken_link(path):
            faults.error(f"{path}: broken symbolic link (its target is missing, or the link is a loop)")
        elif path.is_dir():
            subfolders.append(path)
    return subfolders


def _bomb_message(path: Path, err: Exception) -> str:
    return f"{path}: refused as a possible decompression bomb, not decoded ({err})"


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` where every fault, also one raised while the caller decodes, is one
    DatasetError naming the file (a decompression bomb, a truncated or foreign file, no permission)."""
    try:
        with Image.open(path) as img:
            yield img
    except DatasetError:
        raise
    except Image.DecompressionBombError as err:
        raise DatasetError(_bomb_message(path, err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable or corrupt image ({err.__class__.__name__}: {err})") from None


def _image_size(path: Path, verify: bool) -> tuple[int, int]:
    """Open the header (and with ``verify`` decode the pixels) so a corrupt file fails here."""
    with open_image(path) as img:
        if verify:
            img.load()
        return img.size


def is_wide(img: Image.Image) -> bool:
    """More than 8 bits per channel in the file (16-bit grey or 48/64-bit colour), from the header."""
    if img.mode in WIDE_GREY_MODES:
        return True
    return any(";16" in str(tile.args[0] if isinstance(tile.args, tuple) else tile.args) for tile in img.tile)


def to_rgb8(img: Image.Image, path: Path | None = None) -> Image.Image:
    """The image as 8-bit RGB, whatever its mode.

    16-bit grey is scaled by 255/65535 (``convert("RGB")`` would clip it to white); Pillow reads
    48/64-bit colour PNGs as 8 bits per channel itself (the high byte). Palette images take their
    palette colours (transparency ignored), RGBA/LA drop alpha, CMYK uses Pillow's conversion,
    1-bit is 0/255. 8-bit grey and RGB go through ``convert("RGB")`` exactly as before.
    """
    if img.mode in WIDE_GREY_MODES:
        grey = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        scaled = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(scaled).convert("RGB")
    if img.mode == "F":
        raise DatasetError(f"{path}: 32-bit float pixels have no defined range: save the image with 8 or 16 bits")
    if img.mode in ("P", "PA") and ("transparency" in img.info or img.mode == "PA"):
        return img.convert("RGBA").convert("RGB")  # Pillow warns on convert("RGB") of such palettes
    return img.convert("RGB")


def load_rgb8(path: Path, size: int) -> np.ndarray:
    """An image file as uint8 RGB (size, size, 3), bilinear: the dataset's decoding for images from
    outside a dataset too (DTD, ImageNet folders), so 16-bit files are scaled, not clipped to white,
    and a decompression bomb or an unreadable file is one DatasetError naming it."""
    with open_image(path) as img:
        return np.asarray(to_rgb8(img, path).resize((size, size), Image.Resampling.BILINEAR))


def mask_pixels(img: Image.Image) -> np.ndarray:
    """Defect pixels of a mask (bool HxW): every non-zero value, whatever the convention (MVTec's
    0/255, VisA's 0/1, 16-bit, a 1-bit image); in colour or palette masks any non-black colour."""
    if img.mode in ("1", "L", "F") or img.mode in WIDE_GREY_MODES:
        return np.asarray(img) != 0
    if img.mode == "LA":
        return np.asarray(img.getchannel(0)) != 0
    return (np.asarray(to_rgb8(img)) != 0).any(axis=2)


def scan_root(root: str | Path) -> RootScan:
    """Categories of a root (folders with ``train/good``) and the visible folders that are not."""
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise DatasetError(f"{root}: dataset root is not a folder")
        raise DatasetError(f"{root}: dataset root not found (expected a folder in MVTec AD layout)")
    categories: list[str] = []
    incomplete: list[str] = []
    for path in _entries(root, _Faults()):
        if (path / "train" / "good").is_dir():
            categories.append(path.name)
        elif path.is_dir() or _broken_link(path):
            incomplete.append(path.name)
    return RootScan(root, tuple(categories), tuple(incomplete))


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the visible folders under ``root`` that have a ``train/good`` folder."""
    return list(scan_root(root).categories)


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
    return _scan_category(Path(root), name, val_fraction, seed, verify_images, _Faults())


def inspect_category(root: str | Path, name: str, val_fraction: float = 0.1, seed: int = 0) -> tuple[Category, list[str]]:
    """Every layout fault of a category (not just the first), with what could be loaded despite them."""
    faults = _Faults(collect=True)
    category = _scan_category(Path(root), name, val_fraction, seed, False, faults)
    return category, faults.errors


def _scan_category(root: Path, name: str, val_fraction: float, seed: int, verify: bool, faults: _Faults) -> Category:
    """The walk behind ``load_category`` and ``inspect_category``: folders, files, masks, header sizes."""
    folder = root / name
    if is_hidden(folder) or not folder.is_dir():
        available = ", ".join(list_categories(root)) or "none"
        raise DatasetError(f"{folder}: category '{name}' not found (available: {available})")
    sizes: set[tuple[int, int]] = set()

    def size_of(path: Path) -> tuple[int, int] | None:
        try:
            size = _image_size(path, verify)
        except DatasetError as err:
            faults.error(str(err))
            return None
        sizes.add(size)
        return size

    train_files: list[Path] = []
    good_dir = folder / "train" / "good"
    if not good_dir.is_dir():
        faults.error(f"{good_dir}: missing (every category needs train/good)")
    else:
        train_files = [p for p in _images_in(good_dir, faults) if size_of(p) is not None]
        if not train_files:
            faults.error(f"{good_dir}: no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    val_dir = folder / "validation" / "good"
    val_split = "validation" if val_dir.is_dir() else "train"
    if val_dir.is_dir():  # the dataset's own held-out split: all of train/good is trained on
        train, val = train_files, [p for p in _images_in(val_dir, faults) if size_of(p) is not None]
        if not val:
            faults.error(f"{val_dir}: no images (a validation/good folder is the held-out set; remove it to sample one)")
    else:
        train, val = _split_train_val(train_files, val_fraction, seed, name) if train_files else ([], [])

    def good(path: Path, split: str) -> Sample:
        return Sample(f"{name}/{split}/good/{path.stem}", path, None, 0, "good")

    test: list[Sample] = []
    defects: list[str] = []
    test_dir = folder / "test"
    if not test_dir.is_dir():
        faults.error(f"{test_dir}: missing (every category needs a test folder)")
    for defect_dir in _subfolders(test_dir, faults):
        defect = defect_dir.name
        images = _images_in(defect_dir, faults)
        if not images:
            faults.error(f"{defect_dir}: no images")
            continue
        if defect == "good":
            test.extend(good(path, "test") for path in images if size_of(path) is not None)
            continue
        defects.append(defect)
        mask_dir = folder / "ground_truth" / defect
        if not mask_dir.is_dir():
            faults.error(f"{mask_dir}: missing (defect folder {defect_dir} needs masks)")
            continue
        for path in images:
            mask = mask_dir / f"{path.stem}_mask.png"
            if not mask.is_file():
                faults.error(f"{mask}: mask missing for test image {path}")
                continue
            image_size, mask_size = size_of(path), size_of(mask)
            if image_size is None or mask_size is None:
                continue
            if image_size != mask_size:
                faults.error(
                    f"{mask}: size {mask_size[0]}x{mask_size[1]} differs from its image {path} "
                    f"({image_size[0]}x{image_size[1]})"
                )
                continue
            test.append(Sample(f"{name}/test/{defect}/{path.stem}", path, mask, 1, defect))
    if not test and test_dir.is_dir():
        faults.error(f"{test_dir}: no test images")
    return Category(
        name=name,
        train=tuple(good(p, "train") for p in train),
        val=tuple(good(p, val_split) for p in val),
        test=tuple(test),
        defects=tuple(defects),
        image_sizes=tuple(sorted(sizes)),
        val_source="validation/good" if val_dir.is_dir() else "sample",
    )


def default_decode_workers(device_type: str = "cpu") -> int:
    """Decode threads when none are asked for. PIL's decode and resize release the GIL, so a few
    threads keep up with the backbone (more than 4 buys little), but only on cores nobody else
    computes on. On CUDA the cores are free while the GPU works: min(4, CPUs). On the CPU torch's
    (and faiss's) OpenMP threads already take ``torch.get_num_threads()`` cores, and a decode thread
    on one of them stalls the whole team at its next barrier: only spare cores decode, and with
    fewer than 2 spare the main thread decodes between batches (0). Measured on 2 cores, 2 torch
    threads, full-size originals: PatchCore 2 tasks 135.3/135.5 s serial vs 145.3/144.0 s with 2
    decode threads; PaDiM 5 tasks 128.1 vs 125.7 s (level)."""
    cores = os.cpu_count() or 1
    spare = cores if device_type == "cuda" else cores - torch.get_num_threads()
    workers = min(4, spare)
    return workers if workers >= 2 else 0


class ImageStore:
    """Decodes each image once at the run's resolution and keeps it as a uint8 CHW tensor.

    Images: 8-bit RGB (``to_rgb8``: 16-bit scaled, palette/alpha/CMYK converted), bilinear resize to
    ``size`` x ``size``, then (with ``crop``) a center crop of ``crop`` x ``crop`` (torchvision's
    ``CenterCrop`` offsets: round((size - crop) / 2)), as the benchmark paper's code and
    PaDiM/PatchCore/CFA do (resize 256, crop 224). Masks: every non-zero pixel is a defect
    (``mask_pixels``), nearest resize, the same crop; a defect image whose mask is empty, in the
    file or at this resolution, is one warning line naming the mask (small defects can vanish at
    low resolution: the run goes on, the image still counts for image metrics). ``out_size`` is
    what methods see and what is evaluated. Keeping uint8 (not float) is 4x smaller and is also
    the replay buffer's storage format.

    ``cache_bytes`` bounds the decoded images kept (least recently used dropped, decoded again if
    needed; None keeps all: MVTec AD at 256 px is 1.05 GB): with originals of any size and count, the
    store's RAM is a stated constant, not a share of the dataset. Results do not depend on it.

    ``decode_workers`` threads (None: ``default_decode_workers()`` for the CPU; 0 or 1: every image decoded in
    the caller, as before) decode what ``prefetch`` is given while the caller works on something
    else: with 700-1024 px originals PIL, not the backbone, would otherwise set the pace. Workers
    only decode; the caller's thread takes their results (``image``/``mask``), so the cache, the
    empty-mask warnings and a corrupt file's DatasetError (re-raised from the worker) come in the
    order and with the text of the serial decode, and each image is decoded once. One consumer
    thread per store.
    """

    def __init__(self, size: int, crop: int | None = None, decode_workers: int | None = None,
                 cache_bytes: int | None = None) -> None:
        if size <= 0:
            raise ValueError(f"image_size must be positive, got {size}")
        if crop is not None and not 0 < crop <= size:
            raise ValueError(f"crop_size must be in 1..image_size ({size}), got {crop}")
        workers = default_decode_workers() if decode_workers is None else decode_workers
        if workers < 0:
            raise ValueError(f"decode_workers must be 0 or more, got {decode_workers}")
        self.size = size
        self.crop = crop
        self.out_size = crop or size
        self.decode_workers = workers
        self._offset = int(round((size - self.out_size) / 2.0))
        if cache_bytes is not None and cache_bytes < 0:
            raise ValueError(f"image cache bytes must be 0 or more, got {cache_bytes}")
        self.cache_bytes = cache_bytes  # decoded images kept, least recently used dropped beyond; None: all
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._image_bytes = 0
        self._masks: dict[str, torch.Tensor] = {}
        # decodes submitted by ``prefetch`` and not yet taken: ("image" | "mask", key) -> Future
        self._pending: dict[tuple[str, str], Future] = {}
        self._pool: ThreadPoolExecutor | None = None  # started at the first prefetch

    def __getstate__(self) -> dict:
        """Picklable without its threads: pending decodes are dropped (they are redone on demand)."""
        state = dict(self.__dict__)
        state.update(_pending={}, _pool=None)
        return state

    def _crop(self, array: np.ndarray) -> np.ndarray:
        o, n = self._offset, self.out_size
        return array[o:o + n, o:o + n]

    def _decode_image(self, path: Path) -> torch.Tensor:
        array = load_rgb8(path, self.size)
        # numpy only, no torch op: an ATen op in a decode thread starts an OpenMP team there, and those
        # extra threads slowed the method's own compute afterwards by ~50% on 2 cores (PaDiM's fit
        # 21-25 s -> 33-39 s, measured A/B); torch.from_numpy only wraps the array
        return torch.from_numpy(np.ascontiguousarray(self._crop(array).transpose(2, 0, 1)))

    def _decode_mask(self, path: Path, warn: bool) -> tuple[torch.Tensor, str | None]:
        array, message = self._mask_and_warning(path, warn)
        return torch.from_numpy(array.copy()), message

    def prefetch(self, samples: Iterable[Sample]) -> None:
        """Start decoding the images (and masks) of ``samples`` not yet decoded nor under way, in the
        worker threads; a no-op with 0 or 1 workers. ``image``/``mask`` take the results."""
        if self.decode_workers <= 1:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="clbench-decode")
        for sample in samples:
            key = sample.key
            if key not in self._images and ("image", key) not in self._pending:
                self._pending[("image", key)] = self._pool.submit(self._decode_image, sample.image)
            if sample.mask is not None and key not in self._masks and ("mask", key) not in self._pending:
                self._pending[("mask", key)] = self._pool.submit(self._decode_mask, sample.mask, sample.label == 1)

    def image(self, sample: Sample) -> torch.Tensor:
        cached = self._images.get(sample.key)
        if cached is None:
            pending = self._pending.pop(("image", sample.key), None)
            cached = pending.result() if pending is not None else self._decode_image(sample.image)
            self._keep_image(sample.key, cached)
        elif self.cache_bytes is not None:
            self._images.move_to_end(sample.key)
        return cached

    def _keep_image(self, key: str, image: torch.Tensor) -> None:
        """Cache a decoded image within ``cache_bytes``: the least recently used go first (a frozen
        backbone's features are cached apart, so past its first pass an image is seldom needed
        again; a trainable method's current task stays, being the most recently used). Masks are
        kept regardless (one byte per pixel, test images only), so an empty mask warns once."""
        size = image.numel() * image.element_size()
        if self.cache_bytes is not None and size > self.cache_bytes:
            return
        self._images[key] = image
        self._image_bytes += size
        while self.cache_bytes is not None and self._image_bytes > self.cache_bytes:
            _, dropped = self._images.popitem(last=False)
            self._image_bytes -= dropped.numel() * dropped.element_size()

    def mask(self, sample: Sample) -> torch.Tensor:
        if sample.mask is None:
            return torch.zeros(self.out_size, self.out_size, dtype=torch.bool)
        cached = self._masks.get(sample.key)
        if cached is None:
            pending = self._pending.pop(("mask", sample.key), None)
            warn = sample.label == 1
            cached, message = pending.result() if pending is not None else self._decode_mask(sample.mask, warn)
            if message is not None:
                log.warning("warning: %s", message)
            self._masks[sample.key] = cached
        return cached

    def mask_array(self, path: Path, warn: bool = False) -> np.ndarray:
        """A mask at the run's resolution (bool, cropped); with ``warn``, an empty one is one warning line."""
        array, message = self._mask_and_warning(path, warn)
        if message is not None:
            log.warning("warning: %s", message)
        return array

    def _mask_and_warning(self, path: Path, warn: bool) -> tuple[np.ndarray, str | None]:
        """The mask and, with ``warn`` and no defect pixel left, the warning's text (logged by the
        caller's thread, so warnings keep the serial order)."""
        with open_image(path) as img:
            full = mask_pixels(img)
        binary = Image.fromarray(full.astype(np.uint8) * 255)
        array = self._crop(np.asarray(binary.resize((self.size, self.size), Image.Resampling.NEAREST)) > 0)
        if warn and not array.any():
            return array, empty_mask_message(path, int(full.sum()), self.size, self.crop)
        return array, None


def empty_mask_message(path: Path, defect_pixels: int, size: int | None = None, crop: int | None = None) -> str:
    """Why a defect image adds no defect pixel: its mask file is empty, or the defect vanished at
    the run's resolution (nearest resize of a small defect, or a crop that cuts it off)."""
    if defect_pixels == 0:
        return f"{path}: defect mask is empty (no non-zero pixel): its image adds no defect pixel to pixel metrics"
    cropped = f", cropped to {crop}x{crop}" if crop and crop != size else ""
    return (f"{path}: the defect's {defect_pixels} pixels vanish at the run's resolution "
            f"({size}x{size} nearest{cropped}): its image adds no defect pixel to pixel metrics")


@dataclass
class Batch:
    """A batch of images as uint8 pixels plus what evaluation needs.

    A latent-replay training batch (strategies/latent_replay.py) also carries ``latents``: every row's
    frozen-backbone features, keyed by ``FrozenBackbone.latent_key``; its ``pixels`` then hold only the
    leading rows that are images (the current task's), the replayed rows having features and no pixels."""

    pixels: torch.Tensor  # uint8 (B, 3, H, W); (B', 3, H, W) with B' < B in a latent-replay batch
    keys: list[str]
    labels: torch.Tensor  # int64 (B,)
    masks: torch.Tensor  # bool (B, H, W)
    # int64 (B,): the index of the step that taught each image's category, given to the method only
    # under ``evaluation: oracle`` (clbench.engine.evaluation); None otherwise (training, agnostic)
    task_index: torch.Tensor | None = None
    # backbone latent_key -> per layer (B, C, h, w): features given with the batch, which a frozen
    # backbone returns instead of computing them (``FrozenBackbone.features``); None: computed from pixels
    latents: dict[str, list[torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def normalized(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float images with ImageNet normalisation, on ``device``."""
        return normalize(self.pixels.to(device))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def collate(samples: Sequence[Sample], store: ImageStore, task_index: int | None = None) -> Batch:
    """A batch of ``samples``; ``task_index`` (oracle evaluation: one task's test images) is given to every image.
    The store's workers decode the batch's missing images in parallel (``ImageStore.prefetch``)."""
    store.prefetch(samples)
    return Batch(
        pixels=torch.stack([store.image(s) for s in samples]),
        keys=[s.key for s in samples],
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        masks=torch.stack([store.mask(s) for s in samples]),
        task_index=None if task_index is None else torch.full((len(samples),), task_index, dtype=torch.int64),
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
        chunks = ([self.samples[i] for i in order[start : start + batch_size]]
                  for start in range(0, len(order), batch_size))
        yield from prefetched_batches(chunks, self.store)


def prefetched_batches(
    chunks: Iterable[Sequence[Sample]], store: ImageStore, task_index: int | None = None
) -> Iterator[Batch]:
    """``collate`` of each chunk, in order; the next chunk's decode is queued (behind this one's) before
    a batch is handed out, so the store's workers decode it while the caller uses the batch."""
    chunks = iter(chunks)
    current = next(chunks, None)
    while current is not None:
        following = next(chunks, None)
        store.prefetch(current)
        if following is not None:
            store.prefetch(following)
        yield collate(current, store, task_index)
        current = following
