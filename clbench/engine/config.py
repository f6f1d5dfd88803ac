"""Run configuration: defaults, YAML + flag overrides, validation with one clear error per fault."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A bad key or value in a config; the message names it."""


@dataclass
class RunConfig:
    """Everything that defines a run. The resolved form is written to ``config.yaml``."""

    method: str = "padim"
    method_params: dict[str, Any] = field(default_factory=dict)
    strategy: str = "sequential"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    tasks: Any = "all"  # list of categories | "all" | count | preset ("mvtec", "paper10")
    task_order: str = "given"  # "given" | "shuffle" (seeded)
    data_root: str = "data/synthetic"
    synthetic: bool | str = "auto"  # auto: generate the built-in synthetic dataset only at the default data_root; true: at data_root; false: never (clbench.data.root)
    synthetic_categories: int = 15
    image_size: int = 128  # images are resized to image_size x image_size ...
    crop_size: int | None = None  # ... then center-cropped to crop_size (PaDiM/PatchCore/CFA: 256 -> 224); None: no crop
    val_fraction: float = 0.1  # held-out good training images (never the test set)
    backbone: str | None = None  # overrides the method's backbone hyper-parameter
    weights: str = "auto"  # auto | none | imagenet | <path to a local weights file>
    require_pretrained: bool = False  # refuse to start if a backbone's weights resolve to random init
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 32
    epochs_scale: float = 1.0  # scales trainable methods' epochs (e.g. 0.1 for short runs)
    max_epochs: int | None = None  # caps trainable methods' epochs
    feature_cache_gb: float = 4.0  # RAM for cached frozen-backbone features; spills to disk beyond
    output_dir: str = "results"
    name: str | None = None  # run folder name; default <method>-<strategy>-<backbone>-seed<seed> (runner.default_run_name)
    paper_profile: dict[str, Any] | None = None  # set by `clbench reproduce`: {name, differences} (recorded in env.json)

    @property
    def eval_size(self) -> int:
        """The resolution methods see and are evaluated at: the crop if any, else ``image_size``."""
        return self.crop_size or self.image_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def run_name_problem(name: Any) -> str | None:
    """Why ``name`` is not one plain folder name (None if it is).

    A run folder is ``<output_dir>/<name>`` and ``--overwrite`` deletes it, so the name must not
    reach outside ``output_dir`` (``/``, ``..``), be the output folder itself (``.``, empty), hide
    (a leading ``.``: clbench's own files start with one), read as a flag (a leading ``-``), or
    carry control characters (NUL, newlines: they break file systems, logs and CSV rows).
    Any other character, unicode included, is fine; 255 bytes at most (the usual file-name limit)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty folder name"
    if "/" in name or "\\" in name:
        return "must be one folder name, without '/' or '\\'"
    if name.startswith("."):
        return "must not start with '.' ('.', '..' and hidden names are not run folders)"
    if name.startswith("-"):
        return "must not start with '-'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "must not contain control characters"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return "must be at most 255 bytes long"
    return None


def check_run_name(name: Any, what: str = "name") -> str:
    """``name`` if it is one plain folder name, else a ConfigError naming it."""
    problem = run_name_problem(name)
    if problem is not None:
        raise ConfigError(f"{what} {problem}, got {name!r}")
    return name


def validate(config: RunConfig, source: str = "config") -> RunConfig:
    """Check types and ranges of the engine's own keys (methods check their own parameters)."""
    c = config
    for key in ("method", "strategy", "task_order", "data_root", "weights", "device", "output_dir"):
        _check(isinstance(getattr(c, key), str) and getattr(c, key), f"{source}: '{key}' must be a non-empty string, got {getattr(c, key)!r}")
    for key in ("method_params", "strategy_params"):
        _check(isinstance(getattr(c, key), dict), f"{source}: '{key}' must be a mapping, got {getattr(c, key)!r}")
    for key in ("image_size", "eval_batch_size", "synthetic_categories"):
        value = getattr(c, key)
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"{source}: '{key}' must be a positive integer, got {value!r}")
    _check(c.image_size >= 32, f"{source}: 'image_size' must be at least 32, got {c.image_size}")
    if c.crop_size is not None:
        _check(isinstance(c.crop_size, int) and not isinstance(c.crop_size, bool), f"{source}: 'crop_size' must be an integer or null, got {c.crop_size!r}")
        _check(32 <= c.crop_size <= c.image_size, f"{source}: 'crop_size' must be in 32..image_size ({c.image_size}), got {c.crop_size}")
    _check(isinstance(c.require_pretrained, bool), f"{source}: 'require_pretrained' must be true or false, got {c.require_pretrained!r}")
    _check(c.paper_profile is None or isinstance(c.paper_profile, dict), f"{source}: 'paper_profile' must be a mapping or null, got {c.paper_profile!r}")
    _check(isinstance(c.seed, int) and not isinstance(c.seed, bool) and c.seed >= 0, f"{source}: 'seed' must be a non-negative integer, got {c.seed!r}")
    _check(isinstance(c.val_fraction, (int, float)) and 0 <= c.val_fraction < 1, f"{source}: 'val_fraction' must be in [0, 1), got {c.val_fraction!r}")
    _check(isinstance(c.feature_cache_gb, (int, float)) and c.feature_cache_gb >= 0, f"{source}: 'feature_cache_gb' must be >= 0, got {c.feature_cache_gb!r}")
    _check(isinstance(c.epochs_scale, (int, float)) and not isinstance(c.epochs_scale, bool) and c.epochs_scale > 0, f"{source}: 'epochs_scale' must be > 0, got {c.epochs_scale!r}")
    _check(c.max_epochs is None or (isinstance(c.max_epochs, int) and not isinstance(c.max_epochs, bool) and c.max_epochs > 0), f"{source}: 'max_epochs' must be a positive integer, got {c.max_epochs!r}")
    _check(isinstance(c.synthetic, bool) or c.synthetic == "auto", f"{source}: 'synthetic' must be auto, true or false, got {c.synthetic!r}")
    _check(c.backbone is None or (isinstance(c.backbone, str) and c.backbone), f"{source}: 'backbone' must be a timm model name, got {c.backbone!r}")
    if c.name is not None:
        check_run_name(c.name, f"{source}: 'name'")
    _check(DEVICE_PATTERN.fullmatch(c.device) is not None, f"{source}: 'device' must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    tasks_ok = (
        isinstance(c.tasks, str)
        or (isinstance(c.tasks, int) and not isinstance(c.tasks, bool))
        or (isinstance(c.tasks, list) and all(isinstance(t, str) for t in c.tasks))
    )
    _check(tasks_ok, f"{source}: 'tasks' must be a list of categories, 'all', a count or a preset, got {c.tasks!r}")
    return c


def from_mapping(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    unknown = [k for k in data if k not in _FIELDS]
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(_FIELDS)})")
    return validate(RunConfig(**dict(data)), source)


def yaml_error(path: str | Path, err: yaml.YAMLError) -> ConfigError:
    """One line for malformed YAML: the file, the line and column, and what is wrong there."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return ConfigError(f"{where}: invalid YAML: {detail}")


def read_yaml_mapping(path: str | Path, what: str = "expected a mapping of keys to values at top level",
                      *, allow_empty: bool = False) -> dict[str, Any]:
    """A YAML file that must hold a mapping; malformed, empty, binary or unreadable files are one
    ConfigError naming the file (and the line and column of a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file ({what})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from None
    if loaded is None and allow_empty:
        return {}
    if loaded is None:
        raise ConfigError(f"{path}: empty ({what})")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: {what}, got a {type(loaded).__name__}")
    return loaded


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Config from a YAML file (optional) with ``overrides`` (e.g. CLI flags) on top."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        data.update(read_yaml_mapping(path, allow_empty=True))  # an empty config: all defaults
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_mapping(data, source)
