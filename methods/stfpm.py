"""STFPM: student-teacher feature pyramid matching (Wang et al. 2021; seed 003 section 1.4).

Teacher: a frozen ResNet18 (ImageNet weights when available), layers 1-3, through the run's shared
backbone cache (each image passes it once per run). Student: the same architecture truncated at
layer3, randomly initialised (as in the STFPM paper) and trained to match the teacher's
L2-normalised features. Choices where papers are vague:

* loss per layer = 0.5 / (h*w) * sum over batch and positions of ||t - s||^2 (the STFPM authors'
  code: summed over the batch, so "B+B" replay batches weigh twice a plain batch); layers summed.
* optimiser: SGD, lr 0.4, momentum 0.9, weight decay 1e-4 (STFPM paper); a fresh optimiser per task,
  the student's weights carried over (continual fine-tuning).
* seed 003: batch 8 (+8 replay), up to 100 epochs with early stopping. Early stopping monitors the
  loss on the held-out *good training* images (never the test set), patience 10 epochs; the best
  weights are restored. Without held-out images, all epochs run.
* map = product over layers of the per-position 0.5*||t - s||^2, each upsampled (bilinear) to the
  input size (seed 003 eq. for Omega); image score = max of the map.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from clbench.backbones import trainable_feature_model
from clbench.data import Batch
from clbench.maps import finite_or_raise, upsample
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData


def layer_distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, 0.5 * squared distance of channel-normalised features: (B, h, w) each."""
    return [
        0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1)
        for t, s in zip(teacher, student)
    ]


def stfpm_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    return sum(d.sum() / (d.shape[-2] * d.shape[-1]) for d in layer_distances(teacher, student))


@METHODS.register("stfpm")
class STFPM(AnomalyMethod):
    hyperparameters = {
        "backbone": "resnet18",
        "layers": ["layer1", "layer2", "layer3"],
        "batch_size": 8,
        "epochs": 100,
        "patience": 10,
        "lr": 0.4,
        "momentum": 0.9,
        "weight_decay": 1e-4,
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        self.teacher = context.backbones.get(p["backbone"], p["layers"])
        self.student = trainable_feature_model(p["backbone"], p["layers"], seed=context.seed)

    def frozen_backbones(self):
        return [self.teacher]

    def _loss(self, batch: Batch) -> torch.Tensor:
        teacher = self.teacher.features(batch)
        student = self.student(batch.normalized(self.context.device))
        return stfpm_loss(teacher, student)

    @torch.no_grad()
    def _validation_loss(self, data: TaskData) -> float:
        self.student.eval()
        total, count = 0.0, 0
        for batch in data.val.batches(self.params["batch_size"]):
            total += float(self._loss(batch))
            count += len(batch)
        return total / count

    def fit_task(self, data: TaskData) -> None:
        p = self.params
        optimiser = torch.optim.SGD(self.student.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"])
        epochs = self.num_epochs(p["epochs"])
        best_loss, best_state, best_epoch, stale = math.inf, None, -1, 0
        first_loss = last_loss = math.nan
        epoch = -1
        for epoch in range(epochs):
            self.student.train()
            total, count = 0.0, 0
            for batch in data.train.batches(p["batch_size"], shuffle=True, seed=data.seed * 1000 + epoch):
                loss = self._loss(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"STFPM: non-finite training loss at epoch {epoch} of {data.task_names}")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(batch)
                count += len(batch)
            last_loss = total / count
            first_loss = last_loss if epoch == 0 else first_loss
            if len(data.val) == 0:
                continue
            val_loss = self._validation_loss(data)
            if val_loss < best_loss:
                best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(self.student.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= p["patience"]:
                    break
        if best_state is not None:
            self.student.load_state_dict(best_state)
        self.student.eval()
        self.fit_info = {
            "epochs_run": epoch + 1, "epochs_max": epochs, "best_epoch": best_epoch,
            "train_loss_first": first_loss, "train_loss_last": last_loss, "val_loss_best": best_loss,
        }

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        self.student.eval()
        teacher = self.teacher.features(batch)
        student = self.student(batch.normalized(self.context.device))
        maps = torch.ones(len(batch), self.context.image_size, self.context.image_size, device=self.context.device)
        for distance in layer_distances(teacher, student):
            maps = maps * upsample(distance, self.context.image_size)
        maps = finite_or_raise(maps, "STFPM").float().cpu()
        return Prediction(maps=maps, scores=maps.flatten(1).amax(dim=1))
