"""Strategies combined by name: ``replay+ewc`` is replay's data with EWC's penalty.

A strategy plays one of two roles (``Strategy.role``): ``data`` decides what the method trains on at
each step (sequential, replay, joint), a ``regulariser`` only adds to the training loop through
callbacks (ewc). A combination has at most one data part (sequential when it names none) and each
regulariser once; the parts keep their own parameters, state and memory:

* ``strategy_params`` is split by the part that declares each key (a key two parts declare is refused,
  so every value has one meaning); defaults and checks are the parts' own;
* experiences, training stream and buffer updates are the data part's; callbacks, the method
  check and the step hooks (``before_step``, ``after_step``) are every part's; memory components are summed by name; the checkpoint keeps each part's
  state under its name.

Built on demand by ``STRATEGIES.get("a+b")`` (``strategies.base.StrategyRegistry``); nothing is
registered, so ``clbench strategies`` lists the parts.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

from clbench.data import SampleSet
from clbench.params import ConfigError
from methods.base import AnomalyMethod, TrainStream
from methods.training import Callback
from strategies.base import Experience, Strategy


class Combined(Strategy):
    """Base of the classes ``combine`` builds; ``parts`` are the part classes, data part first."""

    parts: ClassVar[tuple[type[Strategy], ...]] = ()

    def __init__(self, seed: int = 0, **params: Any) -> None:
        super().__init__(seed, **params)
        self.members = [part(seed, **self._own(part, self.params)) for part in self.parts]

    @staticmethod
    def _own(part: type[Strategy], params: Mapping[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in params.items() if key in part.hyperparameters}

    @property
    def data(self) -> Strategy:
        return self.members[0]

    def experiences(self, tasks: Sequence[Any]) -> list[Experience]:
        return self.data.experiences(tasks)

    def training_stream(self, experience: Experience, current: SampleSet) -> TrainStream:
        return self.data.training_stream(experience, current)

    def before_step(self, method: AnomalyMethod, experience: Experience) -> None:
        for member in self.members:
            member.before_step(method, experience)

    def after_step(self, experience: Experience, current: SampleSet, method: AnomalyMethod | None = None) -> None:
        for member in self.members:
            member.after_step(experience, current, method)

    def callbacks(self, experience: Experience) -> list[Callback]:
        return [callback for member in self.members for callback in member.callbacks(experience)]

    def check_method(self, method: AnomalyMethod) -> None:
        for member in self.members:
            member.check_method(method)

    def memory_components(self) -> dict[str, int]:
        return _summed(member.memory_components() for member in self.members)

    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int,
                        method: AnomalyMethod | None = None) -> dict[str, int]:
        resolved = cls.resolve_params(params)
        return _summed(part.analytic_memory(cls._own(part, resolved), image_size, method) for part in cls.parts)

    def state_dict(self) -> dict[str, Any]:
        return {member.name: member.state_dict() for member in self.members}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for member in self.members:
            member.load_state_dict(state.get(member.name, {}))


def _summed(parts) -> dict[str, int]:
    total: dict[str, int] = {}
    for components in parts:
        for key, value in components.items():
            total[key] = total.get(key, 0) + value
    return total


def combine(name: str, parts: Sequence[type[Strategy]]) -> type[Combined]:
    """The class of strategy ``name`` ("replay+ewc") from its parts' classes, checked: one line if
    two parts decide the data, a part repeats, or two parts declare the same parameter."""
    data = [p for p in parts if p.role == "data"]
    if len(data) > 1:
        raise ConfigError(f"strategy '{name}': {' and '.join(p.name for p in data)} both decide what the method "
                          "trains on; combine one of them with regularisers (e.g. replay+ewc)")
    if len({p.name for p in parts}) < len(parts):
        raise ConfigError(f"strategy '{name}': a part is named twice")
    if not data:
        from strategies.base import STRATEGIES

        data = [STRATEGIES.get("sequential")]
    ordered = (*data, *(p for p in parts if p.role != "data"))
    defaults: dict[str, Any] = {}
    constraints: dict[str, Any] = {}
    for part in ordered:
        for key, value in part.hyperparameters.items():
            if key in defaults:
                raise ConfigError(f"strategy '{name}': parameter '{key}' is declared by two of its parts")
            defaults[key] = value
            if key in part.parameter_constraints:
                constraints[key] = part.parameter_constraints[key]
    cls = type(f"Combined[{name}]", (Combined,), {"parts": ordered, "__doc__": f"Strategy {name}: {Combined.__doc__}"})
    cls.name = name
    cls.hyperparameters = defaults
    cls.parameter_constraints = constraints
    cls.parameter_rules = tuple(rule for part in ordered for rule in part.parameter_rules)
    return cls
