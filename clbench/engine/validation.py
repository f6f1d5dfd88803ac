"""The one check of a run's config before anything is loaded, built or written: every field's value,
the method and strategy names, and their parameters (names, values, rules between them).

``clbench run`` (the CLI, then the runner) and ``clbench sweep`` (every cell, dry run included) call
``validate_run``; what it accepts, a run starts with. What needs the file system, the data or a built
model (a device's presence, weights files, categories, a backbone's layers and channels) is checked
where that is known, still before the run folder exists (``clbench.engine.runner``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from clbench.engine.config import ConfigError, RunConfig, from_mapping, validate


@dataclass(frozen=True)
class ValidRun:
    """A checked config with what checking it resolved."""

    config: RunConfig
    method_cls: type  # a methods.base.AnomalyMethod subclass
    strategy_cls: type  # a strategies.base.Strategy subclass
    method_params: dict[str, Any]  # the method's defaults, the config's method_params and its backbone
    strategy_params: dict[str, Any]  # the strategy's defaults and the config's strategy_params


def validate_run(config: RunConfig | Mapping[str, Any], source: str = "config", where: str = "") -> ValidRun:
    """Check ``config`` (a RunConfig, or a mapping of its keys) without data: one ConfigError line
    for the first fault. ``source`` names the config in errors about its own keys (a YAML path);
    ``where``, if given, prefixes errors about the method and strategy (a sweep's cell)."""
    from methods.base import METHODS  # imports torch and every method: only when a run is checked
    from strategies.base import STRATEGIES

    config = from_mapping(config, source) if isinstance(config, Mapping) else validate(config, source)
    try:
        method_cls = METHODS.get(config.method)
        strategy_cls = STRATEGIES.get(config.strategy)
        given = dict(config.method_params)
        if config.backbone is not None:
            if "backbone" not in method_cls.hyperparameters:
                raise ConfigError(f"backbone: method '{config.method}' takes no backbone")
            given["backbone"] = config.backbone
        method_params = method_cls.resolve_params(given)
        strategy_params = strategy_cls.resolve_params(config.strategy_params)
        if config.trackers:
            from clbench.tracking import check

            check(config.trackers)
    except ValueError as err:  # ConfigError, or the registry's unknown name
        if not where:
            raise
        raise ConfigError(f"{where}: {err}") from None
    return ValidRun(config, method_cls, strategy_cls, method_params, strategy_params)
