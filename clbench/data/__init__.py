"""Data: datasets in MVTec AD layout (``dataset``: discovery, validation, the held-out split,
decoding, batching), ``check`` (``clbench data check``), ``root`` (a run's data root, and where the
synthetic dataset may be generated) and ``synth`` (the built-in synthetic dataset).

The dataset's names are re-exported here, so ``from clbench.data import Batch, SampleSet`` reads short."""
from clbench.data.dataset import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WIDE_GREY_MODES,
    Batch,
    Category,
    DatasetError,
    ImageStore,
    RootScan,
    Sample,
    SampleSet,
    collate,
    empty_mask_message,
    inspect_category,
    is_hidden,
    is_wide,
    list_categories,
    load_category,
    load_rgb8,
    mask_pixels,
    normalize,
    open_image,
    scan_root,
    to_rgb8,
)

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "WIDE_GREY_MODES", "Batch", "Category", "DatasetError",
           "ImageStore", "RootScan", "Sample", "SampleSet", "collate", "empty_mask_message", "inspect_category",
           "is_hidden", "is_wide", "list_categories", "load_category", "load_rgb8", "mask_pixels", "normalize",
           "open_image", "scan_root", "to_rgb8"]
