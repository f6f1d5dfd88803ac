"""A clbench task stream as an Avalanche benchmark, so an Avalanche user can run their own strategy
on clbench's data and score it with clbench's metrics.

The stream is the one a clbench run would learn: the same task specs (a list, ``all``, a count, a
preset, a protocol such as ``mvtec:10-5``), order and held-out split (``clbench.engine.tasks``,
``clbench.data.load_category``), decoded by clbench's ``ImageStore`` (same resize, crop and masks),
so an Avalanche strategy and a clbench method see identical pixels. One experience per step, task
label = step index::

    train_stream[i]: the step's good training images      item (image, 0, mask, i)
    valid_stream[i]: its held-out good images (only when some step has any)
    test_stream[i]:  its test images, labels and masks     item (image, label, mask, i)

``image`` is uint8 (3, H, W), ``label`` 0 good / 1 defect, ``mask`` bool (H, W) (all False for good
images); the trailing task label is Avalanche's ``targets_task_labels``, appended by Avalanche so its
strategies find it at ``mbatch[-1]``. ``targets`` (the labels) is a data attribute as in Avalanche's
classification datasets. avalanche-lib is an optional extra, imported only inside the functions
that need it (``import avalanche`` takes several seconds)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clbench.data import ImageStore, Sample, SampleSet, load_category, scan_root
from clbench.engine.tasks import resolve_schedule
from clbench.metrics.anomaly import image_metrics, pixel_metrics

__all__ = ["MISSING", "SampleDataset", "as_benchmark", "evaluate_experience", "evaluate_maps"]

MISSING = "avalanche-lib is not installed: pip install 'clbench[avalanche]'"


def _require_avalanche() -> None:
    """Import avalanche or fail with one line saying how to install it."""
    try:
        importlib.import_module("avalanche")
    except ImportError:
        raise ModuleNotFoundError(MISSING) from None


class SampleDataset(Dataset):
    """A ``SampleSet`` as a torch Dataset: (uint8 CHW image, label, bool HxW mask) per sample.

    Decoding goes through the set's ``ImageStore`` (its cache and warnings), one sample at a time."""

    def __init__(self, samples: SampleSet) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        sample: Sample = self.samples.samples[index]
        store = self.samples.store
        return store.image(sample), sample.label, store.mask(sample)

    @property
    def targets(self) -> list[int]:
        """The labels (0 good, 1 defect), without decoding any image."""
        return [sample.label for sample in self.samples.samples]


def _experience_dataset(samples: SampleSet, task_label: int) -> Any:
    """An AvalancheDataset of ``samples`` with ``targets`` and constant task labels."""
    from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute, TaskLabels

    data = SampleDataset(samples)
    return AvalancheDataset([data], data_attributes=[DataAttribute(data.targets, "targets"),
                                                     TaskLabels([task_label] * len(data))])


def as_benchmark(data_root: str | Path, tasks: Any = "all", *, task_order: str = "given", image_size: int = 128,
                 crop_size: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                 cache_bytes: int | None = None) -> Any:
    """The Avalanche benchmark (``CLScenario`` with task labels) of a clbench stream.

    ``tasks``, ``task_order``, ``val_fraction``, ``seed``, ``image_size``, ``crop_size``: as in a run's
    config (``val_fraction`` 0: every good training image is in the train stream, unless the dataset
    has its own ``validation/good``). ``data_root`` is an MVTec-layout root (other formats:
    ``clbench data convert`` first). The benchmark also carries ``schedule`` (the categories of each
    step) and ``store`` (the shared ``ImageStore``; ``cache_bytes`` bounds its decoded images)."""
    _require_avalanche()
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    scan = scan_root(data_root)
    schedule = resolve_schedule(tasks, scan.categories, task_order, seed, root=scan.root, incomplete=scan.incomplete)
    # decode_workers=0: items are decoded one at a time (a DataLoader's workers parallelise instead)
    store = ImageStore(image_size, crop_size, decode_workers=0, cache_bytes=cache_bytes)
    streams: dict[str, list[Any]] = {"train": [], "valid": [], "test": []}
    for step, names in enumerate(schedule):
        categories = [load_category(data_root, name, val_fraction, seed) for name in names]
        for stream, part in (("train", "train"), ("valid", "val"), ("test", "test")):
            samples = SampleSet([s for c in categories for s in getattr(c, part)], store)
            streams[stream].append(_experience_dataset(samples, step))
    if not any(len(dataset) for dataset in streams["valid"]):
        del streams["valid"]
    benchmark = with_task_labels(benchmark_from_datasets(**streams))
    benchmark.schedule = [tuple(step) for step in schedule]
    benchmark.store = store
    return benchmark


def _as_array(values: Any) -> np.ndarray:
    """A tensor, an array, or a list of batches of either, as one numpy array."""
    if isinstance(values, (list, tuple)):
        return np.concatenate([_as_array(v) for v in values])
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)


def evaluate_maps(maps: Any, masks: Any, scores: Any = None, labels: Any = None) -> dict[str, float]:
    """clbench's metrics of anomaly maps (N, H, W) against masks: the pixel metrics of a clbench run
    (``clbench.metrics.PIXEL_KEYS``) and, given image ``scores`` and ``labels``, the image metrics.
    Each argument may be a tensor, an array or a list of per-batch ones."""
    result = pixel_metrics(_as_array(maps), _as_array(masks))
    if (scores is None) != (labels is None):
        raise ValueError("evaluate_maps: give both scores and labels, or neither")
    if scores is not None:
        result.update(image_metrics(_as_array(scores), _as_array(labels)))
    return result


@torch.no_grad()
def evaluate_experience(predict: Callable[[torch.Tensor, torch.Tensor], Any], experience: Any,
                        batch_size: int = 32) -> dict[str, float]:
    """Score ``predict`` on a test experience with ``evaluate_maps``, as clbench scores a task.

    ``predict(images, task_labels)`` gets uint8 (B, 3, H, W) images and returns maps (B, H, W), or
    (maps, scores); without scores an image's score is its map's maximum."""
    dataset = experience.dataset.eval()
    maps, scores, labels, masks = [], [], [], []
    for images, batch_labels, batch_masks, task_labels in DataLoader(dataset, batch_size=batch_size,
                                                                       collate_fn=dataset.collate_fn):
        out = predict(images, task_labels)
        batch_maps, batch_scores = out if isinstance(out, tuple) else (out, None)
        batch_maps = torch.as_tensor(batch_maps)
        if tuple(batch_maps.shape) != tuple(batch_masks.shape):
            raise ValueError(f"predict returned maps of shape {tuple(batch_maps.shape)}, "
                             f"expected {tuple(batch_masks.shape)} (one map per image, at input resolution)")
        if batch_scores is None:
            batch_scores = batch_maps.flatten(1).amax(1)
        maps.append(batch_maps)
        scores.append(torch.as_tensor(batch_scores))
        labels.append(batch_labels)
        masks.append(batch_masks)
    return evaluate_maps(maps, masks, scores, labels)

