"""Evaluate a method on every task's test set: the row R[step, :] of the accuracy matrix."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from clbench.data import Category, ImageStore, SampleSet
from clbench.metrics.anomaly import image_metrics, pixel_metrics
from methods.base import AnomalyMethod

@torch.no_grad()
def evaluate_task(
    method: AnomalyMethod, category: Category, task_index: int, store: ImageStore, batch_size: int, bar: tqdm | None = None
) -> dict[str, float]:
    """Metrics of one task at the evaluation resolution (= input size), on raw scores.

    Keys: ``clbench.metrics.PIXEL_KEYS`` (pixel AUROC, AUPRO, AP, F1-max over all
    pixels of the task's test set) and ``IMAGE_KEYS`` (image AUROC, AP, F1-max),
    plus ``task_id_accuracy`` for methods that predict the task.
    """
    method.eval()
    maps, scores, labels, masks = [], [], [], []
    task_hits: list[torch.Tensor] = []
    for batch in SampleSet(category.test, store).batches(batch_size):
        prediction = method.predict(batch)
        if prediction.maps.shape != batch.masks.shape:
            raise ValueError(
                f"method '{method.name}' returned maps of shape {tuple(prediction.maps.shape)}, "
                f"expected {tuple(batch.masks.shape)} (input resolution)"
            )
        maps.append(prediction.maps.float().cpu().numpy())
        scores.append(prediction.scores.float().cpu().numpy())
        labels.append(batch.labels.numpy())
        masks.append(batch.masks.numpy())
        if "task_index" in prediction.extras:
            task_hits.append(prediction.extras["task_index"].cpu() == task_index)
        if bar is not None:
            bar.update(len(batch))
    result = pixel_metrics(np.concatenate(maps), np.concatenate(masks))
    result.update(image_metrics(np.concatenate(scores), np.concatenate(labels)))
    if task_hits:
        result["task_id_accuracy"] = float(torch.cat(task_hits).float().mean())
    return result


def evaluate_all(
    method: AnomalyMethod, categories: list[Category], store: ImageStore, batch_size: int, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Metrics for every task in the stream, learned or not yet learned."""
    results = {}
    total = sum(len(c.test) for c in categories)
    with tqdm(total=total, desc="evaluate", unit="img", disable=not progress, leave=False) as bar:
        for index, category in enumerate(categories):
            results[category.name] = evaluate_task(method, category, index, store, batch_size, bar)
    return results
