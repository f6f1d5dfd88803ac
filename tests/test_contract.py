"""The contract every registered method keeps under every strategy, as named checks in the style of
scikit-learn's ``parametrize_with_checks``: one test, parametrised over ``METHODS.names()`` x
sequential/replay/joint x the checks that apply, with ids such as
``padim-replay-check_maps_finite_at_input_size``.

Each (method, strategy) is run once through the engine (2 tasks, tiny settings) and every check
reads that one run: the run folder, and the predictions the method returned while the engine
evaluated it. A new method needs nothing here: it is picked up from the registry and runs with its
defaults, on resnet18 if it takes a ``backbone``; ``TINY`` only makes the slow defaults small.

What the checks do not cover, because it is not the same for every method, stays in the method's
own test file (its equations, its parity with the reference implementation, its parameters)."""
from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from clbench.data.synth import generate
from clbench.engine.config import RunConfig
from clbench.engine.runner import run_experiment
from clbench.engine.probes import read_choice, read_npz, step_file
from clbench.engine.rundir import PROBE_MAPS
from clbench.features.backbones import BackbonePool
from methods.base import METHODS, AnomalyMethod, MethodContext
from strategies.base import STRATEGIES

pytestmark = pytest.mark.slow  # 24 engine runs (~40 s on one core): `make test`, or `-k <method>` while working on one

STRATEGY_PARAMS = {"sequential": {}, "replay": {"buffer_size": 4}, "joint": {}, "ewc": {"ewc_lambda": 10.0},
                   "lwf": {"alpha": 1.0}, "mas": {"lambda_reg": 10.0}, "der": {"buffer_size": 4, "alpha": 0.5},
                   "latent_replay": {"buffer_size": 4},  # only methods that train on frozen features (test_latent_replay.py)
                   "replay+ewc": {"buffer_size": 4, "ewc_lambda": 10.0}}  # and one combination (strategies/combined.py)
# gradient strategies refuse methods that learn no weights (tests/test_ewc.py, test_lwf.py check the refusal)
GRADIENT_STRATEGIES, NO_WEIGHTS = {"ewc", "lwf", "mas", "der", "replay+ewc"}, {"padim", "patchcore"}
SIZE = 32  # px; EfficientAD's PDN needs at least 64
SIZES = {"efficientad": 64}
N_TASKS = 2
MAX_EPOCHS = 1
# Method defaults that would make the contract slow (paper-sized networks and pools), made tiny.
# PatchCore's budget is small enough that every bank is full, so its analytic bank size is exact.
TINY: dict[str, dict[str, Any]] = {
    "patchcore": {"budget": 100},
    "fastflow": {"flow_steps": 2},
    "draem": {"base_width": 4, "disc_base_width": 4},
    "efficientad": {"out_channels": 64, "penalty_images": 4, "standin_images": 4, "distill_epochs": 1,
                    "batch_size": 4},
}
# Every memory.csv row set names these (README, "Results").
MEMORY_COMPONENTS = {"model_trainable", "model_frozen", "method_state", "method_cache", "replay_buffer",
                     "peak_rss", "peak_cuda"}
# analytic_memory's method_state leaves out bookkeeping: counters and index vectors (task counts,
# PaDiM's channel index, PatchCore's bank sizes), EfficientAD's teacher provenance record (~1 KB of
# JSON). The measured state may exceed it by that much: at most 4 KiB, or 1 % of a larger state.
BOOKKEEPING_BYTES, BOOKKEEPING_FRACTION = 4096, 0.01


# -- one run per (method, strategy) ------------------------------------------------------------------
@dataclass
class Evaluated:
    """What ``predict`` returned for one batch while the engine evaluated a step."""

    step: int
    keys: list[str]
    input_size: tuple[int, int]
    maps: torch.Tensor
    scores: torch.Tensor


@dataclass
class ContractRun:
    method: str
    strategy: str
    config: RunConfig
    run_dir: Path
    evaluated: list[Evaluated] = field(default_factory=list)
    resumed: ContractRun | None = None  # the same run, resumed from a copy of its folder taken after step 0

    def frame(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.run_dir / name)

    def evaluated_at(self, step: int) -> list[Evaluated]:
        return [e for e in self.evaluated if e.step == step]


@contextmanager
def recorded(method_cls: type[AnomalyMethod], run: ContractRun, at_step_1: Callable[[], None] | None) -> Iterator[None]:
    """Record every prediction the engine's evaluation asks of ``method_cls`` (not those a method
    makes of its own during ``fit_task``), and call ``at_step_1`` when step 1 starts training."""
    fit_task, predict = method_cls.fit_task, method_cls.predict
    step = {"current": -1, "fitting": False}

    def recording_fit_task(self, data) -> None:
        step["current"], step["fitting"] = data.step, True
        if data.step == 1 and at_step_1 is not None:
            at_step_1()
        try:
            fit_task(self, data)
        finally:
            step["fitting"] = False

    def recording_predict(self, batch):
        prediction = predict(self, batch)
        if not step["fitting"]:
            run.evaluated.append(Evaluated(step["current"], list(batch.keys), tuple(batch.pixels.shape[-2:]),
                                           prediction.maps.detach().cpu().clone(),
                                           prediction.scores.detach().cpu().clone()))
        return prediction

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(method_cls, "fit_task", recording_fit_task)
        patch.setattr(method_cls, "predict", recording_predict)
        patch.setattr("clbench.reporting.plots.plot_run", lambda *args, **kwargs: [], raising=False)  # not the contract
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. EfficientAD's stand-in teacher: said, and not the contract
            yield


def snapshot(run_dir: Path, into: Path) -> Callable[[], None]:
    """What a kill at the start of step 1 leaves: the run folder as it is then (its lock file aside)."""
    return lambda: shutil.copytree(run_dir, into / run_dir.name, ignore=shutil.ignore_patterns(".lock"))


class ContractRuns:
    """Each (method, strategy) run once per test process, on demand; a failed run fails every check
    that reads it (with the run's own error), without being run again."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.root = tmp.mktemp("contract-data")
        # 8 training images: no training batch of one image (DRAEM's 1x1 bottleneck at 32 px cannot
        # batch-normalise a single image; at paper sizes it can)
        generate(self.root, categories=2, size=64, seed=0, n_train=8, n_test_good=2, n_test_per_defect=1, workers=1)
        self.teacher_cache = tmp.mktemp("contract-teacher")  # EfficientAD's stand-in teacher, distilled once
        self.done: dict[tuple[str, str], ContractRun | BaseException] = {}

    def get(self, method: str, strategy: str) -> ContractRun:
        key = (method, strategy)
        if key not in self.done:
            try:
                self.done[key] = self._run(method, strategy)
            except Exception as err:  # noqa: BLE001 - kept for the other checks of this run
                self.done[key] = err
        result = self.done[key]
        if isinstance(result, BaseException):
            raise result
        return result

    def method_params(self, method: str) -> dict[str, Any]:
        cls = METHODS.get(method)
        params = dict(TINY.get(method, {}))
        if "backbone" in cls.hyperparameters:
            params.setdefault("backbone", "resnet18")
        if "teacher_cache" in cls.hyperparameters:
            params["teacher_cache"] = str(self.teacher_cache)
        return params

    def _run(self, method: str, strategy: str) -> ContractRun:
        out = self.tmp.mktemp(f"{method}-{strategy}")
        config = RunConfig(method=method, method_params=self.method_params(method), strategy=strategy,
                           strategy_params=STRATEGY_PARAMS[strategy], data_root=str(self.root), synthetic=False,
                           tasks=N_TASKS, image_size=SIZES.get(method, SIZE), weights="none", device="cpu",
                           max_epochs=MAX_EPOCHS, output_dir=str(out / "uninterrupted"), name=f"{method}-{strategy}")
        run = ContractRun(method, strategy, config, out / "uninterrupted" / config.name)
        method_cls = METHODS.get(method)
        killed = out / "killed"
        with recorded(method_cls, run, snapshot(run.run_dir, killed)):
            run_experiment(config, progress=False)
        if (killed / config.name).is_dir():  # more than one step: resume the copy taken after step 0
            resumed_config = replace(config, output_dir=str(killed))
            run.resumed = ContractRun(method, strategy, resumed_config, killed / config.name)
            with recorded(method_cls, run.resumed, None):
                run_experiment(resumed_config, resume=True, progress=False)
        return run


@pytest.fixture(scope="module")
def contract_runs(tmp_path_factory: pytest.TempPathFactory) -> ContractRuns:
    return ContractRuns(tmp_path_factory)


# -- the checks -----------------------------------------------------------------------------------
def check_maps_finite_at_input_size(run: ContractRun) -> None:
    assert run.evaluated, "the engine evaluated nothing"
    for e in run.evaluated:
        assert e.maps.dtype == torch.float32, f"step {e.step}: maps are {e.maps.dtype}, not float32"
        assert tuple(e.maps.shape) == (len(e.keys), *e.input_size), f"step {e.step}: maps {tuple(e.maps.shape)}"
        assert torch.isfinite(e.maps).all(), f"step {e.step}: non-finite map values for {e.keys}"


def check_image_scores_finite(run: ContractRun) -> None:
    assert run.evaluated, "the engine evaluated nothing"
    for e in run.evaluated:
        assert tuple(e.scores.shape) == (len(e.keys),), f"step {e.step}: scores {tuple(e.scores.shape)}"
        assert torch.isfinite(e.scores).all(), f"step {e.step}: non-finite image scores for {e.keys}"


def check_metrics_cover_the_matrix(run: ContractRun) -> None:
    """After every step, every task of the stream (learned or not) has its AUROCs, in [0, 1]."""
    metrics = run.frame("metrics.csv")
    steps = 1 if run.strategy == "joint" else N_TASKS
    assert metrics.eval_task.nunique() == N_TASKS and sorted(set(metrics.step)) == list(range(steps))
    for name in ("pixel_auroc", "image_auroc", "pixel_aupro", "pixel_ap"):
        values = metrics[metrics.metric == name].pivot(index="step", columns="eval_task", values="value")
        assert values.shape == (steps, N_TASKS) and values.notna().all().all(), f"{name}:\n{values}"
        assert values.stack().between(0, 1).all(), f"{name}:\n{values}"


def check_training_is_logged(run: ContractRun) -> None:
    """A method that learns weights logs, per step, its epochs (capped by ``max_epochs``) and a
    finite first and last training loss."""
    memory = run.frame("memory.csv")
    if not (memory[memory.component == "model_trainable"].bytes > 0).any():
        pytest.skip(f"{run.method} learns no weights")
    training = run.frame("training.csv")
    for step, rows in training.groupby("step"):
        values = dict(zip(rows.key, rows.value))
        assert {"epochs_run", "train_loss_first", "train_loss_last"} <= set(values), f"step {step}: {sorted(values)}"
        assert 1 <= float(values["epochs_run"]) <= MAX_EPOCHS, f"step {step}: epochs_run {values['epochs_run']}"
        assert math.isfinite(float(values["train_loss_first"])) and math.isfinite(float(values["train_loss_last"]))
    assert sorted(set(training.step)) == sorted(set(memory.step))


def check_memory_components_present(run: ContractRun) -> None:
    """Every step logs every component, in bytes; a model is there; only replay holds a buffer."""
    memory = run.frame("memory.csv")
    for step, rows in memory.groupby("step"):
        sizes = dict(zip(rows.component, rows.bytes))
        assert MEMORY_COMPONENTS <= set(sizes), f"step {step}: missing {sorted(MEMORY_COMPONENTS - set(sizes))}"
        assert all(int(v) == v >= 0 for v in sizes.values()), f"step {step}: {sizes}"
        assert sizes["model_trainable"] + sizes["model_frozen"] > 0 and sizes["peak_rss"] > 0
        replays = bool({"replay", "der", "latent_replay"} & set(run.strategy.split("+")))  # strategies with a buffer
        assert (sizes["replay_buffer"] > 0) == replays, f"step {step}: {sizes['replay_buffer']}"


def check_analytic_memory_matches_measured(run: ContractRun) -> None:
    """``analytic_memory`` (from shapes alone, what ``clbench memory`` prints) against what each step
    measured: trainable weights and derived caches exactly; the method's state up to its bookkeeping
    (``BOOKKEEPING_*``); its own frozen parts within the measured frozen bytes (which add the shared
    backbone)."""
    resolved = METHODS.get(run.method).resolve_params(run.config.method_params)
    analytic: dict[str, int] = {}
    for key, size in METHODS.get(run.method).analytic_memory(resolved, run.config.eval_size).items():
        group = key.split("/")[0]
        analytic[group] = analytic.get(group, 0) + int(size)
    bookkeeping = max(BOOKKEEPING_BYTES, BOOKKEEPING_FRACTION * analytic.get("method_state", 0))
    memory = run.frame("memory.csv")
    for step, rows in memory.groupby("step"):
        measured = dict(zip(rows.component, rows.bytes))
        where = f"step {step}: analytic {analytic}, measured {measured}"
        for group in ("model_trainable", "method_cache"):
            if group in analytic:
                assert measured[group] == analytic[group], where
        if "method_state" in analytic:
            assert 0 <= measured["method_state"] - analytic["method_state"] <= bookkeeping, where
        if "model_frozen" in analytic:
            assert analytic["model_frozen"] <= measured["model_frozen"], where


def check_strategy_memory_matches_measured(run: ContractRun) -> None:
    """The strategy's ``analytic_memory`` given the method (what ``clbench memory --strategy`` prints)
    against the final step's measured buffer and strategy state (the contract's buffers are full)."""
    method_cls = METHODS.get(run.method)
    pool = BackbonePool("none", torch.device("cpu"), run.config.seed, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), run.config.eval_size, run.config.seed, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = method_cls(context, **method_cls.resolve_params(run.config.method_params))
    strategy_cls = STRATEGIES.get(run.strategy)
    analytic = strategy_cls.analytic_memory(strategy_cls.resolve_params(run.config.strategy_params), run.config.eval_size, method)
    memory = run.frame("memory.csv")
    final = memory[memory.step == memory.step.max()].set_index("component")["bytes"].to_dict()
    for component in ("replay_buffer", "strategy_state"):
        assert int(final.get(component, 0)) == analytic.get(component, 0), f"{component}: analytic {analytic}, measured {final}"


def check_probe_maps_are_the_evaluated_maps(run: ContractRun) -> None:
    """Every step's probe-map file holds, in float16, the maps evaluation computed for the recorded
    probe images (clbench.engine.probes); a resumed run writes the same files."""
    folder = run.run_dir / PROBE_MAPS
    probes = [key for keys in read_choice(folder / "probes.json").values() for key in keys]
    assert probes, "no probe image recorded"
    steps = sorted({e.step for e in run.evaluated})
    for step in steps:
        stored = read_npz(folder / step_file(step))
        assert list(stored["keys"]) == probes and stored["maps"].dtype == np.float16
        evaluated = {key: m for e in run.evaluated_at(step) for key, m in zip(e.keys, e.maps)}
        for key, kept in zip(probes, stored["maps"]):
            np.testing.assert_allclose(kept.astype(np.float32), evaluated[key].numpy().astype(np.float16).astype(np.float32),
                                       err_msg=f"step {step}: {key}")
    if run.resumed is not None:
        for step in steps:
            assert (folder / step_file(step)).read_bytes() == (run.resumed.run_dir / PROBE_MAPS / step_file(step)).read_bytes()


def check_resume_gives_identical_predictions(run: ContractRun) -> None:
    """A run killed after step 0 and resumed (``--resume``, from the checkpoint) predicts, and so
    scores, exactly as the run that was never interrupted."""
    resumed = run.resumed
    assert resumed is not None, "no copy of the run folder was taken at step 1"
    assert {e.step for e in resumed.evaluated} == {1}, "the resume did not start at step 1"
    expected, got = run.evaluated_at(1), resumed.evaluated_at(1)
    assert [e.keys for e in got] == [e.keys for e in expected]
    for a, b in zip(expected, got):
        assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores), f"predictions differ for {a.keys}"
    assert (resumed.run_dir / "metrics.csv").read_bytes() == (run.run_dir / "metrics.csv").read_bytes()
    assert (resumed.run_dir / "summary.json").is_file()


CHECKS = [check_maps_finite_at_input_size, check_image_scores_finite, check_metrics_cover_the_matrix,
          check_training_is_logged, check_memory_components_present, check_analytic_memory_matches_measured,
          check_strategy_memory_matches_measured, check_probe_maps_are_the_evaluated_maps,
          check_resume_gives_identical_predictions]


def declares_analytic_memory(cls: type[AnomalyMethod]) -> bool:
    return cls.analytic_memory.__func__ is not AnomalyMethod.analytic_memory.__func__


def applicable(method: str, strategy: str) -> Iterator[Callable[[ContractRun], None]]:
    """The checks that apply: analytic memory where the method declares it; the resume where the
    strategy has more than one step (joint is one step: nothing to resume from)."""
    for check in CHECKS:
        if check is check_analytic_memory_matches_measured and not declares_analytic_memory(METHODS.get(method)):
            continue
        if check is check_resume_gives_identical_predictions and strategy == "joint":
            continue
        yield check


def contract_cases() -> Iterator[Any]:
    atomic = {name for name in STRATEGY_PARAMS if "+" not in name}
    assert atomic == set(STRATEGIES.names()), "a strategy was added: give it its parameters here"
    for method in METHODS.names():
        for strategy in STRATEGY_PARAMS:
            if strategy in GRADIENT_STRATEGIES and method in NO_WEIGHTS:
                continue
            if strategy == "latent_replay" and not METHODS.get(method).trains_on_frozen_features:
                continue
            for check in applicable(method, strategy):
                yield pytest.param(method, strategy, check, id=f"{method}-{strategy}-{check.__name__}")


@pytest.mark.parametrize("method, strategy, check", list(contract_cases()))
def test_contract(contract_runs: ContractRuns, method: str, strategy: str, check) -> None:
    check(contract_runs.get(method, strategy))
