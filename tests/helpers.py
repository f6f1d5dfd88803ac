"""Helpers shared by the tests (plain functions and classes; the fixtures are in conftest.py):
a tiny hand-made MVTec-layout category, in-memory images and training streams, and short engine
runs. Import them with ``from helpers import ...`` (pytest puts this folder on ``sys.path``)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clbench.data import Batch


def write_category(root: Path, name: str, *, n_train: int = 6, size: int = 40, gray: bool = False, seed: int = 0) -> Path:
    """A minimal valid category: flat noisy images, one 'spot' defect type with masks."""
    rng = np.random.default_rng(seed)
    folder = root / name
    shape = (size, size) if gray else (size, size, 3)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(90, 110, shape, dtype=np.uint8))

    for split, count in (("train/good", n_train), ("test/good", 2), ("test/spot", 2)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image().save(folder / split / f"{i:03d}.png")
    (folder / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        mask = np.zeros((size, size), np.uint8)
        mask[5:15, 5:15] = 255
        Image.fromarray(mask).save(folder / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return folder


def engine_run(method: str, strategy: str, strategy_params: dict, data_root: Path, out: Path, **overrides) -> Path:
    """One short run through the engine (2 tasks, 1 epoch, random init, CPU): the run folder."""
    from clbench.engine.config import RunConfig  # the engine only where a test runs it
    from clbench.engine.runner import run_experiment

    settings = dict(method=method, strategy=strategy, strategy_params=strategy_params, data_root=str(data_root),
                    synthetic=False, tasks=2, image_size=64, weights="none", output_dir=str(out),
                    device="cpu", max_epochs=1)
    settings.update(overrides)
    return run_experiment(RunConfig(**settings), progress=False)


def smooth_pixels(n: int, seed: int, size: int, noise: float = 0.0) -> torch.Tensor:
    """uint8 (n, 3, size, size): upsampled low-resolution noise, so features vary like on real images;
    ``noise`` > 0 adds that much per-pixel noise (drawn after the coarse fields) for fine structure."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=size, mode="bilinear")
    if not noise:
        return (low * 255).to(torch.uint8)
    return ((low + noise * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


def smooth_batch(n: int, seed: int, size: int, task: str = "alpha", noise: float = 0.0) -> Batch:
    """``smooth_pixels`` as good training images of ``task``: keys unique per seed (backbones cache
    features by key) and starting with the task (CFA tells replayed images by it)."""
    pixels = smooth_pixels(n, seed, size, noise)
    keys = [f"{task}/train/good/{seed}-{i:03d}.png" for i in range(n)]
    return Batch(pixels, keys, torch.zeros(n, dtype=torch.int64), torch.zeros(n, size, size, dtype=torch.bool))


class InMemoryStream:
    """A training stream over one fixed in-memory batch (what the strategies hand a method)."""

    def __init__(self, batch: Batch, *, keep_order: bool = False) -> None:
        """``keep_order``: never shuffle, so that a method sees the images exactly as a reference does."""
        self.batch, self.keep_order = batch, keep_order

    def __len__(self) -> int:
        return len(self.batch)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Consecutive batches, in a seeded random order if ``shuffle`` (like a real stream)."""
        b, n = self.batch, len(self.batch)
        if shuffle and not self.keep_order:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            yield Batch(b.pixels[rows], [b.keys[i] for i in rows.tolist()], b.labels[rows], b.masks[rows])


# -- PatchCore on hand-made embeddings (test_patchcore, test_evaluation_modes) ----------------------
PATCHES, EMBED_DIMS = 4, 3  # patches per image (a 2x2 grid) and embedding dims of the tables below


class EmbeddingTable(dict):
    """key -> (PATCHES, EMBED_DIMS) embedding; ``embed`` looks batches up here instead of a backbone."""

    def add(self, prefix: str, values: torch.Tensor) -> list[str]:
        keys = [f"{prefix}/{i}" for i in range(len(values))]
        self.update(zip(keys, values))
        return keys

    def embed(self, batch: Batch) -> torch.Tensor:
        return torch.stack([self[k] for k in batch.keys])


def key_batch(keys: list[str], task_index: list[int] | None = None) -> Batch:
    """A batch that is only its keys (blank 2x2 pixels), with an optional oracle task index."""
    n = len(keys)
    given = None if task_index is None else torch.tensor(task_index, dtype=torch.int64)
    return Batch(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), keys, torch.zeros(n, dtype=torch.int64),
                 torch.zeros(n, 2, 2, dtype=torch.bool), task_index=given)


class KeyStream:
    """A training stream of ``key_batch``es, in order."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        for start in range(0, len(self.keys), batch_size):
            yield key_batch(self.keys[start:start + batch_size])


def clbench_process(args: list[str], *, kill_after_training_step: int | None = None) -> subprocess.Popen:
    """``clbench ARGS`` in a child process; with ``kill_after_training_step`` it SIGKILLs itself
    (no clean-up, no atexit) once that step is trained, before its results and checkpoint are written."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # two runs share 2 cores
    if kill_after_training_step is None:
        command = ["-m", "clbench", *args]
    else:
        command = ["-c", KILL_AFTER_TRAINING_STEP, str(kill_after_training_step), *args]
    return subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# The kill comes from the strategy's own hook at a known moment: no polling for a checkpoint, no race.
KILL_AFTER_TRAINING_STEP = """
import os, signal, sys
from strategies.base import STRATEGIES
from clbench.cli import main
strategy = STRATEGIES.get("sequential")
after_step = strategy.after_step
def after_step_then_die(self, experience, *args, **kwargs):
    after_step(self, experience, *args, **kwargs)
    if experience.step == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
strategy.after_step = after_step_then_die
sys.exit(main(sys.argv[2:]))
"""


# -- strategies against Avalanche's plugins: the same SGD steps on both sides ----------------------
def reconstruction_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A tiny autoencoder's loss: what both sides train in the plugin comparisons."""
    return (model(x) - x).pow(2).mean()


def train_with_strategy(strategy, model: torch.nn.Module, tasks: list[torch.Tensor], *, epochs: int, batch: int,
                        lr: float) -> list[float]:
    """clbench's trainer (``train_loop``) over ``tasks`` with the strategy's callbacks; the strategy's
    loss part (``loss/<its name>``) at every batch, 0 where there is none."""
    from methods.training import Callback, train_loop

    penalties: list[float] = []

    class Record(Callback):
        def before_backward(self, ctx) -> None:
            term = ctx.added.get(strategy.name)
            penalties.append(0.0 if term is None else float(term.detach()))

    for x in tasks:
        optimiser = torch.optim.SGD(model.parameters(), lr=lr)
        train_loop(lambda b: reconstruction_loss(model, b), optimiser, epochs=epochs,
                   batches=lambda epoch: [x[i:i + batch] for i in range(0, len(x), batch)],
                   modules=[model], callbacks=[*strategy.callbacks(None), Record()], method=model)
    return penalties


def train_with_avalanche_plugin(plugin, model: torch.nn.Module, tasks: list[torch.Tensor], *, epochs: int, batch: int,
                                lr: float, **attributes) -> list[float]:
    """The same SGD steps with an Avalanche plugin driven through its hooks as its training template
    does (``before_backward`` per batch, ``after_training_exp`` per task), on a stand-in for the
    template holding what the plugin reads (``attributes``: e.g. EWC's ``_criterion``); the penalty
    the plugin added at every batch."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    penalties: list[float] = []
    for t, x in enumerate(tasks):
        optimiser = torch.optim.SGD(model.parameters(), lr=lr)
        template = SimpleNamespace(clock=SimpleNamespace(train_exp_counter=t), model=model, device="cpu",
                                   optimizer=optimiser, train_mb_size=batch, **attributes,
                                   experience=SimpleNamespace(dataset=TensorDataset(x, x, torch.zeros(len(x)))))
        for _ in range(epochs):
            model.train()
            for i in range(0, len(x), batch):
                template.loss = reconstruction_loss(model, x[i:i + batch])
                before = float(template.loss.detach())
                plugin.before_backward(template)
                penalties.append(float(template.loss.detach()) - before)
                optimiser.zero_grad()
                template.loss.backward()
                optimiser.step()
        plugin.after_training_exp(template)
    return penalties
