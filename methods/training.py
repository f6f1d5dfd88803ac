"""The gradient-training loop shared by trainable methods (STFPM, CFA, FastFlow, CAINNFlow).

One place for: epochs over the step's stream (seeded shuffling, so a resumed run reproduces an
uninterrupted one), a guard that stops on a non-finite loss, early stopping on the held-out *good
training* images (``data.val``; never the test set) with the best weights restored, and the
``fit_info`` record the engine logs to training.csv.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch

from clbench.data import Batch
from methods.base import AnomalyMethod, TaskData

LossFn = Callable[[Batch], torch.Tensor]


@torch.no_grad()
def held_out_loss(method: AnomalyMethod, data: TaskData, loss_fn: LossFn, batch_size: int) -> float:
    """Mean loss per image over the held-out good training images, in eval mode."""
    method.eval()
    total, count = 0.0, 0
    for batch in data.val.batches(batch_size):
        total += float(loss_fn(batch)) * len(batch)
        count += len(batch)
    return total / count


def fit_epochs(
    method: AnomalyMethod,
    data: TaskData,
    loss_fn: LossFn,
    optimiser: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    patience: int | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """Train ``epochs`` epochs (fewer with early stopping); returns the step's fit_info.

    Early stopping runs when ``patience`` is set and held-out images exist: after each epoch the
    held-out loss is measured; ``patience`` epochs without improvement stop training, and the
    method's state at the best epoch is restored.
    """
    early_stopping = patience is not None and len(data.val) > 0
    best_loss, best_state, best_epoch, stale = math.inf, None, -1, 0
    first_loss = last_loss = math.nan
    images, start, epoch = 0, time.perf_counter(), -1
    for epoch in range(epochs):
        method.train()
        total, count = 0.0, 0
        for batch in data.train.batches(batch_size, shuffle=True, seed=data.seed * 1000 + epoch):
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{method.name}: non-finite training loss ({float(loss)}) at epoch {epoch} of "
                    f"{', '.join(data.task_names)} (try a lower learning rate)"
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
            count += len(batch)
        if scheduler is not None:
            scheduler.step()
        images += count
        last_loss = total / count
        first_loss = last_loss if epoch == 0 else first_loss
        if not early_stopping:
            continue
        val_loss = held_out_loss(method, data, loss_fn, batch_size)
        if val_loss < best_loss:
            best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(method.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    seconds = time.perf_counter() - start
    if best_state is not None:
        method.load_state_dict(best_state)
    method.eval()
    return {
        "epochs_run": epoch + 1,
        "epochs_max": epochs,
        "best_epoch": best_epoch,
        "train_loss_first": first_loss,
        "train_loss_last": last_loss,
        "val_loss_best": best_loss if early_stopping else math.nan,
        "val_loss_last": held_out_loss(method, data, loss_fn, batch_size) if len(data.val) else math.nan,
        "train_images": images,
        "train_images_per_s": images / seconds if seconds > 0 else math.nan,
    }
