"""Evaluate a method on every task's test set: the row R[step, :] of the accuracy matrix.

Two evaluation settings (``evaluation:`` in the run config):

* ``agnostic`` (default): the method sees only the test image; a method that keeps one model per
  task (PatchCore's banks) must itself decide which task an image belongs to.
* ``oracle``: the batch also carries the image's *task index* (``Batch.task_index``): the index of
  the step that taught its category (``task_indices``), for categories taught by the current step.
  A category not yet taught has no model to route to, so it is evaluated as under ``agnostic``.

A method that routes reports the task it picked in ``Prediction.extras["task_index"]`` (its own
choice, also under ``oracle``); the engine compares it with the true task index, per evaluated
task, as ``task_id_accuracy``: NaN for tasks not yet taught (no answer is right), so every
(step, task) still has its row. Methods without that key get no such rows. The engine reads
``extras`` only by key: it never knows which method it runs.
"""
from __future__ import annotations

import math
from typing import Any, Container, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from clbench.data import Batch, Category, ImageStore
from clbench.data.dataset import prefetched_batches
from clbench.metrics.anomaly import image_metrics, pixel_metrics
from methods.base import AnomalyMethod

TASK_ID_METRIC = "task_id_accuracy"
TASK_ID_KEY = "task_index"  # the key of Prediction.extras a routing method fills


def task_indices(steps: Sequence[Sequence[str]]) -> dict[str, int]:
    """Category -> task index: the index of the step that teaches it (``steps``: the categories each
    training step teaches, in order). One category per step: its position in the stream; a step
    teaching several categories gives them one index, as PatchCore keeps one bank per step. A
    category taught again later keeps its first step."""
    index: dict[str, int] = {}
    for step, names in enumerate(steps):
        for name in names:
            index.setdefault(name, step)
    return index


def _test_batches(category: Category, store: ImageStore, batch_size: int, task_index: int | None):
    samples = category.test
    yield from prefetched_batches((samples[start:start + batch_size] for start in range(0, len(samples), batch_size)),
                                  store, task_index)


@torch.no_grad()
def evaluate_task(
    method: AnomalyMethod, category: Category, store: ImageStore, batch_size: int, *,
    task_index: int | None = None, oracle: bool = False, bar: tqdm | None = None,
    keep_maps: Container[str] = (), kept: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Metrics of one task at the evaluation resolution (= input size), on raw scores.

    Keys: ``clbench.metrics.PIXEL_KEYS`` (pixel AUROC, AUPRO, AP, F1-max over all pixels of the
    task's test set) and ``IMAGE_KEYS`` (image AUROC, AP, F1-max), plus ``task_id_accuracy`` for
    methods that return ``extras["task_index"]``: the fraction of test images routed to
    ``task_index`` (NaN when it is None: a task not yet taught). ``oracle`` gives ``task_index``
    to the method in every batch (only when it is not None). The maps of the images whose keys are in
    ``keep_maps`` are put into ``kept`` (the run's probe maps: clbench.engine.probes).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    method.eval()
    given = task_index if oracle else None
    maps, scores, labels, masks = [], [], [], []
    routed: list[torch.Tensor] = []
    for batch in _test_batches(category, store, batch_size, given):
        prediction = method.predict(batch)
        _check_prediction(method, batch, prediction.maps.shape, prediction.extras, bool(routed), len(maps))
        maps.append(prediction.maps.float().cpu().numpy())
        if kept is not None:
            kept.update((key, maps[-1][i]) for i, key in enumerate(batch.keys) if key in keep_maps)
        scores.append(prediction.scores.float().cpu().numpy())
        labels.append(batch.labels.numpy())
        masks.append(batch.masks.numpy())
        if TASK_ID_KEY in prediction.extras:
            routed.append(prediction.extras[TASK_ID_KEY].cpu().long())
        if bar is not None:
            bar.update(len(batch))
    result = pixel_metrics(np.concatenate(maps), np.concatenate(masks))
    result.update(image_metrics(np.concatenate(scores), np.concatenate(labels)))
    if routed:
        hits = None if task_index is None else (torch.cat(routed) == task_index).float()
        result[TASK_ID_METRIC] = math.nan if hits is None else float(hits.mean())
    return result


def _check_prediction(method: AnomalyMethod, batch: Batch, shape: torch.Size, extras: Mapping[str, Any],
                      routed_before: bool, batches_before: int) -> None:
    """Maps at input resolution; a task index per image, in every batch or in none."""
    if shape != batch.masks.shape:
        raise ValueError(f"method '{method.name}' returned maps of shape {tuple(shape)}, "
                         f"expected {tuple(batch.masks.shape)} (input resolution)")
    if TASK_ID_KEY in extras:
        found = tuple(extras[TASK_ID_KEY].shape)
        if found != (len(batch),):
            raise ValueError(f"method '{method.name}' returned extras['{TASK_ID_KEY}'] of shape {found}, "
                             f"expected ({len(batch)},): one task index per image")
    if batches_before and (TASK_ID_KEY in extras) != routed_before:
        raise ValueError(f"method '{method.name}' returned extras['{TASK_ID_KEY}'] for some batches of a task "
                         "and not for others: a task index is needed for every image or for none")


def evaluate_all(
    method: AnomalyMethod, categories: list[Category], store: ImageStore, batch_size: int, progress: bool = True,
    *, taught: Mapping[str, int], oracle: bool = False, keep_maps: Container[str] = (),
    kept: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics for every task in the stream, learned or not yet learned.

    ``taught``: category -> task index (``task_indices``) of the categories taught so far; the others
    get no oracle index and a NaN ``task_id_accuracy``."""
    results = {}
    total = sum(len(c.test) for c in categories)
    with tqdm(total=total, desc="evaluate", unit="img", disable=not progress, leave=False) as bar:
        for category in categories:
            results[category.name] = evaluate_task(method, category, store, batch_size,
                                                   task_index=taught.get(category.name), oracle=oracle, bar=bar,
                                                   keep_maps=keep_maps, kept=kept)
    return results


def task_id_summary(R: np.ndarray, tasks: Sequence[str], task_index: Mapping[str, int]) -> dict[str, Any]:
    """The summary of ``task_id_accuracy`` (R: steps x tasks, NaN where a task was not yet taught):
    ``acc``, the mean over the tasks taught by the final step (the final mean); ``per_step``, the
    same mean after every step; ``final`` per task. Entries before a task's teaching step are not
    undefined values but questions without an answer, so they never make the summary null."""
    R = np.asarray(R, dtype=np.float64)
    per_step = []
    for step in range(R.shape[0]):
        columns = [j for j, name in enumerate(tasks) if task_index.get(name, math.inf) <= step]
        values = R[step, columns]
        per_step.append(float(values.mean()) if values.size and not np.isnan(values).any() else math.nan)
    return {"acc": per_step[-1], "per_step": per_step, "final": dict(zip(tasks, R[-1].tolist()))}
