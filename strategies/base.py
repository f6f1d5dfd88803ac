"""How a method sees the task stream (Avalanche's split: stream -> strategy -> storage policy).

A strategy turns the ordered task list into training *experiences* (steps) and, for each,
hands the method its training data. Sequential and joint are the lower and upper bounds;
replay adds a buffer by overriding ``training_stream`` (and its state/memory hooks), nothing else.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from clbench.data import Batch, SampleSet
from clbench.engine import seeding
from clbench.engine.tasks import as_schedule, step_label
from clbench.params import ConfigError, Parameterised
from clbench.registry import Registry
from methods.base import AnomalyMethod, TaskData, TrainStream
from methods.training import Callback

class StrategyRegistry(Registry["Strategy"]):
    """The strategies by name; a name joined by ``+`` ("replay+ewc") is their combination
    (``strategies.combined``), built from the parts' classes when asked for."""

    def get(self, name: str) -> type["Strategy"]:
        if "+" not in name:
            return super().get(name)
        from strategies.combined import combine

        return combine(name, [super(StrategyRegistry, self).get(part) for part in name.split("+")])


STRATEGIES: StrategyRegistry = StrategyRegistry("strategy", "strategies")


@dataclass(frozen=True)
class Experience:
    """One training step of the stream: one category, or several taught together (a protocol's step)."""

    step: int
    label: str  # what the results call the trained task: the category, "a+b", "a+...+j (10)", or "joint"
    task_names: tuple[str, ...]  # categories taught at this step

    @classmethod
    def stream(cls, tasks: Sequence[Any]) -> list["Experience"]:
        """One experience per step of a schedule (``tasks``: a flat list, one category per step, or a
        list of steps: ``clbench.engine.tasks.as_schedule``), labelled by ``step_label``."""
        return [cls(step, step_label(names), names) for step, names in enumerate(as_schedule(tasks))]


class ProgressStream:
    """Wraps a train stream so every pass over it shows a progress bar with ETA (any method)."""

    def __init__(self, stream: TrainStream, label: str) -> None:
        self.stream = stream
        self.label = label
        self.passes = 0

    def __len__(self) -> int:
        return len(self.stream)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        self.passes += 1
        total = -(-len(self.stream) // batch_size)
        yield from tqdm(
            self.stream.batches(batch_size, shuffle=shuffle, seed=seed),
            total=total, desc=f"train {self.label} pass {self.passes}", unit="batch", leave=False,
        )


class Strategy(Parameterised, ABC):
    """Base class of every strategy; its parameters are declared as a method's are (``Param`` entries
    in ``hyperparameters``, ``clbench.params``) and checked when it is built."""

    name: ClassVar[str]
    params_key: ClassVar[str] = "strategy_params"
    kind: ClassVar[str] = "strategy"
    # "data": decides what the method trains on (sequential, replay, joint); "regulariser": only adds to
    # the training loop through callbacks (ewc). A combination "a+b" has at most one data part.
    role: ClassVar[str] = "data"
    # True for strategies that act through the gradient-training loop (penalties, distillation)
    needs_gradients: ClassVar[bool] = False
    hyperparameters: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, seed: int = 0, **params: Any) -> None:
        self.seed = seed
        self.params = self.resolve_params(params)  # unknown keys and values outside their constraints: one line
        self.progress = True

    @abstractmethod
    def experiences(self, tasks: Sequence[Any]) -> list[Experience]:
        """The training steps for this schedule (a flat list of categories, one per step, or a list
        of steps, each a tuple of categories: ``clbench.engine.tasks.as_schedule``)."""

    def check_method(self, method: AnomalyMethod) -> None:
        """Refuse, with one line (``ConfigError``), a method this strategy cannot work with; called
        before the run starts. By default: a strategy that ``needs_gradients`` refuses a method that
        learns no weights (PaDiM, PatchCore)."""
        if self.needs_gradients and not any(p.requires_grad for p in method.parameters()):
            raise ConfigError(f"strategy '{self.name}' needs a method trained by gradient descent; "
                              f"'{method.name}' learns no weights (use sequential, replay or joint)")

    def training_stream(self, experience: Experience, current: SampleSet) -> TrainStream:
        """The data the method trains on at this step; plain strategies pass the current data."""
        return current

    def before_step(self, method: AnomalyMethod, experience: Experience) -> None:
        """Hook before the method learns a step (latent replay binds its buffer to the method)."""

    def after_step(self, experience: Experience, current: SampleSet, method: AnomalyMethod | None = None) -> None:
        """Hook after the method learned a step (a replay buffer stores samples here; DER++ stores the
        method's outputs on them: ``method`` is the one that learned, None where a caller has none)."""

    def callbacks(self, experience: Experience) -> list[Callback]:
        """Hooks the method's training loop runs at this step (``methods.training.Callback``): how a
        strategy changes training without touching a method, e.g. a penalty added to the loss in
        ``before_backward``. Default: none."""
        return []

    def train(self, method: AnomalyMethod, experience: Experience, current: SampleSet, val: SampleSet) -> None:
        self.before_step(method, experience)
        data = TaskData(
            step=experience.step,
            task_names=experience.task_names,
            train=self._with_progress(self.training_stream(experience, current), experience.label),
            val=val,
            seed=seeding.step_seed(self.seed, experience.step),
            callbacks=self.callbacks(experience),
        )
        method.fit_task(data)
        self.after_step(experience, current, method)

    def _with_progress(self, stream: TrainStream, label: str) -> TrainStream:
        return ProgressStream(stream, label) if self.progress else stream

    def memory_components(self) -> dict[str, int]:
        return {"replay_buffer": 0}

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int,
                        method: AnomalyMethod | None = None) -> dict[str, int]:
        """Bytes of what the strategy stores at most, by component (``clbench memory``): from its
        parameters alone, or, given a built ``method``, also what depends on the method (weights
        copied, outputs or features stored), which is otherwise 0 here."""
        return {"replay_buffer": 0}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (a replay buffer's contents)."""


class Regulariser(Strategy):
    """A strategy that only adds to the training loop (a penalty, a distillation): sequential steps
    alone, or the data part's steps in a combination (``replay+ewc``: strategies/combined.py)."""

    role = "regulariser"
    needs_gradients = True

    def experiences(self, tasks: Sequence[Any]) -> list[Experience]:
        return Experience.stream(tasks)


class StrategyCallback(Callback):
    """A training-loop hook that reads and updates its strategy's state."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the tensors occupy (a strategy's ``strategy_state`` in memory.csv)."""
    return sum(t.numel() * t.element_size() for t in tensors)
