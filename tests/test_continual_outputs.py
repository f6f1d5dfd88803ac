"""``AnomalyMethod.continual_outputs``: the differentiable outputs of a method's trained networks, which
distillation strategies (LwF, DER++) distil and MAS differentiates (issue 15).

Each gradient-trained method is built tiny (random-init resnet18 backbones, narrow networks) and
checked for what a strategy relies on: named float tensors with the batch dimension; gradients
reach every trained network of the method and no frozen parameter; eval mode is deterministic;
the outputs are those the method scores with (its ``predict`` maps rebuilt from them, where that is
a one-line formula). Methods that learn no weights refuse with a one-line error naming them."""
from __future__ import annotations

import warnings

import pytest
import torch

from clbench.features.backbones import BackbonePool
from methods.base import METHODS, AnomalyMethod, MethodContext
from helpers import smooth_batch

SIZE = 32
SIZES = {"efficientad": 64}  # EfficientAD's PDN needs at least 64 px
PARAMS = {
    "stfpm": {},
    "cfa": {"backbone": "resnet18", "gamma_d": 4},
    "fastflow": {"backbone": "resnet18", "flow_steps": 2},
    "cainnflow": {"backbone": "resnet18"},
    "efficientad": {"out_channels": 16, "penalty_images": 2, "standin_images": 2},
    "draem": {"base_width": 4, "disc_base_width": 4},
}
# the networks each method trains: every one must receive a gradient from the outputs
TRAINED = {
    "stfpm": ["student"],
    "cfa": ["descriptor"],
    "fastflow": ["flows", "norms"],
    "cainnflow": ["flows", "norms"],
    "efficientad": ["student", "autoencoder"],
    "draem": ["reconstructive", "discriminative"],
}
BATCH = 3


def build(name: str, **params) -> AnomalyMethod:
    size = SIZES.get(name, SIZE)
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=size, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EfficientAD's stand-in teacher warning (no teacher is used here)
        return METHODS.get(name)(context, **params)


@pytest.fixture(scope="module", params=sorted(PARAMS))
def built(request) -> tuple[str, AnomalyMethod]:
    torch.manual_seed(0)
    return request.param, build(request.param, **PARAMS[request.param])


def batch_for(name: str, seed: int = 1):
    return smooth_batch(BATCH, seed, SIZES.get(name, SIZE), noise=0.2)


def test_outputs_are_named_float_tensors_with_the_batch_dimension(built) -> None:
    name, method = built
    method.train()
    outputs = method.continual_outputs(batch_for(name))
    assert isinstance(outputs, dict) and outputs, name
    for key, value in outputs.items():
        assert isinstance(key, str) and key
        assert isinstance(value, torch.Tensor) and value.is_floating_point(), key
        assert value.shape[0] == BATCH, (key, value.shape)
        assert value.requires_grad, key
        assert torch.isfinite(value).all(), key


def test_gradients_reach_every_trained_network_and_no_frozen_parameter(built) -> None:
    name, method = built
    method.train()
    method.zero_grad(set_to_none=True)
    outputs = method.continual_outputs(batch_for(name))
    sum(v.pow(2).sum() for v in outputs.values()).backward()
    for module in TRAINED[name]:
        grads = [p.grad for p in getattr(method, module).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: no gradient on '{module}'"
    frozen = [p for p in method.parameters() if not p.requires_grad]
    frozen += [p for backbone in method.frozen_backbones() for p in backbone.model.parameters()]
    assert all(p.grad is None for p in frozen), name
    method.zero_grad(set_to_none=True)


def test_eval_mode_is_deterministic(built) -> None:
    name, method = built
    method.eval()
    first = method.continual_outputs(batch_for(name))
    second = method.continual_outputs(batch_for(name))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_outputs_depend_on_the_images(built) -> None:
    """In training mode: untrained DRAEM in eval mode is input-independent (its N(0, 0.02) init with
    BatchNorm's unit running variance leaves every ReLU dead), batch statistics are not."""
    name, method = built
    method.train()
    first = method.continual_outputs(batch_for(name))
    other = method.continual_outputs(batch_for(name, seed=2))
    assert first.keys() == other.keys()
    assert all(not torch.allclose(first[k], other[k]) for k in first), f"{name}: an output ignores the images"


def test_outputs_are_what_the_method_scores_with() -> None:
    """predict's maps rebuilt from the outputs (independently of the methods' own forward code)."""
    batch = batch_for("draem")
    draem = build("draem", **PARAMS["draem"]).eval()
    logits = draem.continual_outputs(batch)["logits"]
    torch.testing.assert_close(torch.softmax(logits.detach(), dim=1)[:, 1], draem.predict(batch).maps)

    flow = build("fastflow", **PARAMS["fastflow"]).eval()
    outputs = flow.continual_outputs(batch)
    maps = torch.stack([
        torch.nn.functional.interpolate(-torch.exp(-0.5 * outputs[f"z/{layer}"].detach().pow(2).mean(1, keepdim=True)),
                                        size=SIZE, mode="bilinear")[:, 0]
        for layer in ("layer1", "layer2", "layer3")
    ]).mean(0)
    torch.testing.assert_close(maps, flow.predict(batch).maps)

    stfpm = build("stfpm").eval()
    students = stfpm.continual_outputs(batch)
    teacher = stfpm.teacher.features(batch)
    maps = torch.ones(BATCH, SIZE, SIZE)
    for t, layer in zip(teacher, ("layer1", "layer2", "layer3")):
        s = students[f"student/{layer}"].detach()
        d = 0.5 * (t / t.norm(dim=1, keepdim=True) - s / s.norm(dim=1, keepdim=True)).pow(2).sum(1, keepdim=True)
        maps = maps * torch.nn.functional.interpolate(d, size=SIZE, mode="bilinear")[:, 0]
    torch.testing.assert_close(maps, stfpm.predict(batch).maps)


@pytest.mark.parametrize("name, params", [("padim", {}), ("patchcore", {"backbone": "resnet18", "budget": 10})])
def test_methods_without_trained_weights_refuse(name: str, params: dict) -> None:
    method = build(name, **params)
    with pytest.raises(NotImplementedError, match=f"'{name}'"):
        method.continual_outputs(batch_for(name))
