"""Data: datasets in MVTec AD layout (``dataset``: discovery, validation, the held-out split,
decoding, batching), ``check`` (``clbench data check``), ``root`` (a run's data root, and where the
synthetic dataset may be generated) and ``synth`` (the built-in synthetic dataset).

The dataset's names are re-exported here, so ``from clbench.data import Batch, SampleSet`` reads short;
lazily (``__getattr__``): ``clbench.data.dataset`` imports torch (~3 s), which ``clbench data synth``
(a subpackage, so it imports this file first) does not need."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "WIDE_GREY_MODES", "Batch", "Category", "DatasetError",
           "ImageStore", "RootScan", "Sample", "SampleSet", "collate", "empty_mask_message", "inspect_category",
           "is_hidden", "is_wide", "list_categories", "load_category", "load_rgb8", "mask_pixels", "normalize",
           "open_image", "scan_root", "to_rgb8"]


def __getattr__(name: str) -> Any:
    """A re-exported name: import ``clbench.data.dataset`` on first use, then keep its names here."""
    if name in __all__:
        dataset = importlib.import_module("clbench.data.dataset")
        globals().update({key: getattr(dataset, key) for key in __all__})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
