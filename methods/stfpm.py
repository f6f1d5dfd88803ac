"""STFPM: student-teacher feature pyramid matching (Wang et al. 2021; seed 003 section 1.4).

Teacher: a frozen ResNet18 (ImageNet weights when available), layers 1-3, through the run's shared
backbone cache (each image passes it once per run). Student: the same architecture truncated at
layer3, randomly initialised (as in the STFPM paper) from a seed distinct from the teacher's, so that
a random-init teacher (``weights: none``) is never the student's copy (both used the run seed; only
the probe model ``out_indices`` builds inside the seeded block kept them apart). Trained to match the
teacher's L2-normalised features.
tests/test_parity_stfpm.py checks maps, scores, loss and one SGD step against anomalib 2.7.0.
Choices where papers are vague:

* loss per layer = 0.5 / (h*w) * sum over batch and positions of ||t - s||^2 (the STFPM authors'
  code, anomalib's and the paper's code's ``STFPMLoss``: summed over the batch, so "B+B" replay
  batches weigh twice a plain batch); layers summed.
* optimiser: SGD, lr 0.4, momentum 0.9, weight decay 1e-4. Seed 003 is silent, so the STFPM paper's
  values (lr 0.4, momentum 0.9, wd 1e-4); the paper's code hard-codes the same in
  ``Trainer_STFPM`` (its ``configurations/models/stfpm.json`` says ``weight_decay: 1e-5`` but the
  trainer never reads it); anomalib 2.7.0 uses wd 1e-3 (``Stfpm.configure_optimizers``).
  ``optimizer_state`` reset (default: fresh per task) | keep (one for the stream, as the paper's code
  builds it once in ``Trainer_STFPM.__init__``); the student's weights are carried over.
* seed 003: batch 8 (+8 replay), up to 100 epochs with early stopping. Early stopping monitors the
  loss on the held-out *good training* images (never the test set), patience 10 epochs; the best
  weights are restored. Without held-out images, all epochs run. (The paper's code: 50 epochs from
  ``train_stfpm.json``, early stopping on the *test set's* pixel F1 with patience 7, and for
  ``stfpm`` it does not restore the best epoch's weights; not reproduced.)
* map = product over layers of the per-position 0.5*||t - s||^2, each upsampled (bilinear) to the
  input size (seed 003 eq. for Omega; anomalib and the paper's code: no smoothing); image score =
  max of the map (anomalib; the paper's code also takes the max of its min-max rescaled maps).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from clbench.features.backbones import trainable_feature_model
from clbench.data import Batch
from clbench.engine import seeding
from clbench.features.maps import finite_or_raise, upsample
from clbench.params import BACKBONE, LAYERS, NON_NEGATIVE, POSITIVE_INT, Param
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData
from methods.training import fit_epochs


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
        "backbone": Param("resnet18", BACKBONE),
        "layers": Param(["layer1", "layer2", "layer3"], LAYERS),
        "batch_size": Param(8, POSITIVE_INT),
        "epochs": Param(100, POSITIVE_INT),
        "patience": Param(10, [None, POSITIVE_INT]),  # None: no early stopping
        "lr": Param(0.4, NON_NEGATIVE),
        "momentum": Param(0.9, NON_NEGATIVE),
        "weight_decay": Param(1e-4, NON_NEGATIVE),  # STFPM paper and the paper's code; anomalib 1e-3
        "optimizer_state": "reset",  # reset | keep (its constraint: AnomalyMethod's)
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        self.teacher = context.backbones.get(p["backbone"], p["layers"])
        self.student = trainable_feature_model(p["backbone"], p["layers"], seed=seeding.student_seed(context.seed))

    def frozen_backbones(self):
        return [self.teacher]

    def _loss(self, batch: Batch) -> torch.Tensor:
        teacher = self.teacher.features(batch)
        student = self.student(batch.normalized(self.context.device))
        return stfpm_loss(teacher, student)

    def continual_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The student's feature map per layer (``student/<layer>``, (B, C, h, w)): what STFPM's loss
        compares to the teacher's, so what a distillation strategy must keep from drifting."""
        student = self.student(batch.normalized(self.context.device))
        return {f"student/{layer}": out for layer, out in zip(self.params["layers"], student)}

    def build_optimiser(self) -> torch.optim.Optimizer:
        p = self.params
        return torch.optim.SGD(self.student.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"])

    def fit_task(self, data: TaskData) -> None:
        p = self.params
        optimiser = self.task_optimiser(self.build_optimiser)
        self.fit_info = fit_epochs(
            self, data, self._loss, optimiser,
            epochs=self.num_epochs(p["epochs"]), batch_size=p["batch_size"], patience=p["patience"],
        )

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
