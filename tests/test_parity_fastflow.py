"""FastFlow against anomalib 2.7.0's ``FastflowModel`` (the reference implementation, from
gathierry/FastFlow): same ResNet18 backbone weights, same LayerNorm/flow/permutation parameters
(copied through a state-dict key map), same images. Anomaly maps and image scores agree in eval
mode, the training loss equals anomalib's ``FastflowLoss`` on anomalib's own latents and
log-Jacobians, and one optimisation step with clbench's default optimiser lands on the same
weights as anomalib's ``configure_optimizers`` Adam (lr 1e-3, weight decay 1e-5)."""
from __future__ import annotations

import pytest
import torch
from anomalib.models.image.fastflow.loss import FastflowLoss
from anomalib.models.image.fastflow.torch_model import FastflowModel

from clbench.features.backbones import BackbonePool
from clbench.data import ImageStore, SampleSet, normalize
from methods.base import MethodContext, TaskData
from methods.flows.fastflow import FastFlow
from methods.flows.common import flow_loss
from helpers import InMemoryStream, smooth_batch

SIZE, STEPS, IMAGES = 64, 8, 3
TOL = 1e-4


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def reference_key(key: str) -> str:
    """clbench state-dict key -> anomalib's: norms.* keep their names, flows.* are fast_flow_blocks.*."""
    return "fast_flow_blocks." + key[len("flows."):] if key.startswith("flows.") else key


def pair(conv3x3_only: bool) -> tuple[FastFlow, FastflowModel]:
    """clbench's FastFlow and anomalib's FastflowModel holding the same weights."""
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=SIZE, seed=0, progress=False, max_epochs=1)
    ours = FastFlow(context, backbone="resnet18", conv3x3_only=conv3x3_only, flow_steps=STEPS, batch_size=IMAGES)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move LayerNorm affine and ActNorm off their identity init: they must be copied too
        for name, param in ours.named_parameters():
            if name.startswith("norms.") or name.endswith(("global_scale", "global_offset")):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    reference = FastflowModel(input_size=(SIZE, SIZE), backbone="resnet18", pre_trained=False,
                              flow_steps=STEPS, conv3x3_only=conv3x3_only)
    state = {f"feature_extractor.{k}": v for k, v in ours.backbone.model.state_dict().items()}
    state.update({reference_key(k): v for k, v in ours.state_dict().items()})
    reference.load_state_dict(state, strict=True)  # every key maps, permutations (w_perm, w_perm_inv) included
    return ours, reference


@pytest.mark.parametrize("conv3x3_only", [True, False], ids=["3x3", "3x3-1x1"])
def test_maps_scores_loss_and_one_step_match_anomalib(conv3x3_only: bool) -> None:
    ours, reference = pair(conv3x3_only)
    kernels = {m.kernel_size for m in reference.fast_flow_blocks.modules() if isinstance(m, torch.nn.Conv2d)}
    assert kernels == ({(3, 3)} if conv3x3_only else {(1, 1), (3, 3)})
    batch = smooth_batch(IMAGES, 0, SIZE, task="parity")
    images = normalize(batch.pixels)

    # eval: anomaly maps and image scores
    prediction = ours.predict(batch)
    reference.eval()
    with torch.no_grad():
        expected = reference(images)
    expected_maps = expected.anomaly_map[:, 0]
    assert expected_maps.min() < -0.05  # not saturated at 0: the comparison means something
    assert max_rel(prediction.maps, expected_maps) <= TOL
    assert max_rel(prediction.scores, expected.pred_score.flatten()) <= TOL

    # train mode: the loss on the same batch equals FastflowLoss on anomalib's latents and jacobians
    ours.train()
    reference.train()
    loss = ours.loss(batch).detach()
    hidden, jacobians = reference(images)
    reference_loss = FastflowLoss()(hidden, jacobians).detach()
    assert abs(float(loss) - float(reference_loss)) <= TOL * abs(float(reference_loss))

    # one optimisation step: clbench's default optimiser vs anomalib's configure_optimizers
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    # in order: a shuffled batch sums the loss in another order, enough to move Adam's first step by 1e-6
    ours.fit_task(TaskData(0, ("parity",), InMemoryStream(batch, keep_order=True), SampleSet((), ImageStore(SIZE))))
    optimiser = torch.optim.Adam(reference.parameters(), lr=0.001, weight_decay=0.00001)
    optimiser.zero_grad()
    FastflowLoss()(*reference(images)).backward()
    optimiser.step()
    assert ours.fit_info["train_loss_first"] == pytest.approx(float(reference_loss), rel=TOL)
    reference_state = reference.state_dict()
    for key, value in ours.state_dict().items():
        assert (value - reference_state[reference_key(key)]).abs().max() <= 1e-6, key
    assert (ours.norms[0].weight - before["norms.0.weight"]).abs().max() > 1e-4  # the LayerNorm affine trained
    other = smooth_batch(IMAGES, 1, SIZE, task="parity")
    reference.eval()
    with torch.no_grad():
        expected_after = reference(normalize(other.pixels))
    assert max_rel(ours.predict(other).maps, expected_after.anomaly_map[:, 0]) <= TOL


def test_flow_loss_is_fastflow_loss_and_not_per_dimension() -> None:
    generator = torch.Generator().manual_seed(0)
    zs = [torch.randn(4, c, s, s, generator=generator) for c, s in ((64, 16), (128, 8), (256, 4))]
    jacobians = [100 * torch.randn(4, generator=generator) for _ in zs]
    expected = FastflowLoss()(zs, jacobians)
    assert float(flow_loss(zs, jacobians)) == pytest.approx(float(expected), rel=1e-6)
    # the previous objective (NLL per dimension, averaged over levels) is ~3 * C*h*w times smaller
    per_dimension = torch.stack([((0.5 * z.pow(2).flatten(1).sum(1) - j) / z[0].numel()).mean()
                                 for z, j in zip(zs, jacobians)]).mean()
    assert float(per_dimension) != pytest.approx(float(expected), rel=1e-2)


def test_default_optimiser_is_fastflows() -> None:
    params = FastFlow.resolve_params({})
    assert (params["lr"], params["weight_decay"], list(params["adam_betas"])) == (1e-3, 1e-5, [0.9, 0.999])
    assert params["norm_affine"] is True and params["optimizer_state"] == "reset"
