"""The one gradient-training loop: every trainable method (STFPM, CFA, FastFlow, CAINNFlow,
EfficientAD, DRAEM) and EfficientAD's teacher distillation train through ``train_loop``.

The loop owns what every method needs the same way: epochs over the step's stream (seeded
shuffling, ``seeding.epoch_seed``, so a resumed run reproduces an uninterrupted one), a loss made of
named parts (a loss function returns a tensor or a dict of named tensors, summed in order), the
optimiser and scheduler steps (per epoch or per iteration), a guard that stops on a non-finite
loss, early stopping on the held-out *good training* images (``data.val``; never the test set) with
the best state restored, one log record per epoch (``method.epoch_log``: "epoch", "loss",
"loss/<part>", "val_loss" when measured, "lr"), and callbacks.

A method supplies only what is its own: the loss, the optimiser, what makes a training batch (a
``prepare`` function: DRAEM's anomaly simulation), its validation loss if it is not the training
loss (EfficientAD), which modules train and whose state early stopping restores.

Mixed precision (``amp``, the run's ``--amp``; ``Precision``): the forward pass and the loss run
under ``torch.autocast``, fp16 with a ``GradScaler`` on CUDA (fp16 gradients underflow without
scaling), bf16 on CPU (bf16 has fp32's range: no scaler). The scaler is made afresh for every fit,
like a ``reset`` optimiser: a run is checkpointed between steps only, so a resumed run starts each
step with the same fresh scaler as an uninterrupted one, and no scaler state needs saving. With
``amp`` off nothing changes (no autocast context, no scaler). On CUDA, a training ``Batch``'s uint8
pixels are copied to the device from pinned memory without blocking, so the copy overlaps the
host's work on the next batch.

Callbacks (``Callback``; Avalanche's plugins and Lightning's callbacks are the model) reach the
loop through ``TaskData.callbacks``, which a strategy fills (``Strategy.callbacks``): a
regularisation strategy adds a penalty to any gradient method's loss in ``before_backward``
(``ctx.add_loss("ewc", penalty)``) without touching the method.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from clbench.data import Batch
from clbench.engine import seeding
from methods.base import AnomalyMethod, TaskData

LossValue = torch.Tensor | Mapping[str, torch.Tensor]
LossFn = Callable[[Any], LossValue]


# -- precision and device transfer -------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """How the trainer runs forward + loss: fp32 (``amp`` off), or autocast to ``dtype`` on ``device_type``."""

    amp: bool = False
    device_type: str = "cpu"
    dtype: torch.dtype | None = None  # None: fp32 (no autocast)

    @classmethod
    def of(cls, device: torch.device | str, amp: bool) -> Precision:
        """fp16 on CUDA (tensor cores; with a GradScaler), bf16 elsewhere (CPU autocast's type)."""
        device_type = torch.device(device).type
        if not amp:
            return cls(False, device_type, None)
        return cls(True, device_type, torch.float16 if device_type == "cuda" else torch.bfloat16)

    @property
    def name(self) -> str:
        """``fp32``, ``fp16`` or ``bf16``: what ``TrainResult.precision`` records."""
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward + loss context: a no-op when ``amp`` is off (fp32 code paths stay untouched)."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def scaled(self) -> bool:
        """fp16 needs loss scaling (its gradients underflow unscaled); fp32 and bf16 do not."""
        return self.dtype == torch.float16

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh scaler when ``scaled``, else None."""
        return torch.amp.GradScaler(self.device_type) if self.scaled else None


def to_device(batch: Any, device: torch.device) -> Any:
    """A ``Batch`` whose uint8 pixels are on ``device``: on CUDA copied from pinned memory without
    blocking (the copy overlaps host work; later kernels on the stream wait for it); anything
    else, or a CPU device, unchanged (a method's own ``prepare`` moves what it makes itself)."""
    if device.type != "cuda" or not isinstance(batch, Batch) or batch.pixels.is_cuda:
        return batch
    return dataclasses.replace(batch, pixels=batch.pixels.pin_memory().to(device, non_blocking=True))


# -- hooks -------------------------------------------------------------------------------------
class Callback:
    """Hooks into the training loop; override the ones you need (each gets the loop's ``TrainContext``).

    ``before_task``: before the first epoch. ``before_backward``: after the batch's loss, before its
    backward pass; may add a named loss term (``ctx.add_loss``). ``after_epoch``: after the epoch's
    record (``ctx.record``) is complete, validation included. ``after_task``: after training, the
    best state restored (``ctx.result``).
    """

    def before_task(self, ctx: TrainContext) -> None:
        """Called once before training (e.g. snapshot the weights a penalty anchors to)."""

    def before_backward(self, ctx: TrainContext) -> None:
        """Called for every batch with its loss (``ctx.loss``, ``ctx.parts``)."""

    def after_epoch(self, ctx: TrainContext) -> None:
        """Called after every epoch with its record (``ctx.record``)."""

    def after_task(self, ctx: TrainContext) -> None:
        """Called once after training (e.g. estimate what the next task must preserve)."""


@dataclass
class TrainContext:
    """What callbacks see: the run's objects and the loop's position, updated as training proceeds."""

    optimiser: torch.optim.Optimizer
    method: AnomalyMethod | None = None  # None outside a method (teacher distillation)
    data: TaskData | None = None
    epoch: int = -1
    iteration: int = 0  # optimiser steps taken in this fit
    batch: Any = None
    loss: torch.Tensor | None = None  # the method's loss of the batch (its parts summed)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's named parts
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # terms added by callbacks
    record: dict[str, float] = field(default_factory=dict)  # the epoch's log record
    result: TrainResult | None = None
    # what the loop trains with, for callbacks that run the method's own loss again (EWC's Fisher)
    loss_fn: LossFn | None = None
    batches: Callable[[int], Iterable[Any]] | None = None  # the epoch's training batches, as the loop sees them
    modules: Sequence[nn.Module] = ()
    precision: Precision = field(default_factory=Precision)

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        """Add a named term to this batch's loss (logged as ``loss/<name>``)."""
        if name in self.parts or name in self.added:
            raise ValueError(f"add_loss: a loss part named '{name}' exists already for this batch")
        self.added[name] = value

    def parameters(self) -> Iterator[torch.Tensor]:
        """The parameters being trained (those of the optimiser)."""
        for group in self.optimiser.param_groups:
            yield from group["params"]


@dataclass
class TrainResult:
    """What a fit did; methods turn it into their ``fit_info``."""

    epochs_run: int = 0
    epochs_max: int = 0
    best_epoch: int = -1
    best_val_loss: float = math.inf  # inf when no validation ran
    first_loss: float = math.nan
    last_loss: float = math.nan
    last_parts: dict[str, float] = field(default_factory=dict)  # per-part means of the last epoch
    iterations: int = 0
    images: int = 0
    seconds: float = math.nan
    early_stopping: bool = False
    epoch_log: list[dict[str, float]] = field(default_factory=list)
    precision: str = "fp32"  # fp32 | fp16 | bf16 (``Precision.name``)
    skipped_steps: int = 0  # optimiser steps the fp16 GradScaler skipped (inf/NaN gradients)


def sum_parts(value: LossValue) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and its named parts; a dict is summed in its order (first + second + ...)."""
    if isinstance(value, torch.Tensor):
        return value, {}
    parts = dict(value)
    if not parts:
        raise ValueError("loss: the loss function returned no parts")
    total = None
    for part in parts.values():
        total = part if total is None else total + part
    return total, parts


# -- the loop ----------------------------------------------------------------------------------
def train_loop(
    loss_fn: LossFn,
    optimiser: torch.optim.Optimizer,
    *,
    epochs: int,
    batches: Callable[[int], Iterable[Any]],
    modules: Sequence[nn.Module],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scheduler_interval: Literal["epoch", "iteration"] = "epoch",
    validate: Callable[[], float] | None = None,
    patience: int | None = None,
    average: Literal["images", "iterations"] = "images",
    callbacks: Sequence[Callback] = (),
    method: AnomalyMethod | None = None,
    data: TaskData | None = None,
    label: str = "training",
    precision: Precision = Precision(),
) -> TrainResult:
    """Train ``epochs`` epochs (fewer with early stopping) and return what happened.

    ``batches(epoch)``: the epoch's batches (anything ``loss_fn`` takes that has a ``len``).
    ``modules``: set to train mode every epoch and to eval mode at the end; their state is what
    early stopping snapshots and restores. Early stopping runs when ``validate`` (the held-out loss)
    and ``patience`` are given: ``patience`` epochs without improvement stop training, and the state
    at the best epoch is restored. ``average``: epoch losses are means per image (weighted by batch
    size) or per iteration. ``label``: names the trainer in errors. ``precision``: fp32 (default)
    or autocast (``Precision.of(device, amp)``), with a GradScaler for fp16.
    """
    if scheduler_interval not in ("epoch", "iteration"):
        raise ValueError(f"scheduler_interval: '{scheduler_interval}' is not one of epoch, iteration")
    if average not in ("images", "iterations"):
        raise ValueError(f"average: '{average}' is not one of images, iterations")
    where = f" of {', '.join(data.task_names)}" if data is not None else ""
    early_stopping = validate is not None and patience is not None
    ctx = TrainContext(optimiser=optimiser, method=method, data=data, loss_fn=loss_fn, batches=batches,
                       modules=modules, precision=precision)
    result = TrainResult(epochs_max=epochs, early_stopping=early_stopping, precision=precision.name)
    scaler = precision.grad_scaler()
    best_state: list[dict[str, Any]] | None = None
    stale = 0
    for callback in callbacks:
        callback.before_task(ctx)
    start = time.perf_counter()
    for epoch in range(epochs):
        ctx.epoch = epoch
        for module in modules:
            module.train()
        lr = float(optimiser.param_groups[0]["lr"])
        total, count = 0.0, 0
        part_totals: dict[str, float] = {}
        for batch in batches(epoch):
            with precision.autocast():
                loss, parts = sum_parts(loss_fn(batch))
            ctx.batch, ctx.loss, ctx.parts, ctx.added = batch, loss, parts, {}
            for callback in callbacks:
                callback.before_backward(ctx)
            if ctx.added:
                parts = {**parts, **ctx.added}
                for term in ctx.added.values():
                    loss = loss + term
            if not torch.isfinite(loss):
                values = "; " + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items()) if parts else ""
                raise FloatingPointError(
                    f"{label}: non-finite training loss ({float(loss.detach())}{values}) at epoch {epoch}{where} "
                    "(try a lower learning rate)"
                )
            optimiser.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimiser.step()
            else:
                scale = scaler.get_scale()
                scaler.scale(loss).backward()
                scaler.step(optimiser)  # skipped when the unscaled gradients hold inf/NaN
                scaler.update()
                result.skipped_steps += int(scaler.get_scale() < scale)
            if scheduler is not None and scheduler_interval == "iteration":
                scheduler.step()
            result.iterations += 1
            ctx.iteration = result.iterations
            weight = len(batch) if average == "images" else 1
            total += loss.item() * weight
            count += weight
            for key, value in parts.items():
                part_totals[key] = part_totals.get(key, 0.0) + value.item() * weight
            result.images += len(batch)
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        result.epochs_run = epoch + 1
        result.last_loss = total / count if count else math.nan
        result.last_parts = {k: v / count for k, v in part_totals.items()}
        if epoch == 0:
            result.first_loss = result.last_loss
        record: dict[str, float] = {"epoch": epoch, "loss": result.last_loss}
        record.update({f"loss/{k}": v for k, v in result.last_parts.items()})
        stop = False
        if early_stopping:
            val_loss = validate()
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"{label}: non-finite validation loss ({val_loss}) at epoch {epoch}{where}")
            record["val_loss"] = val_loss
            if val_loss < result.best_val_loss:
                result.best_val_loss, result.best_epoch, stale = val_loss, epoch, 0
                best_state = [copy.deepcopy(module.state_dict()) for module in modules]
            else:
                stale += 1
                stop = stale >= patience
        record["lr"] = lr
        result.epoch_log.append(record)
        ctx.record = record
        for callback in callbacks:
            callback.after_epoch(ctx)
        if stop:
            break
    result.seconds = time.perf_counter() - start
    if best_state is not None:
        for module, state in zip(modules, best_state):
            module.load_state_dict(state)
    for module in modules:
        module.eval()
    ctx.result = result
    for callback in callbacks:
        callback.after_task(ctx)
    return result


# -- the loop as methods use it ------------------------------------------------------------------
def train_task(
    method: AnomalyMethod,
    data: TaskData,
    loss_fn: LossFn,
    optimiser: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    prepare: Callable[[Batch, int, int], Any] | None = None,
    modules: Sequence[nn.Module] | None = None,
    **options: Any,
) -> TrainResult:
    """``train_loop`` over a step's training stream: shuffled batches of ``batch_size`` (a new seeded
    order every epoch), each made into a training batch by ``prepare(batch, epoch, index)`` if
    given (else moved to the method's device: ``to_device``); ``modules`` default to the method; the
    strategy's callbacks (``data.callbacks``) run, and ``method.epoch_log`` gets the epoch records;
    the run's ``amp`` (``method.context.amp``) sets the precision. ``options``: the rest of ``train_loop``'s."""
    device = torch.device(method.context.device)

    def epoch_batches(epoch: int) -> Iterable[Any]:
        stream = data.train.batches(batch_size, shuffle=True, seed=seeding.epoch_seed(data.seed, epoch))
        if prepare is None:
            return (to_device(batch, device) for batch in stream)
        return (prepare(batch, epoch, index) for index, batch in enumerate(stream))

    result = train_loop(
        loss_fn, optimiser, epochs=epochs, batches=epoch_batches, modules=modules or [method],
        callbacks=data.callbacks, method=method, data=data, label=method.name,
        precision=method_precision(method), **options,
    )
    method.epoch_log = result.epoch_log
    return result


def method_precision(method: AnomalyMethod) -> Precision:
    """The precision a method trains at: its run's ``amp`` on its device."""
    return Precision.of(method.context.device, method.context.amp)


@torch.no_grad()
def held_out_loss(method: AnomalyMethod, data: TaskData, loss_fn: LossFn, batch_size: int) -> float:
    """Mean loss per image over the held-out good training images, in eval mode, at the training
    precision (early stopping compares it epoch to epoch)."""
    method.eval()
    precision = method_precision(method)
    total, count = 0.0, 0
    for batch in data.val.batches(batch_size):
        with precision.autocast():
            total += float(sum_parts(loss_fn(batch))[0]) * len(batch)
        count += len(batch)
    return total / count


def fit_epochs(
    method: AnomalyMethod,
    data: TaskData,
    loss_fn: LossFn,
    optimiser: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    patience: int | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """Train with the training loss as held-out loss (STFPM, CFA, the flows); returns ``fit_info``.

    Early stopping runs when ``patience`` is set and held-out images exist (``train_loop``).
    """
    validate = (lambda: held_out_loss(method, data, loss_fn, batch_size)) if len(data.val) else None
    result = train_task(
        method, data, loss_fn, optimiser, epochs=epochs, batch_size=batch_size,
        patience=patience, validate=validate, scheduler=scheduler,
    )
    return {
        "epochs_run": result.epochs_run,
        "epochs_max": epochs,
        "best_epoch": result.best_epoch,
        "train_loss_first": result.first_loss,
        "train_loss_last": result.last_loss,
        "val_loss_best": result.best_val_loss if result.early_stopping else math.nan,
        "val_loss_last": held_out_loss(method, data, loss_fn, batch_size) if len(data.val) else math.nan,
        "train_images": result.images,
        "train_images_per_s": result.images / result.seconds if result.seconds > 0 else math.nan,
    }
