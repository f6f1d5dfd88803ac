"""CFA against anomalib 2.7.0's ``CfaModel`` (resnet18, layers 1-3, gamma_c = gamma_d = 1, K = J = 3,
r = 1e-5): the same backbone and descriptor weights give the same memory bank
(``initialize_centroid`` vs ``task_bank``), anomaly maps, image scores, training loss (``CfaLoss``)
and, with ``learn_radius=False`` (anomalib's constant radius), the same AdamW step.

anomalib's ``CoordConv2d`` subclasses ``Conv2d`` and also builds an inner ``conv2d``; only the inner
one is used. clbench's ``descriptor.conv`` is mapped onto it, and the dead outer weights are filled
with NaN: any use of them would poison every output.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import anomalib.models.image.cfa.torch_model as anomalib_cfa
from anomalib.models.image.cfa.lightning_model import Cfa as AnomalibCfa
from anomalib.models.image.cfa.loss import CfaLoss
from clbench.features.backbones import BackbonePool
from clbench.data import Batch, ImageStore, SampleSet, normalize
from methods.base import MethodContext, TaskData
from methods.cfa import CFA
from helpers import InMemoryStream, smooth_batch

SIZE, BATCH = 64, 4


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Element-wise, for positive quantities (maps, scores)."""
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: for signed features, whose entries near 0 (e.g. 5e-6, off by 3e-9
    from summation order) make an element-wise ratio meaningless."""
    return float((a - b).abs().max() / b.abs().max())


def task_data(batch: Batch, step: int = 0) -> TaskData:
    task = batch.keys[0].split("/", 1)[0]
    return TaskData(step, (task,), InMemoryStream(batch), SampleSet((), ImageStore(SIZE)), seed=step)


def build_pair(monkeypatch: pytest.MonkeyPatch) -> tuple[CFA, anomalib_cfa.CfaModel]:
    """clbench CFA and anomalib CfaModel with the same weights (no download: torchvision weights=None)."""

    def random_init_extractor(backbone: str, return_nodes: list[str]):
        model = getattr(torchvision.models, backbone)(weights=None)
        return create_feature_extractor(model=model, return_nodes=return_nodes).eval()

    monkeypatch.setattr(anomalib_cfa, "get_feature_extractor", random_init_extractor)
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=SIZE, seed=0, progress=False, max_epochs=1)
    ours = CFA(context, backbone="resnet18", batch_size=BATCH, learn_radius=False)
    ref = anomalib_cfa.CfaModel(backbone="resnet18", gamma_c=1, gamma_d=1, num_nearest_neighbors=3,
                                num_hard_negative_features=3, radius=1e-5)
    # timm and torchvision ResNet-18 share parameter names: the backbone state dict maps 1:1
    ref.feature_extractor.load_state_dict(ours.backbone.model.state_dict(), strict=True)
    coord = ref.descriptor.layer
    with torch.no_grad():
        coord.conv2d.weight.copy_(ours.descriptor.conv.weight)
        coord.conv2d.bias.copy_(ours.descriptor.conv.bias)
        coord.weight.fill_(float("nan"))  # the dead outer Conv2d of CoordConv2d
        coord.bias.fill_(float("nan"))
    return ours, ref


@pytest.fixture
def pair(monkeypatch):
    return build_pair(monkeypatch)


def test_bank_maps_scores_and_loss_match_anomalib(pair) -> None:
    ours, ref = pair
    train = smooth_batch(2 * BATCH, seed=0, size=SIZE)  # full batches: anomalib's mean of batch means is exact
    test = smooth_batch(3, seed=1, size=SIZE)

    # memory bank: anomalib's initialize_centroid vs clbench's task bank (single task)
    loader = [SimpleNamespace(image=normalize(train.pixels[i : i + BATCH])) for i in range(0, len(train), BATCH)]
    ref.initialize_centroid(loader)  # (d, P)
    bank, batches = ours.task_bank(task_data(train))  # (P, d)
    assert bank.shape == ref.memory_bank.t().shape == (16 * 16, 448) and batches == 2
    assert scaled_diff(bank, ref.memory_bank.t()) <= 1e-5
    ours.update_bank(bank, batches)
    with torch.no_grad():
        ref.memory_bank.copy_(ours.memory_bank.t())  # identical banks from here on

    # anomaly maps and image scores (eval mode)
    ref.eval()
    expected = ref(normalize(test.pixels))
    got = ours.predict(test)
    assert got.maps.shape == expected.anomaly_map.shape == (3, SIZE, SIZE)
    assert max_rel_diff(got.maps, expected.anomaly_map) <= 1e-4
    assert max_rel_diff(got.scores, expected.pred_score) <= 1e-4

    # one training step's loss (train mode, same batch)
    ours.train(), ref.train()
    batch = next(InMemoryStream(train).batches(BATCH))
    loss_ours = ours._loss(batch)
    loss_ref = CfaLoss(num_nearest_neighbors=3, num_hard_negative_features=3, radius=1e-5)(ref(normalize(batch.pixels)))
    assert loss_ref.item() > 0
    assert abs(loss_ours.item() - loss_ref.item()) <= 1e-4 * loss_ref.item()

    # one optimiser step: clbench's AdamW (constant r) == anomalib's configure_optimizers
    coord = ref.descriptor.layer
    before = ours.descriptor.conv.weight.detach().clone()
    optimiser_ref = AnomalibCfa.configure_optimizers(SimpleNamespace(model=ref))
    optimiser_ours = ours.build_optimiser()
    for loss, optimiser in ((loss_ours, optimiser_ours), (loss_ref, optimiser_ref)):
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert (ours.descriptor.conv.weight - before).abs().max().item() > 5e-4  # Adam's first step: about lr
    torch.testing.assert_close(ours.descriptor.conv.weight, coord.conv2d.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.descriptor.conv.bias, coord.conv2d.bias, rtol=1e-4, atol=1e-6)
    assert torch.isnan(coord.weight).all() and coord.weight.grad is None  # the outer conv took no part
    assert ours.radius.item() == pytest.approx(1e-5, rel=1e-6) == ref.radius.item()  # r did not move


def test_learnable_radius_is_the_documented_difference(pair) -> None:
    """clbench's default trains r (CFA's code, the paper's code); anomalib's r never moves."""
    ours, ref = pair
    learnable = CFA(ours.context, backbone="resnet18", batch_size=BATCH)  # learn_radius: True (default)
    assert learnable.radius.requires_grad and not ref.radius.is_leaf  # anomalib's r is no Parameter
    assert all(p is not ref.radius for p in ref.parameters())
    train = smooth_batch(BATCH, seed=2, size=SIZE)
    learnable.update_bank(*learnable.task_bank(task_data(train)))
    optimiser = learnable.build_optimiser()
    assert any(p is learnable.radius for group in optimiser.param_groups for p in group["params"])
    learnable.train()
    loss = learnable._loss(train)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    assert learnable.radius.item() > 5e-4  # attraction pulls r up: Adam's first step is about +lr
