"""Run configuration: defaults, YAML + flag overrides, validation with one clear error per fault.

Every field is declared with the values it allows (``clbench.params.setting``), next to its default;
``validate`` checks them all, and the rules between fields, with one line naming key and value."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from clbench.engine.tasks import spec_problem
from clbench.params import (
    BACKBONE, NON_NEGATIVE, PATH, POSITIVE, POSITIVE_INT, Check, ConfigError, Interval, Options, Rule, Text,
    check_values, field_constraints, setting,
)

__all__ = ["ConfigError", "RunConfig", "check_run_name", "from_mapping", "load", "read_yaml_mapping", "run_name_problem",
           "validate", "yaml_error"]

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
MIN_IMAGE_SIZE = 32


def _is_task_spec(value: Any) -> bool:
    return spec_problem(value) is None


def _task_spec_detail(value: Any) -> str | None:
    """What is wrong inside a list or protocol string (a value of the wrong type needs no detail)."""
    return spec_problem(value) if isinstance(value, (str, list)) else None


def _run_name_or_none(value: Any) -> str | None:
    return None if value is None else run_name_problem(value)


TASKS = Check("a list of categories, all, a count or a preset, or a list of steps or a protocol (mvtec:10-5, 10-5)",
              _is_task_spec, _task_spec_detail)
DEVICE = Check("one of auto, cpu, cuda, cuda:N",
               lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v) is not None)
RUN_NAME = Check("a plain folder name", lambda v: _run_name_or_none(v) is None, _run_name_or_none)
IMAGE_SIZE = Interval(int, MIN_IMAGE_SIZE, None)


@dataclass
class RunConfig:
    """Everything that defines a run. The resolved form is written to ``config.yaml``."""

    method: str = setting("padim", Text("a method name"))
    method_params: dict[str, Any] = setting({}, dict)  # each checked by the method's table (engine.validation)
    strategy: str = setting("sequential", Text("a strategy name"))
    strategy_params: dict[str, Any] = setting({}, dict)
    # list of categories | list of steps (lists of categories) | "all" | count | preset ("mvtec", "paper10",
    # "visa", "dne") | protocol "<preset>:<setting>" or a bare setting ("mvtec:10-5", "10-5": clbench.engine.tasks)
    tasks: Any = setting("all", TASKS)
    task_order: str = setting("given", Options("given", "shuffle"))  # "given" | "shuffle" (seeded)
    data_root: str = setting("data/synthetic", PATH)
    # auto: generate the built-in synthetic dataset only at the default data_root; true: at data_root; false:
    # never (clbench.data.root)
    synthetic: bool | str = setting("auto", Options("auto", True, False))
    synthetic_categories: int = setting(15, POSITIVE_INT)
    image_size: int = setting(128, IMAGE_SIZE)  # images are resized to image_size x image_size ...
    # ... then center-cropped to crop_size (PaDiM/PatchCore/CFA: 256 -> 224); None: no crop
    crop_size: int | None = setting(None, [None, IMAGE_SIZE])
    # held-out good training images (never the test set)
    val_fraction: float = setting(0.1, Interval(float, 0, 1, closed="left"))
    backbone: str | None = setting(None, [None, BACKBONE])  # overrides the method's backbone hyper-parameter
    # auto | none | imagenet | <path to a local weights file>
    weights: str = setting("auto", Text("auto, none, imagenet or a path"))
    require_pretrained: bool = setting(False, bool)  # refuse to start if a backbone's weights resolve to random init
    seed: int = setting(0, Interval(int, 0, None))
    device: str = setting("auto", DEVICE)  # auto | cpu | cuda | cuda:N
    # mixed precision for gradient-trained methods (methods/training.py): fp16 autocast + GradScaler on CUDA,
    # bf16 autocast on CPU; methods that do not train (PaDiM, PatchCore) are unaffected
    amp: bool = setting(False, bool)
    eval_batch_size: int = setting(32, POSITIVE_INT)
    # agnostic: the method sees only the test image | oracle: also the index of the step that taught its
    # category, for a task already taught (clbench.engine.evaluation)
    evaluation: str = setting("agnostic", Options("agnostic", "oracle"))
    # draw the run's plots when it ends (1.3-1.7 s for the quickstart's 6 tasks); false leaves them to `clbench plot` (sweep cells default to false)
    plots: bool = setting(True, bool)
    # defect test images per task whose anomaly maps are kept after every step (clbench.engine.probes: float16,
    # ~25 KB per image and step at 128 px) and drawn as plots/maps_<task>.png; 0: none (large sweeps)
    probe_maps: int = setting(2, Interval(int, 0, None))
    # experiment trackers mirroring the run (clbench.tracking): [] | [tensorboard] | [mlflow] | both; optional extras
    trackers: list[str] = setting([], list)
    # MLflow's tracking URI; null: a local file store, mlruns/ in the output directory
    tracking_uri: str | None = setting(None, [None, Text("a tracking URI")])
    epochs_scale: float = setting(1.0, POSITIVE)  # scales trainable methods' epochs (e.g. 0.1 for short runs)
    max_epochs: int | None = setting(None, [None, POSITIVE_INT])  # caps trainable methods' epochs
    # RAM for cached frozen-backbone features; spills to disk beyond
    feature_cache_gb: float = setting(4.0, NON_NEGATIVE)
    # RAM for decoded images (uint8 at the run's resolution; all of MVTec AD at 256 px is 1.05 GB): beyond
    # it the least recently used are dropped and decoded again when needed. Results do not depend on it
    image_cache_gb: float = setting(2.0, NON_NEGATIVE)
    # dtype cached backbone features are stored in (returned as float32): float16 halves the cache; scores
    # then move by < 1e-3 of their value, maps by < 1e-3 of their range (tests/test_feature_cache.py)
    feature_cache_dtype: str = setting("float32", Options("float32", "float16"))
    # threads decoding images (PIL) ahead of the method; null: min(4, CPUs) on CUDA, on the CPU only the cores
    # torch's threads leave spare (none on most machines); 0 or 1: in the main thread.
    # Results do not depend on it (clbench.data.ImageStore)
    decode_workers: int | None = setting(None, [None, Interval(int, 0, None)])
    # steps between checkpoints (the last step always writes one). A checkpoint holds the whole method
    # state (PaDiM WRN50-2 at 224 px: 1.54 GB, ~20 s with fsync here); a resume redoes the steps after
    # the last checkpoint, with the same results (each step is seeded by its index)
    checkpoint_every: int = setting(1, POSITIVE_INT)
    output_dir: str = setting("results", PATH)
    # run folder name; default <method>-<strategy>-<backbone>-seed<seed> (runner.default_run_name)
    name: str | None = setting(None, RUN_NAME)
    # set by `clbench reproduce`: {name, differences} (recorded in env.json)
    paper_profile: dict[str, Any] | None = setting(None, [None, dict])

    @property
    def eval_size(self) -> int:
        """The resolution methods see and are evaluated at: the crop if any, else ``image_size``."""
        return self.crop_size or self.image_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
CONSTRAINTS = field_constraints(RunConfig)
RULES = (
    Rule(("crop_size", "image_size"), lambda c: c["crop_size"] is None or c["crop_size"] <= c["image_size"],
         "crop_size <= image_size"),
)


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
    """Check every field against its declared constraint, then the rules between fields (the method's
    and strategy's own parameters: ``clbench.engine.validation.validate_run``)."""
    check_values({key: getattr(config, key) for key in _FIELDS}, CONSTRAINTS, RULES, source)
    return config


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
