"""The one interface between the engine and an anomaly-detection method.

The engine calls only what is here; it never knows which method it runs. A method:
  * is an ``nn.Module`` whose learned state (Gaussian statistics, memory banks, network weights)
    lives in parameters and registered buffers, so ``state_dict()`` carries it for resume;
  * learns one task at a time through ``fit_task`` (the strategy decides what data it sees:
    the current task, plus replayed images, or all tasks at once);
  * scores a ``Batch`` through ``predict``: pixel maps at input resolution and image scores;
  * gets frozen backbones from the run's shared ``BackbonePool`` (each image goes through a frozen
    backbone once per run), and lists them in ``frozen_backbones`` for memory accounting;
  * may describe the analytic size of its state in ``analytic_memory`` (``clbench memory``);
  * may add ``clbench`` subcommands of its own in ``add_cli_commands`` (EfficientAD's
    ``distill-teacher``), declared by name in its package's ``CLI_COMMANDS``: the CLI imports the
    method only when such a command is used, and names none.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol

import torch
from torch import nn

from clbench.features.backbones import BackbonePool, FrozenBackbone
from clbench.params import Options, Parameterised
from clbench.data import Batch, SampleSet
from clbench.registry import Registry

METHODS: Registry["AnomalyMethod"] = Registry("method", "methods")


@dataclass
class Prediction:
    """What a method returns for a batch: raw scores (no sigmoid, no normalisation)."""

    maps: torch.Tensor  # float32 (B, H, W) at the input resolution
    scores: torch.Tensor  # float32 (B,)
    # Optional outputs, read by key. "task_index": (B,) int64, for a method that routes an image to one of
    # its per-task models (PatchCore's banks): the index of the step whose model its own routing picked,
    # also when the batch gives the true one (``Batch.task_index``, evaluation: oracle). The engine
    # compares it with the truth as ``task_id_accuracy`` (clbench.engine.evaluation).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainStream(Protocol):
    """Training data of one step, as the strategy mixes it (current task, replay, or all tasks)."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]: ...


@dataclass
class TaskData:
    """Everything a method may use to learn one step. The test set is never in here."""

    step: int  # 0-based index of the training step
    task_names: tuple[str, ...]  # categories taught at this step (one, or all for joint)
    train: TrainStream
    val: SampleSet  # held-out good *training* images of these tasks (early stopping, normalisation)
    seed: int = 0  # seed for this step's shuffling and initialisation
    # the strategy's hooks into the training loop (``methods.training.Callback``: e.g. a regularisation
    # strategy's penalty added to the loss); gradient-trained methods run them, others ignore them
    callbacks: list[Any] = field(default_factory=list)


@dataclass
class MethodContext:
    """Run-wide services a method is built with."""

    backbones: BackbonePool
    device: torch.device
    image_size: int
    seed: int = 0
    progress: bool = True
    epochs_scale: float = 1.0  # multiplies every trainable method's epoch count (short test runs)
    max_epochs: int | None = None  # caps it
    # True for runs that must reproduce a paper (e.g. the clad profile): a method refuses to stand in
    # a random-init or locally improvised component (e.g. EfficientAD's teacher) for a pretrained one.
    require_pretrained: bool = False
    amp: bool = False  # mixed precision in the shared trainer (RunConfig.amp; methods/training.py)


# ``optimizer_state`` of trainable methods: what happens to the optimiser between tasks.
OPTIMIZER_STATES = ("reset", "keep")


class AnomalyMethod(nn.Module, Parameterised, ABC):
    """Base class of every method. Hyper-parameters are declared in ``hyperparameters``, each as
    ``Param(default, constraint)`` (``clbench.params``): once the class exists, ``hyperparameters`` holds
    the defaults and ``parameter_constraints`` what each allows; ``__init__`` only stores the checked
    values and builds the modules (scikit-learn style)."""

    name: ClassVar[str]
    params_key: ClassVar[str] = "method_params"
    kind: ClassVar[str] = "method"
    hyperparameters: ClassVar[Mapping[str, Any]] = {}
    # True for a method whose training reads images only through its frozen backbones'
    # ``features(batch)`` (no augmentation, no pixels): it can train on stored features instead of
    # images (latent replay, strategies/latent_replay.py), and ``latent_inputs`` gives them
    trains_on_frozen_features: ClassVar[bool] = False
    # ``optimizer_state`` is interpreted here (``task_optimiser``): its constraint holds for every method
    shared_constraints: ClassVar[Mapping[str, Any]] = {"optimizer_state": Options(*OPTIMIZER_STATES)}

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__()
        self.context = context
        self.params = self.resolve_params(params)  # unknown keys and values outside their constraints: one line
        self.fit_info: dict[str, float] = {}  # what the last fit_task did (epochs, losses): logged per step
        # one record per epoch of the last fit_task ({"epoch": 0, "loss": .., "loss/<part>": .., "val_loss": ..,
        # "lr": ..}): the engine logs it to training.csv with the epoch number (the trainer fills it)
        self.epoch_log: list[dict[str, float]] = []
        self._kept_optimiser: torch.optim.Optimizer | None = None
        self._kept_optimiser_state: dict[str, Any] | None = None  # restored from a checkpoint, not yet applied

    # -- the interface -------------------------------------------------------------------------
    @abstractmethod
    def fit_task(self, data: TaskData) -> None:
        """Learn one step of the stream (continual: keep what earlier steps learned as designed)."""

    @abstractmethod
    def predict(self, batch: Batch) -> Prediction:
        """Score a batch: pixel maps (B, H, W) at input resolution and image scores (B,)."""

    def continual_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The trained network's outputs on a batch (a ``Batch``, or the training batch the method's
        loss takes, which is what the trainer's callbacks see), differentiable w.r.t. the trained
        weights, in the method's current mode: what LwF / DER++ distil and MAS differentiates (strategies/). Methods
        that learn no weights have none."""
        raise NotImplementedError(f"method '{self.name}' has no trained outputs to distil")

    def latent_inputs(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """What the trained part reads of a batch, for a method that ``trains_on_frozen_features``:
        each frozen backbone's features, by its ``latent_key`` (``Batch.latents``). A batch that
        carries them trains the method exactly as its images would."""
        if not self.trains_on_frozen_features:
            raise NotImplementedError(f"method '{self.name}' trains on images, not on frozen-backbone features")
        return {backbone.latent_key: backbone.features(batch) for backbone in self.frozen_backbones()}

    def frozen_backbones(self) -> list[FrozenBackbone]:
        """The shared frozen backbones this method uses (counted as its frozen parameters)."""
        return []

    @classmethod
    def pretrained_backbones(cls, params: Mapping[str, Any]) -> list[str]:
        """Backbones whose ImageNet weights the method relies on (``require_pretrained`` checks
        them before a run starts): by default its ``backbone`` hyper-parameter, if it has one."""
        return [params["backbone"]] if params.get("backbone") else []

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """Bytes of the method's state by component, computed from shapes alone (no training)."""
        raise NotImplementedError(f"method '{cls.name}' does not describe its analytic memory")

    @classmethod
    def add_cli_commands(cls, subparsers) -> None:
        """Register the method's own ``clbench`` subcommands on the CLI's subparsers (each with
        ``set_defaults(func=...)``); the CLI calls this when a command the method's package declares in
        ``CLI_COMMANDS`` is used. Default: none."""

    # -- shared behaviour ----------------------------------------------------------------------
    def num_epochs(self, default: int) -> int:
        """The paper's epoch count scaled by the run's ``epochs_scale`` and capped by ``max_epochs``."""
        epochs = max(1, round(default * self.context.epochs_scale))
        if self.context.max_epochs is not None:
            epochs = min(epochs, self.context.max_epochs)
        return epochs

    def memory_components(self) -> dict[str, int]:
        """Measured bytes: trainable/frozen parameters, persistent state, derived caches.

        Buffers registered on the method itself are its state (statistics, banks); buffers of
        its sub-networks (BatchNorm running statistics) count with the network they belong to.
        """
        trainable = sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() * p.element_size() for p in self.parameters() if not p.requires_grad)
        frozen += sum(b.parameter_bytes() for b in self.frozen_backbones())
        persistent = set(self.state_dict(keep_vars=True))
        state = cache = 0
        for name, buf in self.named_buffers():
            size = buf.numel() * buf.element_size()
            if "." in name:
                owner = self.get_submodule(name.rpartition(".")[0])
                if any(p.requires_grad for p in owner.parameters()):
                    trainable += size
                else:
                    frozen += size
            elif name in persistent:
                state += size
            else:
                cache += size
        return {"model_trainable": trainable, "model_frozen": frozen, "method_state": state, "method_cache": cache}

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Like ``load_state_dict`` but buffers take the saved shapes (state grows as tasks arrive)."""
        buffers = dict(self.named_buffers())
        for key, value in state.items():
            if key in buffers and buffers[key].shape != value.shape:
                module_path, _, attr = key.rpartition(".")
                module = self.get_submodule(module_path) if module_path else self
                module._buffers[attr] = torch.empty_like(value, device=buffers[key].device)
        self.load_state_dict(state, strict=True)
        self.on_state_loaded()

    def on_state_loaded(self) -> None:
        """Hook: rebuild derived caches (e.g. an inverse covariance) after a resume."""

    # -- the optimiser across tasks ---------------------------------------------------------------
    def task_optimiser(self, build: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """The optimiser a trainable method uses for this step, per its ``optimizer_state``.

        ``reset`` (default): ``build()`` a fresh optimiser at every task, the network weights carried
        over (seed 003 is silent; each method's paper trains one task from a fresh optimiser).
        ``keep``: one optimiser for the whole stream, its moments carried from task to task (what the
        benchmark paper's code does); each task starts again at the initial learning rate (a
        per-task scheduler may have lowered it). The kept state is in ``training_state``, which the
        engine checkpoints, so a resumed run continues with the same moments.
        """
        if self.params.get("optimizer_state", "reset") != "keep":
            return build()
        if self._kept_optimiser is None:
            self._kept_optimiser = build()
            if self._kept_optimiser_state is not None:
                self._kept_optimiser.load_state_dict(self._kept_optimiser_state)
                self._kept_optimiser_state = None
        for group in self._kept_optimiser.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
        return self._kept_optimiser

    def training_state(self) -> dict[str, Any]:
        """State of the training machinery that is not the model (the kept optimiser's moments under
        ``optimizer_state: keep``); the engine checkpoints it beside ``state_dict`` for resume."""
        if self._kept_optimiser is not None:
            return {"optimizer": self._kept_optimiser.state_dict()}
        if self._kept_optimiser_state is not None:
            return {"optimizer": self._kept_optimiser_state}
        return {}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore what ``training_state`` returned (applied when the optimiser is next built)."""
        optimiser_state = state.get("optimizer")
        if optimiser_state is None:
            return
        if self._kept_optimiser is not None:
            self._kept_optimiser.load_state_dict(optimiser_state)
        else:
            self._kept_optimiser_state = optimiser_state
