"""Typed parameters: every hyper-parameter (of a method or a strategy) and every run setting is declared
with its default *and* the values it allows, and checked at the boundary (``clbench run``, ``--config``,
``--param``, ``clbench sweep --dry-run``) before any data is loaded: one line names the key, the value
and what is allowed (``method_params: model_size='large' is not one of small, medium``).

Why a declarative table, in the style of scikit-learn's ``_parameter_constraints``, and not dataclasses
or pydantic: hyper-parameters are read as plain data by much of clbench (configs, sweeps' dotted keys,
the paper profile, ``clbench memory``, ``config.yaml``, the tests all read ``cls.hyperparameters``, a
mapping of defaults), so the defaults stay a mapping; a class per method (dataclass, pydantic model)
would change all of those readers, and pydantic would add a dependency that coerces values ("3" -> 3,
1 -> True) where a YAML value must be taken as written. A constraint is data too: its description is
the "what is allowed" of the error, and one test checks that every default satisfies its constraint
and that no hyper-parameter lacks one.

Why ``Param(default, constraint)`` entries in ``hyperparameters`` rather than a second mapping beside it
(scikit-learn's ``_parameter_constraints``, whose defaults live in ``__init__`` signatures): the
constraint sits next to its default and the two cannot drift apart. ``Parameterised`` (the base of
``AnomalyMethod`` and ``Strategy``) splits a class's table when the class is created, as ``dataclasses``
does with ``field()`` entries: ``cls.hyperparameters`` is the plain mapping of defaults, as before, and
``cls.parameter_constraints`` the constraints. Relations between parameters (EfficientAD's
``q_a < q_b``, a crop no larger than the image) are ``Rule``s. Checks that need data or a built model
(PaDiM's ``n_features`` against the backbone's channels, PatchCore's budget against the number of
tasks, CFA's bank against ``k + j``) stay where that is known.

A constraint is written as: a ``Constraint`` (``Interval``, ``Options``, ``Text``, ``ListOf``,
``Check``), ``None`` (null allowed), a type (``bool``, ``str``, ``dict``, ``list``, ``int``, ``float``;
a bool is never taken for a number), or a list of these (any of them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence


class ConfigError(ValueError):
    """A bad key or value in a config; the message names it (re-exported by ``clbench.engine.config``)."""


# -- constraints -----------------------------------------------------------------------------------
class Constraint:
    """What values a parameter allows; ``str(constraint)`` says it ("an integer >= 1")."""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is allowed, else what is allowed (the end of the error line)."""
        return None if self.accepts(value) else str(self)


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # True is an int to Python, never a number to a config
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def _show(value: Any) -> str:
    """A value as a config writes it: strings bare, true/false, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Interval(Constraint):
    """A number of ``kind`` (``int``; ``float``: any number, ints included) between ``low`` and ``high``
    (None: unbounded); ``closed``: which ends are included, "both", "left", "right" or "neither"."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def __post_init__(self) -> None:
        if self.kind not in (int, float) or self.closed not in ("both", "left", "right", "neither"):
            raise TypeError(f"Interval({self.kind!r}, closed={self.closed!r}): kind is int or float, "
                            "closed is both, left, right or neither")

    def accepts(self, value: Any) -> bool:
        if not _is_number(value, self.kind) or value != value:  # NaN is in no interval
            return False
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and (value < self.low if left else value <= self.low):
            return False
        if self.high is not None and (value > self.high if right else value >= self.high):
            return False
        return True

    def __str__(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and self.high is not None:
            return f"{noun} in {'[' if left else '('}{self.low}, {self.high}{']' if right else ')'}"
        if self.low is not None:
            return f"{noun} {'>=' if left else '>'} {self.low}"
        if self.high is not None:
            return f"{noun} {'<=' if right else '<'} {self.high}"
        return noun


class Options(Constraint):
    """One of the given values (compared with their type: ``1`` is not ``True``); ``ignore_case``
    for strings."""

    def __init__(self, *values: Any, ignore_case: bool = False) -> None:
        self.values = values
        self.ignore_case = ignore_case

    def accepts(self, value: Any) -> bool:
        if self.ignore_case and isinstance(value, str):
            return value.casefold() in {v.casefold() for v in self.values if isinstance(v, str)}
        return any(type(value) is type(v) and value == v for v in self.values)

    def __str__(self) -> str:
        return f"one of {', '.join(_show(v) for v in self.values)}" + (" (any case)" if self.ignore_case else "")

    def __repr__(self) -> str:
        return f"Options{self.values!r}"


@dataclass(frozen=True)
class Text(Constraint):
    """A non-empty string; ``what`` says which (a path, a timm model name)."""

    what: str = "a non-empty string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value != ""

    def __str__(self) -> str:
        return self.what


@dataclass(frozen=True)
class ListOf(Constraint):
    """A list (or tuple) whose every item satisfies ``item``; ``length``: exactly that many items,
    ``min_length``: at least that many."""

    item: Any
    length: int | None = None
    min_length: int = 0

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, (list, tuple)):
            return False
        if (self.length is not None and len(value) != self.length) or len(value) < self.min_length:
            return False
        item = as_constraint(self.item)
        return all(item.accepts(v) for v in value)

    def __str__(self) -> str:
        if self.length is not None:
            size = f"a list of {self.length} items"
        elif self.min_length == 1:
            size = "a non-empty list"
        elif self.min_length:
            size = f"a list of at least {self.min_length} items"
        else:
            size = "a list"
        return f"{size}, each {as_constraint(self.item)}"


class Check(Constraint):
    """Any other rule on one value: ``accepts(value) -> bool``, said as ``what``; ``why(value)`` may
    add the reason a value fails (a run name: "must not start with '.'")."""

    def __init__(self, what: str, accepts: Callable[[Any], bool],
                 why: Callable[[Any], str | None] | None = None) -> None:
        self.what = what
        self._accepts = accepts
        self._why = why

    def accepts(self, value: Any) -> bool:
        return bool(self._accepts(value))

    def problem(self, value: Any) -> str | None:
        if self.accepts(value):
            return None
        reason = self._why(value) if self._why is not None else None
        return f"{self.what}: {reason}" if reason else self.what

    def __str__(self) -> str:
        return self.what

    def __repr__(self) -> str:
        return f"Check({self.what!r})"


class _Type(Constraint):
    """An instance of a plain type (``bool``, ``str``, ``dict``, ``list``), said in a config's words."""

    WORDS: ClassVar[dict[type, str]] = {bool: "true or false", str: "a string", dict: "a mapping", list: "a list",
                                        type(None): "null"}

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.kind)

    def __str__(self) -> str:
        return self.WORDS.get(self.kind, f"a {self.kind.__name__}")

    def __repr__(self) -> str:
        return f"{self.kind.__name__}"


class AnyOf(Constraint):
    """Any one of several constraints ("an integer >= 1 or null")."""

    def __init__(self, *members: Constraint) -> None:
        self.members = members

    def accepts(self, value: Any) -> bool:
        return any(m.accepts(value) for m in self.members)

    def __str__(self) -> str:
        members = sorted(self.members, key=lambda m: isinstance(m, _Type) and m.kind is type(None))  # "... or null"
        words = [str(m) for m in members]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"

    def __repr__(self) -> str:
        return f"AnyOf{self.members!r}"


def as_constraint(spec: Any) -> Constraint:
    """A constraint from its short form: a Constraint, None, a type, or a list of these (any of them)."""
    if isinstance(spec, Constraint):
        return spec
    if spec is None:
        return _Type(type(None))
    if spec in (int, float):
        return Interval(spec)
    if isinstance(spec, type):
        return _Type(spec)
    if isinstance(spec, (list, tuple)) and spec:
        members = [as_constraint(s) for s in spec]
        return members[0] if len(members) == 1 else AnyOf(*members)
    raise TypeError(f"not a constraint: {spec!r}")


# Constraints many parameters share.
POSITIVE_INT = Interval(int, 1, None)
NON_NEGATIVE_INT = Interval(int, 0, None)
POSITIVE = Interval(float, 0, None, closed="neither")
NON_NEGATIVE = Interval(float, 0, None)
FRACTION = Interval(float, 0, 1)  # [0, 1]: probabilities, fractions of a schedule
ODD_POSITIVE_INT = Check("an odd integer >= 1",
                         lambda v: _is_number(v, int) and v >= 1 and v % 2 == 1)
BACKBONE = Text("a timm model name")
LAYERS = ListOf(Text("a layer name"), min_length=1)
PATH = Text("a path")


# -- declarations ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its default, the values it allows (any form ``as_constraint`` takes) and,
    optionally, what it means."""

    default: Any
    constraint: Any
    doc: str = ""


@dataclass(frozen=True)
class Rule:
    """A relation between parameters, checked once each value is allowed on its own."""

    keys: tuple[str, ...]
    holds: Callable[[Mapping[str, Any]], bool]
    what: str  # "q_a < q_b"

    def problem(self, values: Mapping[str, Any]) -> str | None:
        if self.holds(values):
            return None
        got = ", ".join(f"{k}={values.get(k)!r}" for k in self.keys)
        return f"need {self.what}, got {got}"


def split_table(table: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Constraint]]:
    """``{key: Param | default}`` -> (defaults, constraints); a plain default has no constraint."""
    defaults: dict[str, Any] = {}
    constraints: dict[str, Constraint] = {}
    for key, entry in table.items():
        if isinstance(entry, Param):
            defaults[key] = entry.default
            constraints[key] = as_constraint(entry.constraint)
        else:
            defaults[key] = entry
    return defaults, constraints


def setting(default: Any, constraint: Any, doc: str = "") -> Any:
    """A dataclass field declared with its constraint (``RunConfig``); a list or dict default is
    copied for every instance."""
    metadata = {"constraint": as_constraint(constraint), "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_constraints(cls: type) -> dict[str, Constraint]:
    """The constraints a dataclass declared with ``setting``."""
    return {f.name: f.metadata["constraint"] for f in dataclasses.fields(cls) if "constraint" in f.metadata}


# -- checking --------------------------------------------------------------------------------------
def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def check_value(key: str, value: Any, constraint: Any, where: str = "") -> None:
    """One ConfigError line if ``value`` is not allowed: ``<where>: <key>=<value> is not <allowed>``."""
    problem = as_constraint(constraint).problem(value)
    if problem is not None:
        raise ConfigError(f"{_prefix(where)}{key}={value!r} is not {problem}")


def check_values(values: Mapping[str, Any], constraints: Mapping[str, Any], rules: Iterable[Rule] = (),
                 where: str = "") -> None:
    """Every value that has a constraint, in the order of ``values``, then every rule."""
    for key, value in values.items():
        if key in constraints:
            check_value(key, value, constraints[key], where)
    for rule in rules:
        problem = rule.problem(values)
        if problem is not None:
            raise ConfigError(f"{_prefix(where)}{problem}")


class Parameterised:
    """What methods and strategies share: a ``hyperparameters`` table of ``Param`` entries, split at
    class creation into defaults (``hyperparameters``) and ``parameter_constraints``; ``resolve_params``
    checks a user's values against them. A plain default keeps the constraint its key has in the
    parent class, or in ``shared_constraints`` (keys the base class itself interprets, such as
    ``optimizer_state``); one with neither has none, which the registry's test refuses."""

    name: ClassVar[str]
    params_key: ClassVar[str] = "params"  # what the error lines call the mapping: method_params, strategy_params
    kind: ClassVar[str] = "component"  # method | strategy
    hyperparameters: ClassVar[Mapping[str, Any]] = {}
    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {}
    parameter_rules: ClassVar[Sequence[Rule]] = ()
    shared_constraints: ClassVar[Mapping[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = cls.__dict__.get("hyperparameters")
        if table is None:  # inherits its parent's, already split
            return
        defaults, constraints = split_table(table)
        inherited = {**cls.shared_constraints, **cls.parameter_constraints}  # the parent's: this class has none yet
        for key in defaults:
            if key not in constraints and key in inherited:
                constraints[key] = as_constraint(inherited[key])
        cls.hyperparameters = defaults
        cls.parameter_constraints = constraints

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``params``, every value and rule checked: an unknown key or a value
        that is not allowed is one ConfigError line naming it."""
        unknown = sorted(set(params) - set(cls.hyperparameters))
        if unknown:
            known = ", ".join(sorted(cls.hyperparameters)) or "none"
            owner = getattr(cls, "name", cls.__name__)
            raise ConfigError(f"{cls.params_key}: unknown key '{unknown[0]}' for {cls.kind} '{owner}' (known: {known})")
        resolved = dict(cls.hyperparameters)
        resolved.update(params)
        cls.check_params(resolved)
        return resolved

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Every value of a resolved mapping against its constraint, then the rules between them."""
        check_values(params, cls.parameter_constraints, cls.parameter_rules, cls.params_key)


__all__ = [
    "AnyOf", "BACKBONE", "Check", "ConfigError", "Constraint", "FRACTION", "Interval", "LAYERS", "ListOf",
    "NON_NEGATIVE", "NON_NEGATIVE_INT", "ODD_POSITIVE_INT", "Options", "PATH", "POSITIVE", "POSITIVE_INT", "Param",
    "Parameterised", "Rule", "Text", "as_constraint", "check_value", "check_values", "field_constraints",
    "setting", "split_table",
]
