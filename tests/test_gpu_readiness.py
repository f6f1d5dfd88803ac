"""GPU readiness, checked on a CPU: ``--device auto`` picks CUDA and the run records what it resolved
to; the faiss GPU index is chosen (and its fallback recorded) by the rules in ``clbench.features.knn``;
``amp`` trains under autocast (bf16 on CPU, fp16 + GradScaler on CUDA) and is recorded; batches go to
CUDA from pinned memory; peak CUDA memory reaches memory.csv. CUDA calls are replaced by fakes:
nothing here needs a GPU."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import faiss
import pytest
import torch
import yaml
from torch import nn

from clbench.data import Batch
from clbench.engine import memory
from clbench.engine.config import ConfigError, RunConfig, from_mapping
from clbench.engine.environment import environment_info
from clbench.engine.runner import resolve_device
from clbench.features import knn
from clbench.features.backbones import BackbonePool
from helpers import InMemoryStream, engine_run, smooth_batch
from methods.base import MethodContext
from methods.stfpm import STFPM
from methods.training import Precision, to_device, train_loop
from strategies.base import Experience
from strategies.sequential import Sequential


# -- device: auto picks CUDA, the run records what it resolved to ----------------------------------
def test_auto_resolves_to_cuda_when_present(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def fake_cuda(monkeypatch, current: int = 1) -> None:
    """The torch.cuda queries environment.py makes, answered as on a two-GPU machine."""
    props = SimpleNamespace(name="Fake H200", major=9, minor=0, total_memory=141 * 10**9)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: props.name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.version, "cuda", "12.8")


def test_env_records_the_resolved_cuda_device_its_gpu_and_cuda_version(monkeypatch) -> None:
    fake_cuda(monkeypatch, current=1)
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)
    env = environment_info(RunConfig(device="auto", amp=True), torch.device("cuda"), pool, [])
    assert env["device"] == "cuda:1" and env["device_requested"] == "auto"  # the index auto resolved to
    assert env["device_name"] == "Fake H200"
    assert env["cuda"]["name"] == "Fake H200" and env["cuda"]["capability"] == "9.0"
    assert env["cuda"]["cuda_version"] == "12.8" and env["cuda"]["memory_bytes"] == 141 * 10**9
    assert env["amp"]["dtype"] == "fp16" and env["amp"]["grad_scaler"] is True


def test_env_of_a_cpu_run_without_amp_has_no_cuda_or_amp_keys() -> None:
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)
    env = environment_info(RunConfig(device="cpu"), torch.device("cpu"), pool, [])
    assert env["device"] == "cpu" and env["device_requested"] == "cpu"
    assert "cuda" not in env and "amp" not in env


# -- faiss: the GPU index when the bank is on CUDA and faiss can, else the CPU one, recorded --------
def test_backend_choice_names_the_missing_condition(monkeypatch) -> None:
    cuda = torch.device("cuda:0")
    assert knn.choose_backend(torch.device("cpu")) == ("faiss-cpu", "bank on cpu")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert knn.choose_backend(cuda) == ("faiss-cpu", "faiss sees no GPU (faiss.get_num_gpus() == 0)")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    backend, reason = knn.choose_backend(cuda)
    assert backend == "faiss-gpu" and "cuda:0" in reason and "2 GPU(s)" in reason
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)  # a faiss-cpu build
    assert knn.choose_backend(cuda) == ("faiss-cpu", "faiss has no GPU support (a faiss-cpu build)")


class FakeGpuIndex:
    """Stands in for ``faiss.GpuIndexFlatL2``: records how it was built and what it was given."""

    built: list[FakeGpuIndex] = []

    def __init__(self, resources, d: int, config) -> None:
        self.resources, self.d, self.device = resources, d, config.device
        self.added: torch.Tensor | None = None
        FakeGpuIndex.built.append(self)

    def add(self, bank: torch.Tensor) -> None:
        self.added = bank


def gpu_faiss(monkeypatch, index_class) -> None:
    """faiss as with a GPU: the bank counts as on cuda:0, GPU classes replaced by ``index_class``."""
    FakeGpuIndex.built.clear()
    monkeypatch.setattr(knn, "choose_backend", lambda device: ("faiss-gpu", "bank on cuda:0, faiss sees 1 GPU(s)"))
    monkeypatch.setattr(knn, "_gpu_resources", lambda: "resources")
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", lambda: SimpleNamespace(device=None), raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", index_class, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_flat_index_builds_the_gpu_index_with_the_bank_and_records_it(monkeypatch) -> None:
    gpu_faiss(monkeypatch, FakeGpuIndex)
    bank = torch.randn(20, 6, dtype=torch.float64)
    index = knn.FlatL2Index(bank)
    assert index.backend == "faiss-gpu" and index.gpu and index.gpu_device == 0
    assert index.backend_reason == "bank on cuda:0, faiss sees 1 GPU(s)"
    [built] = FakeGpuIndex.built
    assert built is index.index
    assert (built.resources, built.d, built.device) == ("resources", 6, 0)
    assert built.added.dtype == torch.float32 and torch.equal(built.added, bank.float())


def test_a_gpu_index_that_fails_falls_back_to_the_cpu_index_with_the_reason(monkeypatch, caplog) -> None:
    def out_of_memory(resources, d, config):
        raise RuntimeError("Error in allocMemory: out of memory\ntrace line")

    gpu_faiss(monkeypatch, out_of_memory)
    bank, queries = torch.randn(30, 4), torch.randn(7, 4)
    index = knn.FlatL2Index(bank)
    assert index.backend == "faiss-cpu" and not index.gpu and index.gpu_device is None
    assert index.backend_reason == "GPU index failed: Error in allocMemory: out of memory"
    assert not caplog.text  # the bank here is on the CPU: only a CUDA bank searched on the CPU warns
    distances, indices = index.search(queries, 2)  # the CPU index answers as usual
    ref_distances, ref_indices = knn.knn_torch(queries, bank, 2)
    torch.testing.assert_close(distances, ref_distances, rtol=0, atol=1e-4)
    assert torch.equal(indices, ref_indices)


def test_a_cuda_bank_searched_on_the_cpu_warns_once_per_reason(caplog) -> None:
    knn._warn_fallback.cache_clear()
    for _ in range(2):
        knn._warn_fallback("faiss sees no GPU (faiss.get_num_gpus() == 0)")
    assert caplog.text.count("the bank is on CUDA but the faiss index is on the CPU: faiss sees no GPU") == 1


def test_a_cpu_bank_keeps_the_cpu_index_and_says_why() -> None:
    index = knn.FlatL2Index(torch.randn(10, 3))
    assert (index.backend, index.backend_reason, index.gpu) == ("faiss-cpu", "bank on cpu", False)


# -- amp: autocast in the trainer, recorded, a one-line error for a bad value ---------------------
def test_precision_per_device() -> None:
    assert Precision.of("cpu", False).name == "fp32" and Precision.of("cuda", False).grad_scaler() is None
    cpu, cuda = Precision.of("cpu", True), Precision.of(torch.device("cuda:0"), True)
    assert (cpu.name, cpu.scaled, cpu.grad_scaler()) == ("bf16", False, None)
    assert (cuda.device_type, cuda.dtype, cuda.scaled) == ("cuda", torch.float16, True)


@pytest.mark.parametrize("amp", [False, True])
def test_the_loss_runs_under_autocast_only_with_amp(amp: bool) -> None:
    model = nn.Linear(4, 1)
    seen: list[tuple[bool, torch.dtype]] = []

    def loss(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.is_autocast_enabled("cpu"), model(x).dtype))
        return model(x).float().pow(2).mean()

    result = train_loop(loss, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batches=lambda e: [torch.ones(2, 4)],
                        modules=[model], precision=Precision.of("cpu", amp))
    assert seen == [(amp, torch.bfloat16 if amp else torch.float32)]
    assert result.precision == ("bf16" if amp else "fp32") and math.isfinite(result.last_loss)


def test_the_fp16_grad_scaler_skips_a_step_whose_gradients_overflow_and_counts_it() -> None:
    """fp16 autocast with a GradScaler, on CPU (what CUDA runs): a step whose scaled gradients are
    inf is skipped (weights unchanged, scale halved), the next one is taken."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    factors = iter([1e34, 1.0])  # 1e34 * 65536 (the initial scale) overflows float32 gradients

    def loss(x: torch.Tensor) -> torch.Tensor:
        return next(factors) * model(x).float().sum()

    precision = Precision(True, "cpu", torch.float16)
    result = train_loop(loss, torch.optim.SGD(model.parameters(), lr=0.5), epochs=2, batches=lambda e: [torch.ones(1, 2)],
                        modules=[model], precision=precision)
    assert result.skipped_steps == 1 and result.precision == "fp16"
    # only the second step applied: w -= 0.5 * d(sum(w.x))/dw = 0.5 * x (exact after unscaling)
    torch.testing.assert_close(model.weight.detach(), before - 0.5, rtol=0, atol=1e-6)


POOLS: dict[bool, BackbonePool] = {}


def first_stfpm_loss(amp: bool) -> float:
    """The loss of one STFPM iteration (tiny, random init, batch of 4) at fp32 or under bf16 autocast;
    a pool of its own per precision, so the teacher's cached features are computed in that precision."""
    pool = POOLS.setdefault(amp, BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 26, spill_dir=None))
    context = MethodContext(pool, torch.device("cpu"), image_size=32, seed=0, progress=False, max_epochs=1, amp=amp)
    model = STFPM(context, backbone="resnet18", batch_size=4, patience=None)
    strategy = Sequential()
    strategy.progress = False
    train, val = InMemoryStream(smooth_batch(4, 0, 32)), InMemoryStream(smooth_batch(0, 1, 32))
    strategy.train(model, Experience(0, "alpha", ("alpha",)), train, val)
    return model.epoch_log[0]["loss"]


def test_an_stfpm_step_under_bf16_autocast_is_finite_and_close_to_fp32() -> None:
    """Tolerance: 1 % relative. bf16 keeps 8 bits of mantissa (~0.4 % per rounding); the loss compares
    channel-normalised features, so the roundings through ResNet-18's teacher and student mostly
    average out (measured: 1e-4 relative, 7.4141 vs 7.4148). Equal losses would mean autocast never ran."""
    fp32, bf16 = first_stfpm_loss(False), first_stfpm_loss(True)
    assert math.isfinite(bf16) and bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=0.01)


def test_amp_is_recorded_in_the_run_config_and_env(tiny_root: Path, tmp_path: Path) -> None:
    run_dir = engine_run("stfpm", "sequential", {}, tiny_root, tmp_path / "out", tasks=1, image_size=32, amp=True,
                         method_params={"batch_size": 4}, plots=False)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["amp"] is True
    env = json.loads((run_dir / "env.json").read_text())
    assert env["amp"]["dtype"] == "bf16" and env["amp"]["grad_scaler"] is False


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_amp_must_be_a_boolean(bad) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping({"amp": bad})
    assert "amp" in str(err.value) and "\n" not in str(err.value)


def test_the_amp_flag_reaches_the_run_config(monkeypatch) -> None:
    from clbench import cli
    from clbench.engine import runner

    seen: list[RunConfig] = []
    monkeypatch.setattr(runner, "run_experiment", lambda config, **kw: seen.append(config) or Path("."))
    monkeypatch.setattr(cli, "_print_run", lambda run_dir: None)
    cli.main(["run", "--method", "padim", "--device", "cpu", "--amp"])
    cli.main(["run", "--method", "padim", "--device", "cpu"])
    assert [c.amp for c in seen] == [True, False]


# -- pinned memory, non-blocking copies -----------------------------------------------------------
class FakePixels:
    """Records the transfer calls a CPU tensor cannot make without CUDA."""

    def __init__(self, calls: list, where: str = "pageable") -> None:
        self.calls, self.where = calls, where
        self.is_cuda = where == "cuda"

    def pin_memory(self) -> FakePixels:
        self.calls.append("pin_memory")
        return FakePixels(self.calls, "pinned")

    def to(self, device, non_blocking: bool = False) -> FakePixels:
        self.calls.append(("to", str(device), non_blocking, self.where))
        return FakePixels(self.calls, "cuda")


def test_training_batches_go_to_cuda_pinned_and_non_blocking() -> None:
    calls: list = []
    batch = Batch(FakePixels(calls), ["a"], torch.zeros(1), torch.zeros(1, 2, 2, dtype=torch.bool))
    moved = to_device(batch, torch.device("cuda:0"))
    assert calls == ["pin_memory", ("to", "cuda:0", True, "pinned")] and moved.pixels.is_cuda
    assert moved.keys == ["a"] and batch.pixels.where == "pageable"  # a new batch; the stream's is untouched
    assert to_device(moved, torch.device("cuda:0")) is moved  # already there: no copy
    assert to_device(batch, torch.device("cpu")) is batch and len(calls) == 2  # CPU: nothing happens


# -- peak CUDA memory per step --------------------------------------------------------------------
def test_peak_cuda_memory_is_reset_and_read_for_a_cuda_device(monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("max", device)) or 12345)
    cuda = torch.device("cuda:0")
    memory.reset_peaks(cuda)
    peaks = memory.peak_components(cuda)
    assert peaks["peak_cuda"] == 12345 and peaks["peak_rss"] > 0
    assert calls == [("reset", cuda), ("max", cuda)]
    calls.clear()
    memory.reset_peaks(torch.device("cpu"))
    assert memory.peak_components(torch.device("cpu"))["peak_cuda"] == 0 and calls == []
