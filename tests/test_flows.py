"""FastFlow and CAINNFlow behaviour: invertible stages with the right log-determinant, the default
architectures (WRN50, alternating 3x3/1x1, parameter counts), short trainings that lower the loss,
optimizer_state (on ResNet18 to stay fast). Parity with anomalib is in ``test_parity_fastflow.py``,
CAINNFlow's equations in ``test_cainnflow_equations.py``; runs under every strategy, resume (state
round trip) and memory in ``test_contract.py``."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from clbench.features.backbones import BackbonePool, out_indices
from clbench.data import ImageStore, SampleSet, load_category
from methods.base import MethodContext, TaskData
from methods.flows.cainnflow import CBAM, VARIANTS, CAINNFlow, ChannelAttention, SpatialAttention
from methods.flows.fastflow import FastFlow

# (class, params) of every flow configuration: FastFlow and each CAINNFlow variant
CONFIGS = [(FastFlow, {})] + [(CAINNFlow, {"variant": v}) for v in VARIANTS]
IDS = ["fastflow"] + [f"cainnflow-{v}" for v in VARIANTS]


def make(cls, max_epochs: int = 2, seed: int = 0, **params):
    """A method on ResNet18 at 64 px (the defaults are WRN50: too slow for unit tests)."""
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size=64, seed=seed, progress=False, max_epochs=max_epochs)
    return cls(context, **{"backbone": "resnet18", **params})


def stage(cls, params: dict, dims: tuple[int, int, int], steps: int = 2):
    """One flow stage of a method, built as the method builds it (seeded)."""
    p = cls.resolve_params({**params, "flow_steps": steps})
    return cls.build_flows(p, [dims], seed=0)[0]


def randomize_affine(flow) -> None:
    """Move the global affine (ActNorm) off its identity-like init so the check is not trivial."""
    with torch.no_grad():
        for name, param in flow.named_parameters():
            if name.endswith("global_scale") or name.endswith("global_offset"):
                param.add_(0.3 * torch.randn_like(param))


@pytest.mark.parametrize("cls, params", CONFIGS, ids=IDS)
def test_stage_inverse_reconstructs_input(cls, params) -> None:
    flow = stage(cls, params, (8, 6, 6), steps=4)
    randomize_affine(flow)
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        z, log_jac = flow(x)
        x_back, log_jac_rev = flow(z, rev=True)
    assert z.shape == x.shape and log_jac.shape == (3,)
    assert (x_back - x).abs().max().item() < 1e-4
    assert torch.allclose(log_jac, -log_jac_rev, atol=1e-4)


@pytest.mark.parametrize("cls, params", CONFIGS, ids=IDS)
def test_log_det_matches_brute_force_jacobian(cls, params) -> None:
    flow = stage(cls, params, (2, 2, 2), steps=3).double()
    randomize_affine(flow)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    _, log_jac = flow(x)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 2, 2, 2))[0].flatten(), x.flatten())
    sign, brute = torch.linalg.slogdet(jacobian)
    assert sign.item() != 0
    assert log_jac.item() == pytest.approx(brute.item(), abs=1e-8)


def meta_feature_info(model_name: str, layers) -> tuple[list[int], list[int]]:
    """(channels, reductions) of the real timm architecture, built on the meta device (no weights)."""
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices(model_name, layers))
    return list(model.feature_info.channels()), list(model.feature_info.reduction())


@pytest.mark.slow
def test_default_architectures_and_parameter_counts(monkeypatch) -> None:
    fastflow, cainnflow = FastFlow.resolve_params({}), CAINNFlow.resolve_params({})
    for p in (fastflow, cainnflow):  # seed 003 s. 1.8.3; CAINNFlow's best result (Table 4)
        assert p["backbone"] == "wide_resnet50_2" and p["layers"] == ["layer1", "layer2", "layer3"]
        assert p["norm_affine"] is True and p["optimizer_state"] == "reset" and p["batch_size"] == 32
    assert (fastflow["flow_steps"], fastflow["conv3x3_only"], fastflow["lr"]) == (8, False, 1e-3)
    assert (cainnflow["flow_steps"], cainnflow["variant"], cainnflow["lr"]) == (2, "CAC", 5e-4)

    def kernels(cls, params: dict, steps: int) -> list[set]:
        flow = cls.build_flows(cls.resolve_params({**params, "flow_steps": steps}), [(8, 4, 4)])[0]
        return [{m.kernel_size for m in block.subnet if isinstance(m, torch.nn.Conv2d)} for block in flow.module_list]

    assert kernels(FastFlow, {}, 4) == [{(3, 3)}, {(1, 1)}, {(3, 3)}, {(1, 1)}]  # alternating (FastFlow s. 3.3)
    assert kernels(FastFlow, {"conv3x3_only": True}, 2) == [{(3, 3)}, {(3, 3)}]
    assert kernels(CAINNFlow, {}, 2) == [{(3, 3)}, {(3, 3)}]  # "stacked 3x3 full convolution"
    assert all(isinstance(block.subnet[2], CBAM) for block in CAINNFlow.build_flows(cainnflow, [(8, 4, 4)])[0].module_list)

    # at 256 px: WRN50 flows with alternating subnets have the FastFlow paper's 41.3M parameters
    monkeypatch.setattr("methods.flows.common.feature_info", meta_feature_info)
    counts = FastFlow.parameter_counts({}, 256)
    assert counts["flow_trainable"] == 41_337_856 and round(counts["flow_trainable"] / 1e6, 1) == 41.3
    assert counts["layernorm"] == 2 * (256 * 64 * 64 + 512 * 32 * 32 + 1024 * 16 * 16)  # learnable affine
    assert CAINNFlow.parameter_counts({}, 256)["flow_trainable"] == 18_680_514
    memory = FastFlow.analytic_memory({}, 256)
    assert memory["model_trainable/layernorm"] == 4 * counts["layernorm"]
    assert "model_trainable/layernorm" not in FastFlow.analytic_memory({"norm_affine": False}, 256)


def test_bad_optimiser_params_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"adam_betas=\[0.9\] is not a list of 2 items, each a number in \[0, 1\)"):
        FastFlow.check_params(FastFlow.resolve_params({"adam_betas": [0.9]}))
    with pytest.raises(ValueError, match="optimizer_state='never' is not one of reset, keep"):
        make(FastFlow, optimizer_state="never")


def test_variants_and_their_parameters() -> None:
    def attention_modules(variant: str, kind: type) -> int:
        flow = stage(CAINNFlow, {"variant": variant}, (8, 4, 4))
        return sum(isinstance(m, kind) for m in flow.modules())

    assert all(attention_modules("CC", kind) == 0 for kind in (CBAM, ChannelAttention, SpatialAttention))
    assert all(attention_modules(v, CBAM) == 2 for v in ("CAC", "CA", "AC"))  # one CBAM per block, 2 blocks
    cc = stage(CAINNFlow, {"variant": "CC"}, (8, 4, 4))
    fastflow_3x3 = stage(FastFlow, {"conv3x3_only": True}, (8, 4, 4))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(cc) == count(fastflow_3x3)  # CC is FastFlow's 3x3 subnet
    with pytest.raises(ValueError, match="'XYZ'"):
        make(CAINNFlow, variant="XYZ")
    assert make(CAINNFlow, variant="cac").params["flow_steps"] == 2  # the paper's "step2"


@pytest.mark.parametrize("cls", [FastFlow, CAINNFlow], ids=["fastflow", "cainnflow"])
@pytest.mark.slow
def test_short_training_lowers_loss_and_gives_finite_maps(synthetic_root: Path, cls) -> None:
    name = sorted(p.name for p in synthetic_root.iterdir())[0]
    category = load_category(synthetic_root, name, val_fraction=0.2)
    store = ImageStore(64)
    model = make(cls, max_epochs=3, batch_size=4)
    model.fit_task(TaskData(0, (name,), SampleSet(category.train, store), SampleSet(category.val, store)))
    info = model.fit_info
    assert info["epochs_run"] == 3 and info["best_epoch"] == -1  # no early stopping by default
    assert torch.isfinite(torch.tensor([info["train_loss_first"], info["train_loss_last"], info["val_loss_last"]])).all()
    assert info["train_loss_last"] < info["train_loss_first"]
    prediction = model.predict(next(SampleSet(category.test, store).batches(5)))
    assert prediction.maps.shape == (5, 64, 64) and torch.isfinite(prediction.maps).all()
    assert torch.equal(prediction.scores, prediction.maps.flatten(1).amax(1))
    assert model.frozen_backbones()[0].images_forwarded == len(category.train) + len(category.val) + 5


@pytest.mark.slow
def test_early_stopping_reads_held_out_images_and_restores_best(synthetic_root: Path) -> None:
    name = sorted(p.name for p in synthetic_root.iterdir())[1]
    category = load_category(synthetic_root, name, val_fraction=0.2)
    store = ImageStore(64)
    model = make(CAINNFlow, max_epochs=3, batch_size=8, patience=1, variant="AC")
    val = SampleSet(category.val, store)
    model.fit_task(TaskData(0, (name,), SampleSet(category.train, store), val))
    info = model.fit_info
    assert 0 <= info["best_epoch"] < info["epochs_run"] <= 3
    assert info["val_loss_last"] == pytest.approx(info["val_loss_best"], rel=1e-5)  # best weights restored


@pytest.mark.slow
def test_optimizer_state_keep_carries_adam_across_tasks(synthetic_root: Path) -> None:
    names = sorted(p.name for p in synthetic_root.iterdir())[:2]
    store = ImageStore(64)
    tasks = [load_category(synthetic_root, name, val_fraction=0.0) for name in names]

    def fit_both(model) -> list[int]:
        steps = []
        for step, (name, category) in enumerate(zip(names, tasks)):
            model.fit_task(TaskData(step, (name,), SampleSet(category.train, store), SampleSet((), store)))
            steps.append(int(next(iter(model._kept_optimiser.state.values()))["step"]) if model._kept_optimiser else 0)
        return steps

    kept = make(FastFlow, max_epochs=1, batch_size=8, optimizer_state="keep")
    per_task = [len(range(0, len(c.train), 8)) for c in tasks]  # Adam steps (batches) per task
    assert fit_both(kept) == [per_task[0], per_task[0] + per_task[1]]  # one Adam, its step count keeps growing
    assert set(kept.training_state()) == {"optimizer"}
    reset = make(CAINNFlow, max_epochs=1, batch_size=8)
    assert fit_both(reset) == [0, 0] and reset.training_state() == {}  # a fresh optimiser per task, none kept
