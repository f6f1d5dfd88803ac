"""Run one experiment: a method learns the task stream step by step; after each step it is
evaluated on every task, memory is measured, results are written atomically and a checkpoint
is saved, so a killed run resumes from its last completed step with identical results."""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from clbench import atomic, memory
from clbench.backbones import BackbonePool, random_init_message, resolve_weights
from clbench.config import ConfigError, RunConfig
from clbench.data import Category, ImageStore, SampleSet, list_categories, load_category
from clbench.environment import environment_info
from clbench.evaluation import evaluate_all
from clbench.forgetting import summarize, summarize_joint
from clbench.tasks import resolve_tasks
from methods.base import METHODS, AnomalyMethod, MethodContext
from strategies.base import STRATEGIES, Experience, Strategy

log = logging.getLogger("clbench")

CHECKPOINT = "checkpoint.pt"
SYNTHETIC_MARKER = ".clbench-synthetic.json"  # marks a data root that clbench generated and may complete
# Keys that may differ between a run and its resume (where and how fast, not what is computed).
RESUME_FREE_KEYS = ("device", "feature_cache_gb", "output_dir", "eval_batch_size")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but no CUDA device is available")
    return device


def ensure_dataset(config: RunConfig) -> Path:
    """The data root, generating the built-in synthetic dataset there if asked and missing."""
    root = Path(config.data_root)
    if not config.synthetic:
        return root
    from clbench.synth import CATEGORY_NAMES, generate

    marker = root / SYNTHETIC_MARKER
    if root.exists() and not marker.is_file():
        return root  # a dataset of the user's: never write into it
    wanted = CATEGORY_NAMES[: config.synthetic_categories]
    present = set(list_categories(root)) if root.is_dir() else set()
    missing = [name for name in wanted if name not in present]  # also completes a killed generation
    if missing:
        log.info("generating %d synthetic categories at %s", len(missing), root)
        root.mkdir(parents=True, exist_ok=True)
        atomic.write_json(marker, {"generator": "clbench.synth", "size": config.image_size, "seed": 0})
        generate(root, categories=missing, size=config.image_size, seed=0)
    return root


def check_pretrained(method_cls: type[AnomalyMethod], params: dict[str, Any], weights: str) -> None:
    """``require_pretrained``: refuse (one line) a method backbone whose weights resolve to random init.

    The backbones are those the method names in ``pretrained_backbones(params)``. Decided from the
    file system (``resolve_weights``)."""
    for name in method_cls.pretrained_backbones(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's random-init warning: the error below says it
            info = resolve_weights(name, weights)
        if not info.pretrained:
            raise ConfigError(random_init_message(name, info))


@dataclass
class Results:
    """Tidy rows of a run, rewritten atomically after every step."""

    run_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)

    FILES = {"metrics": "metrics.csv", "memory": "memory.csv", "timings": "timings.csv", "training": "training.csv"}
    COLUMNS = {
        "metrics": ["step", "trained_task", "eval_task", "metric", "value"],
        "memory": ["step", "trained_task", "component", "bytes"],
        "timings": ["step", "phase", "seconds", "images", "images_per_s"],
        "training": ["step", "trained_task", "key", "value"],
    }

    def load(self, completed_step: int) -> None:
        """Rows of steps up to ``completed_step`` (later rows belong to a step that did not finish)."""
        for kind, filename in self.FILES.items():
            path = self.run_dir / filename
            if path.is_file():
                frame = pd.read_csv(path)
                rows = frame[frame["step"] <= completed_step].to_dict("records")
                setattr(self, kind, rows)

    def save(self) -> None:
        for kind, filename in self.FILES.items():
            frame = pd.DataFrame(getattr(self, kind), columns=self.COLUMNS[kind])
            atomic.write_csv(self.run_dir / filename, frame)

    def matrix(self, metric: str, tasks: list[str]) -> np.ndarray:
        frame = pd.DataFrame(self.metrics)
        frame = frame[frame["metric"] == metric]
        table = frame.pivot_table(index="step", columns="eval_task", values="value", aggfunc="first", dropna=False)
        return table.reindex(columns=tasks).to_numpy(dtype=float)


class Experiment:
    """One run: config -> data, method, strategy -> steps -> results in ``run_dir``."""

    def __init__(self, config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> None:
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.device = resolve_device(config.device)
        root = ensure_dataset(config)
        self.tasks = resolve_tasks(config.tasks, list_categories(root), config.task_order, config.seed)
        self.categories: list[Category] = [
            load_category(root, name, config.val_fraction, config.seed) for name in self.tasks
        ]
        self.method_cls = METHODS.get(config.method)
        self.strategy_cls = STRATEGIES.get(config.strategy)
        method_params = dict(config.method_params)
        if config.backbone is not None:
            if "backbone" not in self.method_cls.hyperparameters:
                raise ConfigError(f"backbone: method '{config.method}' takes no backbone")
            method_params["backbone"] = config.backbone
        self.method_params = self.method_cls.resolve_params(method_params)
        if config.require_pretrained:
            check_pretrained(self.method_cls, self.method_params, config.weights)
        self.resolved = config.to_dict() | {
            "tasks": list(self.tasks),
            "method_params": self.method_params,
            "backbone": self.method_params.get("backbone"),
            "strategy_params": {**self.strategy_cls.hyperparameters, **config.strategy_params},
        }
        if config.name is None:
            self.resolved["name"] = f"{config.method}-{config.strategy}-{self.resolved['backbone'] or 'none'}-seed{config.seed}"
        self.run_dir = Path(config.output_dir) / self.resolved["name"]

    # -- set-up --------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> dict[str, Any] | None:
        """Create or reopen the run folder; returns the checkpoint to resume from, if any."""
        config_path = self.run_dir / "config.yaml"
        if config_path.is_file() and not self.overwrite:
            if not self.resume:
                raise FileExistsError(
                    f"{self.run_dir}: run folder exists; pass --resume to continue it or --overwrite to start again"
                )
            saved = yaml.safe_load(config_path.read_text())
            defaults = RunConfig().to_dict()  # a key added since the run started counts as its default
            for key, value in self.resolved.items():
                if key not in RESUME_FREE_KEYS and saved.get(key, defaults.get(key)) != value:
                    raise ConfigError(
                        f"{config_path}: cannot resume, '{key}' was {saved.get(key, defaults.get(key))!r} and is now {value!r}"
                    )
            checkpoint = self.run_dir / CHECKPOINT
            if not checkpoint.is_file():
                return None
            return torch.load(checkpoint, weights_only=True, map_location=self.device)  # never unpickle code
        if self.overwrite and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_yaml(config_path, self.resolved)
        return None

    def _build(self) -> tuple[AnomalyMethod, Strategy, ImageStore, BackbonePool]:
        torch.manual_seed(self.config.seed)
        pool = BackbonePool(
            self.config.weights,
            self.device,
            self.config.seed,
            cache_bytes=int(self.config.feature_cache_gb * (1 << 30)),
            spill_dir=self.run_dir / "feature_cache",
            require_pretrained=self.config.require_pretrained,
        )
        context = MethodContext(
            pool, self.device, self.config.eval_size, self.config.seed, self.progress,
            epochs_scale=self.config.epochs_scale, max_epochs=self.config.max_epochs,
            require_pretrained=self.config.require_pretrained,
        )
        method = self.method_cls(context, **self.method_params).to(self.device)
        strategy = self.strategy_cls(seed=self.config.seed, **self.config.strategy_params)
        strategy.progress = self.progress
        return method, strategy, ImageStore(self.config.image_size, self.config.crop_size), pool

    def _samples(self, names: tuple[str, ...], store: ImageStore, split: str) -> SampleSet:
        by_name = {c.name: c for c in self.categories}
        samples: tuple = ()
        for name in names:
            samples += getattr(by_name[name], split)
        return SampleSet(samples, store)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        state = self._prepare_run_dir()
        method, strategy, store, pool = self._build()
        results = Results(self.run_dir)
        completed = -1
        if state is not None:
            completed = int(state["step"])
            method.load_method_state(state["method"])
            method.load_training_state(state.get("training", {}))
            strategy.load_state_dict(state["strategy"])
            results.load(completed)
            log.info("resuming %s after step %d", self.run_dir, completed)
            del state
        atomic.write_json(self.run_dir / "env.json", environment_info(self.config, self.device, pool, self.categories))
        experiences = strategy.experiences(self.tasks)
        for experience in experiences:
            if experience.step <= completed:
                continue
            self._step(experience, method, strategy, store, pool, results)
        atomic.write_json(self.run_dir / "summary.json", self.summary(results, experiences, pool))
        shutil.rmtree(self.run_dir / "feature_cache", ignore_errors=True)
        self._plots()
        return self.run_dir

    def _step(self, experience: Experience, method, strategy, store, pool, results: Results) -> None:
        step, label = experience.step, experience.label
        memory.reset_peaks(self.device)
        forwarded = sum(b.images_forwarded for b in pool.backbones)
        forward_seconds = sum(b.forward_seconds for b in pool.backbones)
        current = self._samples(experience.task_names, store, "train")
        val = self._samples(experience.task_names, store, "val")
        torch.manual_seed(self.config.seed * 1_000_003 + step)
        method.train()
        start = time.perf_counter()
        strategy.train(method, experience, current, val)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        evaluation = evaluate_all(method, self.categories, store, self.config.eval_batch_size, self.progress)
        eval_seconds = time.perf_counter() - start

        for task, values in evaluation.items():
            for metric, value in values.items():
                results.metrics.append(dict(step=step, trained_task=label, eval_task=task, metric=metric, value=value))
        for key, value in method.fit_info.items():
            results.training.append(dict(step=step, trained_task=label, key=key, value=value))
        components = method.memory_components() | strategy.memory_components() | memory.peak_components(self.device)
        for component, size in components.items():
            results.memory.append(dict(step=step, trained_task=label, component=component, bytes=int(size)))
        n_test = sum(len(c.test) for c in self.categories)
        forwarded = sum(b.images_forwarded for b in pool.backbones) - forwarded
        forward_seconds = sum(b.forward_seconds for b in pool.backbones) - forward_seconds
        for phase, seconds, images in (
            ("train", train_seconds, len(current)),
            ("evaluate", eval_seconds, n_test),
            ("backbone_forward", forward_seconds, forwarded),
        ):
            rate = images / seconds if seconds > 0 else float("nan")
            results.timings.append(dict(step=step, phase=phase, seconds=seconds, images=images, images_per_s=rate))
        results.save()
        self._checkpoint(step, method, strategy)
        pixel = {task: round(v["pixel_auroc"], 3) for task, v in evaluation.items()}
        log.info("step %d (%s): train %.1fs, eval %.1fs, pixel AUROC %s", step, label, train_seconds, eval_seconds, pixel)

    def _checkpoint(self, step: int, method: AnomalyMethod, strategy: Strategy) -> None:
        state = {"step": step, "method": method.state_dict(), "training": method.training_state(),
                 "strategy": strategy.state_dict()}
        atomic.write_with(self.run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    # -- summary -------------------------------------------------------------------------------
    def summary(self, results: Results, experiences: list[Experience], pool: BackbonePool) -> dict[str, Any]:
        metrics = sorted({row["metric"] for row in results.metrics})
        joint = len(experiences) == 1 and len(self.tasks) > 1
        summary: dict[str, Any] = {"complete": True, "steps": len(experiences), "tasks": self.tasks, "metrics": {}}
        for metric in metrics:
            R = results.matrix(metric, self.tasks)
            summary["metrics"][metric] = summarize_joint(R[-1]) if joint else summarize(R)
            summary["metrics"][metric]["final"] = dict(zip(self.tasks, R[-1].tolist()))
        distinct = {s.key for c in self.categories for s in c.train + c.val + c.test}
        summary["distinct_images"] = len(distinct)
        summary["backbone_forward_images"] = int(
            sum(r["images"] for r in results.timings if r["phase"] == "backbone_forward")
        )
        return summary

    def _plots(self) -> None:
        from clbench.plots import plot_run

        plot_run(self.run_dir, metrics=("pixel_auroc", "image_auroc"))


def run_experiment(config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    return Experiment(config, resume=resume, overwrite=overwrite, progress=progress).run()
