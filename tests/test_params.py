"""Typed parameters (issue 12, part 3): every hyper-parameter and run setting declares what it allows,
and ``clbench run`` / ``--config`` / ``--param`` / ``clbench sweep --dry-run`` refuse a bad value with one
line naming key, value and what is allowed, before any data is read and before any folder exists."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from clbench.cli import main
from clbench.engine import config as cfg
from clbench.engine.config import ConfigError, RunConfig
from clbench.engine.validation import validate_run
from clbench.params import (
    POSITIVE_INT, Interval, ListOf, Options, Param, Parameterised, Rule, Text, as_constraint, check_value,
    field_constraints,
)
from methods.base import METHODS
from strategies.base import STRATEGIES

# The four examples: run flags, the same as config-file keys, and the one error line they give.
EXAMPLES = {
    "model_size": (["--method", "efficientad", "--param", "model_size=large"],
                   {"method": "efficientad", "method_params": {"model_size": "large"}},
                   "method_params: model_size='large' is not one of small, medium"),
    "buffer_size": (["--strategy", "replay", "--strategy-param", "buffer_size=-1"],
                    {"strategy": "replay", "strategy_params": {"buffer_size": -1}},
                    "strategy_params: buffer_size=-1 is not an integer >= 0"),
    "budget": (["--method", "patchcore", "--param", "budget=0"],
               {"method": "patchcore", "method_params": {"budget": 0}},
               "method_params: budget=0 is not an integer >= 1"),
    "epochs_scale": (["--epochs-scale", "0"], {"epochs_scale": 0}, "epochs_scale=0"),
}


@pytest.fixture
def no_data_read(monkeypatch):
    """Any attempt to find or read a dataset fails the test (the error must come first)."""
    import clbench.engine.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("data was read before the parameters were checked")

    monkeypatch.setattr(runner, "ensure_dataset", refuse)
    monkeypatch.setattr(runner, "load_category", refuse)


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clbench: error: "), err
    return lines[0]


# -- the boundary -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(EXAMPLES))
def test_run_flags_refuse_bad_values_before_reading_data(case: str, tmp_path: Path, capsys, no_data_read) -> None:
    flags, _, expected = EXAMPLES[case]
    out = tmp_path / "out"
    code = main(["run", "--data-root", str(tmp_path / "no-such-data"), "--output", str(out), "--no-progress", *flags])
    line = one_error(capsys)
    assert code == 2 and expected in line, line
    assert not out.exists() and not (tmp_path / "no-such-data").exists()


def test_epochs_scale_line_names_what_is_allowed(tmp_path: Path, capsys) -> None:
    assert main(["run", "--data-root", str(tmp_path / "none"), "--epochs-scale", "0"]) == 2
    assert one_error(capsys) == "clbench: error: config: epochs_scale=0.0 is not a number > 0"


@pytest.mark.parametrize("case", list(EXAMPLES))
def test_config_file_refuses_bad_values_before_reading_data(case: str, tmp_path: Path, capsys, no_data_read) -> None:
    _, keys, expected = EXAMPLES[case]
    path = tmp_path / "c.yaml"
    out = tmp_path / "out"
    path.write_text(yaml.safe_dump({**keys, "data_root": str(tmp_path / "no-such-data"), "output_dir": str(out)}))
    assert main(["run", "--config", str(path), "--no-progress"]) == 2
    assert expected in one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("case", list(EXAMPLES))
def test_sweep_dry_run_refuses_bad_values(case: str, tmp_path: Path, capsys, no_data_read) -> None:
    _, keys, expected = EXAMPLES[case]
    base = {key: value for key, value in keys.items() if not key.endswith("_params")}
    base["data_root"] = str(tmp_path / "no-such-data")
    for key, params in keys.items():
        if key.endswith("_params"):
            base.update({f"{key}.{name}": value for name, value in params.items()})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "sweeps"), "base": base,
                                    "grid": {"seed": [0, 1]}}))
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    line = one_error(capsys)
    assert f"{spec}: cell " in line and expected in line, line
    assert not (tmp_path / "sweeps").exists()


def test_the_runner_checks_a_config_built_in_python(tmp_path: Path, no_data_read) -> None:
    """``run_experiment`` (sweep workers, scripts) validates as the CLI does, before any data."""
    from clbench.engine.runner import run_experiment

    config = RunConfig(method="efficientad", method_params={"q_a": 0.999}, data_root=str(tmp_path / "none"),
                       output_dir=str(tmp_path / "out"), device="cpu")
    with pytest.raises(ConfigError, match=r"^method_params: need q_a < q_b, got q_a=0.999, q_b=0.995$"):
        run_experiment(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_validate_run_resolves_what_the_runner_needs() -> None:
    run = validate_run({"method": "padim", "backbone": "wide_resnet50_2", "method_params": {"n_features": 50},
                        "strategy": "replay", "strategy_params": {"buffer_size": 7}})
    assert run.method_cls is METHODS.get("padim") and run.strategy_cls is STRATEGIES.get("replay")
    assert run.method_params["backbone"] == "wide_resnet50_2" and run.method_params["n_features"] == 50
    assert run.method_params["epsilon"] == METHODS.get("padim").hyperparameters["epsilon"]
    assert run.strategy_params == {"buffer_size": 7, "policy": "balanced"}
    with pytest.raises(ConfigError, match="^backbone: method 'draem' takes no backbone$"):
        validate_run({"method": "draem", "backbone": "resnet18"})
    with pytest.raises(ConfigError, match=r"^sweep: cell c: method_params: unknown key 'n_featurs' for method 'padim'"):
        validate_run({"method_params": {"n_featurs": 3}}, "sweep: cell c", "sweep: cell c")


# -- the constraints themselves ------------------------------------------------------------------
def test_interval_bounds_open_and_closed() -> None:
    assert Interval(int, 1, None).accepts(1) and not Interval(int, 1, None).accepts(0)
    both, left = Interval(float, 0, 1), Interval(float, 0, 1, closed="left")
    right, neither = Interval(float, 0, 1, closed="right"), Interval(float, 0, 1, closed="neither")
    assert [c.accepts(0) for c in (both, left, right, neither)] == [True, True, False, False]
    assert [c.accepts(1) for c in (both, left, right, neither)] == [True, False, True, False]
    assert all(c.accepts(0.5) for c in (both, left, right, neither))
    assert [str(c) for c in (both, left, right, neither)] == [
        "a number in [0, 1]", "a number in [0, 1)", "a number in (0, 1]", "a number in (0, 1)"]
    assert str(Interval(float, 0, None, closed="neither")) == "a number > 0"
    assert str(Interval(int, None, 10)) == "an integer <= 10" and str(Interval(int)) == "an integer"
    assert not Interval(float).accepts(math.nan) and not Interval(float).accepts("1")


def test_bool_is_not_a_number_and_a_number_is_not_a_bool() -> None:
    assert not Interval(int, 0, None).accepts(True) and not Interval(float).accepts(False)
    assert not Interval(int).accepts(2.0)  # an integer is written as one
    assert Interval(float).accepts(2)  # a number may be written as an integer
    flag = as_constraint(bool)
    assert flag.accepts(True) and not flag.accepts(1) and not flag.accepts("true") and str(flag) == "true or false"


def test_options_none_and_unions() -> None:
    sizes = Options("small", "medium")
    assert sizes.accepts("small") and not sizes.accepts("large") and str(sizes) == "one of small, medium"
    synthetic = Options("auto", True, False)
    assert synthetic.accepts(True) and not synthetic.accepts(1) and not synthetic.accepts("true")
    assert str(synthetic) == "one of auto, true, false"
    variant = Options("CAC", "CA", ignore_case=True)
    assert variant.accepts("cac") and not variant.accepts("cc")
    optional = as_constraint([None, POSITIVE_INT])
    assert optional.accepts(None) and optional.accepts(3) and not optional.accepts(0)
    assert str(optional) == "an integer >= 1 or null"
    assert not as_constraint(POSITIVE_INT).accepts(None)  # None only where it is listed


def test_lists_text_and_rules() -> None:
    pair = ListOf(Interval(float, 0, 1, closed="left"), length=2)
    assert pair.accepts([0.9, 0.999]) and pair.accepts((0, 0.5))
    assert not pair.accepts([0.9]) and not pair.accepts([0.9, 1.0]) and not pair.accepts("ab")
    assert str(pair) == "a list of 2 items, each a number in [0, 1)"
    assert not ListOf(Text(), min_length=1).accepts([]) and not Text().accepts("")
    rule = Rule(("a", "b"), lambda p: p["a"] < p["b"], "a < b")
    assert rule.problem({"a": 1, "b": 2}) is None and rule.problem({"a": 2, "b": 1}) == "need a < b, got a=2, b=1"


def test_the_error_line_names_key_value_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        check_value("model_size", "large", Options("small", "medium"), "method_params")
    assert str(info.value) == "method_params: model_size='large' is not one of small, medium"
    check_value("budget", 1, POSITIVE_INT)  # allowed: nothing raised


def test_a_table_of_params_splits_into_defaults_and_constraints() -> None:
    class Base(Parameterised):
        name = "toy"
        params_key, kind = "method_params", "method"
        shared_constraints = {"mode": Options("a", "b")}

    class Toy(Base):
        hyperparameters = {"size": Param(3, POSITIVE_INT), "mode": "a", "free": 1}

    class Child(Toy):  # no table of its own: the parent's
        pass

    class Smaller(Toy):  # a plain default keeps the parent's constraint
        hyperparameters = {**Toy.hyperparameters, "size": 2}

    assert Toy.hyperparameters == {"size": 3, "mode": "a", "free": 1}
    assert set(Toy.parameter_constraints) == {"size", "mode"}  # 'free' has none: see the test below
    assert Child.parameter_constraints is Toy.parameter_constraints
    assert Smaller.hyperparameters["size"] == 2 and Smaller.parameter_constraints["size"] is POSITIVE_INT
    assert Toy.resolve_params({"size": 5}) == {"size": 5, "mode": "a", "free": 1}
    with pytest.raises(ConfigError, match=r"^method_params: mode='c' is not one of a, b$"):
        Toy.resolve_params({"mode": "c"})
    unknown = r"^method_params: unknown key 'sise' for method 'toy' \(known: free, mode, size\)$"
    with pytest.raises(ConfigError, match=unknown):
        Toy.resolve_params({"sise": 5})
    assert unconstrained(Toy) == ["free"]  # what the registry test below would report


# -- every method and strategy -------------------------------------------------------------------
def unconstrained(cls) -> list[str]:
    return sorted(set(cls.hyperparameters) - set(cls.parameter_constraints))


COMPONENTS = [METHODS.get(n) for n in METHODS.names()] + [STRATEGIES.get(n) for n in STRATEGIES.names()]
IDS = [f"method-{n}" for n in METHODS.names()] + [f"strategy-{n}" for n in STRATEGIES.names()]


@pytest.mark.parametrize("cls", COMPONENTS, ids=IDS)
def test_every_hyperparameter_has_a_constraint_its_default_satisfies(cls) -> None:
    assert unconstrained(cls) == [], f"{cls.name}: declare these as Param(default, constraint)"
    for key, default in cls.hyperparameters.items():
        assert cls.parameter_constraints[key].accepts(default), f"{cls.name}: default {key}={default!r}"
        assert not cls.parameter_constraints[key].accepts({"a": 1}), f"{cls.name}: {key} accepts anything"
    assert cls.resolve_params({}) == dict(cls.hyperparameters)  # the rules hold for the defaults too


def test_every_run_setting_has_a_constraint_its_default_satisfies() -> None:
    constraints = field_constraints(RunConfig)
    defaults = RunConfig().to_dict()
    assert sorted(set(defaults) - set(constraints)) == []
    assert all(constraints[key].accepts(value) for key, value in defaults.items())
    assert cfg.validate(RunConfig()) == RunConfig()
