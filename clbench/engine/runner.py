"""Run one experiment: a method learns the task stream step by step; after each step it is
evaluated on every task, memory is measured, results are written atomically and a checkpoint
is saved, so a killed run resumes from its last completed step with identical results.

The run folder: everything is validated (config, method and strategy constructed) before it is
created; one process at a time writes it (``clbench.engine.locks``); ``.clbench-run.json`` is written
into it first and is what ``--overwrite`` requires before deleting anything; the dataset's
fingerprint (``data_fingerprint.json``) and the checkpoint's own copy of the results let a resume
refuse, with one line, a changed dataset or damaged result files instead of mixing them in."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
import torch

from clbench.engine import atomic, memory
from clbench.features.backbones import WEIGHT_CHOICES, BackbonePool, random_init_message, resolve_weights
from clbench.engine.config import ConfigError, RunConfig, check_run_name, read_yaml_mapping
from clbench.data import Category, ImageStore, SampleSet, list_categories, load_category
from clbench.data.root import ensure_dataset  # noqa: F401  (also sweep's: generates before workers start)
from clbench.data.synth import MARKER as SYNTHETIC_MARKER  # noqa: F401
from clbench.engine.environment import environment_info
from clbench.engine.evaluation import evaluate_all
from clbench.metrics.forgetting import summarize, summarize_joint, undefined_tasks
from clbench.engine.locks import LOCK_NAME, check_unlocked, run_lock
from clbench.engine.tasks import resolve_tasks
from methods.base import METHODS, AnomalyMethod, MethodContext
from strategies.base import STRATEGIES, Experience, Strategy

log = logging.getLogger("clbench")

CHECKPOINT = "checkpoint.pt"
RUN_MARKER = ".clbench-run.json"  # written first into a run folder: what --overwrite may delete
FINGERPRINT = "data_fingerprint.json"  # the dataset's files at the start of the run: a resume compares it
WEIGHT_WORDS = tuple(WEIGHT_CHOICES)
SUMMARY_STATS = ("acc", "bwt", "fm", "relative_forgetting")
WRITTEN_FOLDERS = ("plots", "feature_cache")  # folders a run writes into inside its run folder
# Keys that may differ between a run and its resume (where and how fast, not what is computed).
# ``synthetic`` only says whether data may be generated (runs before auto|true|false saved true);
# the dataset fingerprint checked at resume is what keeps a resume on the run's data.
RESUME_FREE_KEYS = ("device", "feature_cache_gb", "output_dir", "eval_batch_size", "name", "synthetic")


def resolve_device(name: str) -> torch.device:
    """The torch device for ``device:`` (auto | cpu | cuda | cuda:N); anything else is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: '{name}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: '{name}' is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def check_pretrained(method_cls: type[AnomalyMethod], params: dict[str, Any], weights: str) -> None:
    """``require_pretrained``: refuse (one line) a method backbone whose weights resolve to random init.

    The backbones are those the method names in ``pretrained_backbones(params)``. Decided from the
    file system (``resolve_weights``)."""
    for name in method_cls.pretrained_backbones(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's random-init warning: the error below says it
            info = resolve_weights(name, weights)
        if not info.pretrained:
            raise ConfigError(random_init_message(name, info))


def _first_line(err: BaseException | str, limit: int = 200) -> str:
    """An exception's message cut to one line (torch's load errors run to paragraphs)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_problem(err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words (torch's own message is
    a paragraph that suggests the unsafe ``weights_only=False``)."""
    text = str(err)
    code = re.search(r"(?:GLOBAL|[Uu]nsupported globals?:) ([\w.]+)", text)
    if code:
        return f"it would import {code.group(1).rstrip('.')}: refused, loading it could run code"
    if isinstance(err, EOFError) or "central directory" in text or "zip archive" in text:
        return "empty, truncated or damaged"
    if isinstance(err, pickle.UnpicklingError) or "non-allowlisted" in text:
        return "not a torch file (or one holding more than tensors and plain data)"
    return _first_line(err, 100)


def _plain(value: Any) -> Any:
    """numpy scalars as Python values: a checkpoint must load with ``weights_only=True``."""
    return value.item() if isinstance(value, np.generic) else value


def check_param_types(method_cls: type[AnomalyMethod], given: Mapping[str, Any]) -> None:
    """A user-given method parameter must have its default's type (where the default has one).

    Catches ``--param batch_size=abc`` before anything is built or written; a parameter whose
    default is None (e.g. PaDiM's ``n_features``) is the method's to check. Sizes and epoch
    counts (``*batch_size``, ``*epochs``) must be positive."""
    for key, value in given.items():
        default = method_cls.hyperparameters.get(key)
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        elif isinstance(default, list):
            ok, kind = isinstance(value, list), "a list"
        else:
            continue
        if not ok:
            raise ConfigError(f"method_params: '{key}' of method '{method_cls.name}' must be {kind} "
                              f"(default {default!r}), got {value!r}")
        if key.endswith(("batch_size", "epochs")) and isinstance(value, int) and value <= 0:
            raise ConfigError(f"method_params: '{key}' of method '{method_cls.name}' must be positive, got {value!r}")


def default_run_name(method: str, strategy: str, backbone: str | None, seed: int) -> str:
    """``<method>-<strategy>-<backbone>-seed<seed>`` as one folder name (a backbone such as
    ``hf-hub:org/model`` keeps its '/' out of the path)."""
    name = f"{method}-{strategy}-{backbone or 'none'}-seed{seed}"
    return re.sub(r"[/\\\x00-\x1f\x7f]", "_", name)


def check_output_dir(output_dir: str) -> Path:
    """``output_dir`` must be (or be creatable as) a writable folder: checked before anything is
    created, so a wrong ``--output`` is one line, not a traceback half-way through a run."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a folder")
    existing = out
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"output_dir: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir: cannot create {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: cannot write in {existing} (permission denied)")
    return out


def read_checkpoint(path: Path, device: torch.device, n_steps: int) -> dict[str, Any]:
    """A checkpoint, loaded safely (``weights_only=True``: tensors and plain containers, never code)
    and checked to be one of this run's; any other file is one line naming it."""
    recover = "pass --overwrite to start again"
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as err:  # noqa: BLE001 - garbage, truncation, pickled code: the same fault to a user
        raise ConfigError(f"{path}: not a valid clbench checkpoint ({load_problem(err)}); {recover}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a clbench checkpoint (a {type(state).__name__}, not a mapping); {recover}")
    for key, kind in (("step", int), ("method", dict), ("strategy", dict)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ConfigError(f"{path}: not a clbench checkpoint ('{key}' missing or malformed); {recover}")
    if not 0 <= state["step"] < n_steps:
        raise ConfigError(f"{path}: checkpoint step {state['step']} is outside this run's 0..{n_steps - 1}; {recover}")
    if not isinstance(state.get("training", {}), dict):
        raise ConfigError(f"{path}: not a clbench checkpoint ('training' malformed); {recover}")
    return state


def dataset_fingerprint(root: Path, categories: list[Category]) -> dict[str, Any]:
    """What a run's data was: per category, every image and mask file it uses (path relative to
    the root, size, modification time). A resume compares it, so a run never mixes two datasets."""
    root = Path(root)
    fingerprint: dict[str, Any] = {"root": str(root.resolve()), "categories": {}}
    for category in categories:
        files: dict[str, list[int]] = {}
        for sample in category.train + category.val + category.test:
            for path in (sample.image, sample.mask):
                if path is not None:
                    stat = os.stat(path)
                    files[os.path.relpath(path, root)] = [stat.st_size, stat.st_mtime_ns]
        fingerprint["categories"][category.name] = dict(sorted(files.items()))
    return fingerprint


def fingerprint_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first file that differs between two fingerprints, in words (None if they agree)."""
    old_categories, new_categories = old.get("categories") or {}, new.get("categories") or {}
    for name in sorted(set(old_categories) | set(new_categories)):
        before, after = old_categories.get(name), new_categories.get(name)
        if before is None or after is None:
            return f"category '{name}' {'added' if before is None else 'removed'}"
        for rel in sorted(set(before) | set(after)):
            was, now = before.get(rel), after.get(rel)
            if was is None:
                return f"{rel} added"
            if now is None:
                return f"{rel} removed"
            if list(was) != list(now):
                return f"{rel} changed (size {was[0]} -> {now[0]} bytes)" if was[0] != now[0] else f"{rel} modified"
    return None


@dataclass
class Results:
    """Tidy rows of a run, rewritten atomically after every step.

    The checkpoint carries the rows too (plain values), so a resume continues from exactly what
    the completed steps produced and can check the CSVs on disk against them."""

    run_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)

    FILES = {"metrics": "metrics.csv", "memory": "memory.csv", "timings": "timings.csv", "training": "training.csv"}
    COLUMNS = {
        "metrics": ["step", "trained_task", "eval_task", "metric", "value"],
        "memory": ["step", "trained_task", "component", "bytes"],
        "timings": ["step", "phase", "seconds", "images", "images_per_s"],
        "training": ["step", "trained_task", "key", "value"],
    }
    TEXT_COLUMNS = ("trained_task", "eval_task", "metric", "component", "phase", "key")

    def frame(self, kind: str) -> pd.DataFrame:
        return pd.DataFrame(getattr(self, kind), columns=self.COLUMNS[kind])

    def save(self) -> None:
        for kind, filename in self.FILES.items():
            atomic.write_csv(self.run_dir / filename, self.frame(kind))

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Every row as plain Python values (what ``torch.load(weights_only=True)`` reads back)."""
        return {kind: [{k: _plain(v) for k, v in row.items()} for row in getattr(self, kind)] for kind in self.FILES}

    def restore(self, rows: Any, checkpoint: Path) -> None:
        """Rows saved in a checkpoint by ``rows()``, each checked against its CSV file on disk."""
        if not isinstance(rows, dict) or any(not isinstance(rows.get(kind), list) for kind in self.FILES):
            raise ConfigError(f"{checkpoint}: not a clbench checkpoint (its results are malformed); "
                              "pass --overwrite to start again")
        for kind, filename in self.FILES.items():
            setattr(self, kind, list(rows[kind]))
            self._check_file(kind, self.run_dir / filename, checkpoint)

    def _check_file(self, kind: str, path: Path, checkpoint: Path) -> None:
        """The file must begin with exactly what was written at the checkpoint's step (a kill before
        the next checkpoint may have appended that step's rows after it)."""
        expected = self.frame(kind).to_csv(index=False, float_format=atomic.CSV_FLOAT_FORMAT).encode()
        try:
            with open(path, "rb") as handle:
                found = handle.read(len(expected))
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing, but {checkpoint.name} holds results up to its step; "
                              "restore the file or pass --overwrite to start again") from None
        if found != expected:
            raise ConfigError(f"{path}: does not match {checkpoint.name} (truncated, older or edited); "
                              "restore the file or pass --overwrite to start again")

    def load_csv(self, completed_step: int, checkpoint: Path, tasks: list[str]) -> None:
        """Rows of steps up to ``completed_step`` from the CSVs, for a checkpoint written before
        checkpoints carried their rows; every completed step must be there, each with the same
        (task, metric) rows (a value cut short mid-number cannot be told from these files)."""
        for kind, filename in self.FILES.items():
            path = self.run_dir / filename
            if not path.is_file():
                if kind == "metrics":
                    raise ConfigError(f"{path}: missing, but {checkpoint.name} is after step {completed_step}; "
                                      "pass --overwrite to start again")
                continue
            frame = self._read_csv(kind, path)
            frame = frame[frame["step"] <= completed_step]
            if kind == "metrics":
                self._check_metric_rows(frame, path, completed_step, checkpoint, tasks)
            setattr(self, kind, frame.to_dict("records"))

    @staticmethod
    def _check_metric_rows(frame: pd.DataFrame, path: Path, completed_step: int, checkpoint: Path,
                           tasks: list[str]) -> None:
        steps = set(frame["step"])
        if steps != set(range(completed_step + 1)):
            raise ConfigError(f"{path}: has results for {len(steps)} step(s) but {checkpoint.name} is after step "
                              f"{completed_step} (truncated or edited); pass --overwrite to start again")
        pairs = [set(zip(group["eval_task"], group["metric"])) for _, group in frame.groupby("step")]
        if any(p != pairs[0] for p in pairs) or {task for task, _ in pairs[0]} != set(tasks):
            raise ConfigError(f"{path}: rows missing or cut short (truncated or edited); pass --overwrite to start again")

    def _read_csv(self, kind: str, path: Path) -> pd.DataFrame:
        """A results CSV with its own columns and a numeric step (names stay text: '01' is not 1)."""
        columns = self.COLUMNS[kind]
        text = {c: str for c in columns if c in self.TEXT_COLUMNS}
        try:
            frame = pd.read_csv(path, dtype=text, keep_default_na=False,
                                na_values={c: ["", "nan", "NaN"] for c in columns if c not in text})
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
            raise ConfigError(f"{path}: unreadable ({_first_line(err)}); pass --overwrite to start again") from None
        numeric = [c for c in columns if c not in text and not (kind == "training" and c == "value")] if len(frame) else []
        if list(frame.columns) != columns or any(not pd.api.types.is_numeric_dtype(frame[c]) for c in numeric) \
                or frame["step"].isna().any():
            raise ConfigError(f"{path}: not a clbench {kind} file, or truncated mid-line; "
                              "pass --overwrite to start again")
        frame["step"] = frame["step"].astype(int)
        return frame

    def matrix(self, metric: str, tasks: list[str]) -> np.ndarray:
        frame = pd.DataFrame(self.metrics)
        frame = frame[frame["metric"] == metric]
        table = frame.pivot_table(index="step", columns="eval_task", values="value", aggfunc="first", dropna=False)
        return table.reindex(columns=tasks).to_numpy(dtype=float)


class Experiment:
    """One run: config -> data, method, strategy -> steps -> results in ``run_dir``.

    Everything that can be checked is checked before the run folder is touched: the config here,
    the method and strategy by constructing them (``run`` builds them before it creates the
    folder). A fresh run folder this invocation created is removed again if the run fails before
    its first checkpoint, so a corrected command never meets a stale ``config.yaml``."""

    def __init__(self, config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> None:
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.device = resolve_device(config.device)
        self.method_cls = METHODS.get(config.method)
        self.strategy_cls = STRATEGIES.get(config.strategy)
        method_params = dict(config.method_params)
        if config.backbone is not None:
            if "backbone" not in self.method_cls.hyperparameters:
                raise ConfigError(f"backbone: method '{config.method}' takes no backbone")
            method_params["backbone"] = config.backbone
        self.method_params = self.method_cls.resolve_params(method_params)
        check_param_types(self.method_cls, config.method_params)
        name = config.name or default_run_name(config.method, config.strategy, self.method_params.get("backbone"), config.seed)
        check_run_name(name, "name: the run name")
        self.output_dir = check_output_dir(config.output_dir)
        self.run_dir = self.output_dir / name
        if config.require_pretrained:
            check_pretrained(self.method_cls, self.method_params, config.weights)
        root = ensure_dataset(config)
        self.data_root = Path(root)
        self.tasks = resolve_tasks(config.tasks, list_categories(root), config.task_order, config.seed)
        self.categories: list[Category] = [
            load_category(root, name, config.val_fraction, config.seed) for name in self.tasks
        ]
        self.resolved = config.to_dict() | {
            "tasks": list(self.tasks),
            "method_params": self.method_params,
            "backbone": self.method_params.get("backbone"),
            "strategy_params": {**self.strategy_cls.hyperparameters, **config.strategy_params},
            "name": name,
        }
        self._checkpointed = False  # a checkpoint was written in this invocation
        self._started = False  # this invocation started the folder afresh (new or overwritten)

    # -- the run folder ------------------------------------------------------------------------
    def _plan(self) -> str:
        """What to do with the run folder: 'fresh', 'resume' or 'overwrite'. Refuses (one line)
        what may not be touched; creates nothing."""
        folder = self.run_dir
        if folder.is_symlink() and (self.overwrite or not folder.is_dir()):  # deleting or creating through a link
            raise ConfigError(f"{folder}: is a symbolic link; clbench deletes or creates only real run folders inside "
                              f"{self.output_dir}: remove the link yourself or choose another --name")
        if not folder.exists():
            return "fresh"
        if not folder.is_dir():
            raise ConfigError(f"{folder}: exists and is not a folder; choose another --name or --output")
        check_unlocked(folder)
        if (folder / "config.yaml").is_file():
            if self.overwrite:
                self._check_deletable(folder)
                return "overwrite"
            if not self.resume:
                raise FileExistsError(f"{folder}: run folder exists; pass --resume to continue it or --overwrite to start again")
            return "resume"
        foreign = sorted(name for name in os.listdir(folder) if not _own_leftover(name))
        if foreign:
            raise ConfigError(f"{folder}: exists and is not a clbench run folder (it holds '{foreign[0]}'); "
                              "choose another --name or --output")
        return "fresh"

    def _check_deletable(self, folder: Path) -> None:
        """``--overwrite`` deletes a folder only if clbench made it: a real folder directly inside
        the output folder, holding both the run marker and ``config.yaml``."""
        inside = folder.resolve().parent == self.output_dir.resolve() and not folder.is_symlink()
        if not inside or not (folder / RUN_MARKER).is_file():
            raise ConfigError(f"{folder}: not recognisably a clbench run folder (no {RUN_MARKER}); --overwrite "
                              "deletes only folders clbench created: delete it yourself or choose another --name")

    def _open_run_dir(self, results: Results) -> dict[str, Any] | None:
        """Under the folder's lock: start, clear or reopen it; returns the checkpoint to resume from
        (its results already restored into ``results`` and checked against the files)."""
        plan = self._plan()  # again, now that no other process can change the folder
        for name in WRITTEN_FOLDERS if plan == "resume" else ():  # a link: writes and clean-up outside the folder
            if (self.run_dir / name).is_symlink():
                raise ConfigError(f"{self.run_dir / name}: is a symbolic link; clbench writes only inside its run "
                                  "folder: remove the link, or pass --overwrite to start again")
        removed = atomic.remove_leftovers(self.run_dir) + atomic.remove_leftovers(self.run_dir / "plots")
        if removed:
            log.info("removed %d temporary file(s) left by a killed write in %s", len(removed), self.run_dir)
        if plan == "resume":
            return self._reopen(results)
        self._started = True  # from here on the folder holds only what this run writes
        if plan == "overwrite":
            _clear_folder(self.run_dir)
        self._start_fresh()
        return None

    def _start_fresh(self) -> None:
        """The marker first (it is what makes the folder recognisably clbench's), then the config
        and the dataset's fingerprint."""
        atomic.write_json(self.run_dir / RUN_MARKER, {"clbench": "run folder", "name": self.resolved["name"],
                                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        atomic.write_yaml(self.run_dir / "config.yaml", self.resolved)
        atomic.write_json(self.run_dir / FINGERPRINT, dataset_fingerprint(self.data_root, self.categories))

    def _reopen(self, results: Results) -> dict[str, Any] | None:
        """A resume: the saved config must match, and the checkpoint, the dataset and the result
        files must be what the completed steps left; anything else is refused with one line (and
        nothing is written before every check has passed)."""
        self._check_saved_config()
        legacy = not (self.run_dir / RUN_MARKER).is_file()  # made before run folders were marked
        checkpoint = self.run_dir / CHECKPOINT
        current = dataset_fingerprint(self.data_root, self.categories)
        state = None
        if checkpoint.is_file():
            self._check_dataset(current, legacy)
            state = read_checkpoint(checkpoint, self.device, self._n_steps)
            if "results" in state:
                results.restore(state["results"], checkpoint)
            else:  # written before checkpoints carried their rows
                results.load_csv(state["step"], checkpoint, self.tasks)
        elif (self.run_dir / "summary.json").is_file():
            raise ConfigError(f"{checkpoint}: missing, but the run has a summary.json; pass --overwrite to start again")
        if legacy:  # its config matched: it is a clbench run
            atomic.write_json(self.run_dir / RUN_MARKER, {"clbench": "run folder", "name": self.resolved["name"]})
        if state is None or not (self.run_dir / FINGERPRINT).is_file():  # nothing completed yet, or a legacy run
            atomic.write_json(self.run_dir / FINGERPRINT, current)
        return state

    def _check_saved_config(self) -> None:
        config_path = self.run_dir / "config.yaml"
        try:
            saved = read_yaml_mapping(config_path, "not a run config")
        except ConfigError as err:
            raise ConfigError(f"{err}; pass --overwrite to start again") from None
        defaults = RunConfig().to_dict()  # a key added since the run started counts as its default
        for key, value in self.resolved.items():
            if key not in RESUME_FREE_KEYS and saved.get(key, defaults.get(key)) != value:
                raise ConfigError(
                    f"{config_path}: cannot resume, '{key}' was {saved.get(key, defaults.get(key))!r} and is now {value!r}"
                )

    def _check_dataset(self, current: dict[str, Any], legacy: bool) -> None:
        """The dataset must be the one the run started on (its fingerprint, file by file)."""
        path = self.run_dir / FINGERPRINT
        if not path.is_file():
            if not legacy:
                raise ConfigError(f"{path}: missing, so the dataset cannot be checked for changes; "
                                  "pass --overwrite to start again")
            log.warning("warning: %s has no dataset fingerprint (made by an older clbench); resuming unchecked", self.run_dir)
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: unreadable ({_first_line(err)}); pass --overwrite to start again") from None
        difference = fingerprint_difference(saved if isinstance(saved, dict) else {}, current)
        if difference is not None:
            raise ConfigError(f"{self.data_root}: the dataset changed since the run started: {difference}; resuming "
                              "would mix results of two datasets: restore it, or pass --overwrite to start again")

    def _build(self) -> tuple[AnomalyMethod, Strategy, ImageStore, BackbonePool]:
        """Construct the method and strategy (their own checks run here, before any folder exists)."""
        torch.manual_seed(self.config.seed)
        pool = BackbonePool(
            self.config.weights,
            self.device,
            self.config.seed,
            cache_bytes=int(self.config.feature_cache_gb * (1 << 30)),
            spill_dir=self.run_dir / "feature_cache",
            require_pretrained=self.config.require_pretrained,
        )
        context = MethodContext(
            pool, self.device, self.config.eval_size, self.config.seed, self.progress,
            epochs_scale=self.config.epochs_scale, max_epochs=self.config.max_epochs,
            require_pretrained=self.config.require_pretrained,
        )
        with self._construction("method_params", self.config.method_params):
            method = self.method_cls(context, **self.method_params).to(self.device)
        with self._construction("strategy_params", self.config.strategy_params):
            strategy = self.strategy_cls(seed=self.config.seed, **self.config.strategy_params)
        strategy.progress = self.progress
        return method, strategy, ImageStore(self.config.image_size, self.config.crop_size), pool

    @contextlib.contextmanager
    def _construction(self, key: str, given: Mapping[str, Any]) -> Iterator[None]:
        """One line for what the user's values make a constructor raise: a wrong type (``--param
        n_features=abc``: a TypeError deep inside) or a weights file timm cannot load. Without
        user values, or for other errors, the exception (a bug) goes through unchanged."""
        try:
            yield
        except TypeError as err:
            if not given:
                raise
            values = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ConfigError(f"{key}: {values} rejected ({_first_line(err)}); check the values' types") from err
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
            weights = Path(self.config.weights).expanduser()
            if self.config.weights in WEIGHT_WORDS or not weights.is_file():
                raise
            raise ConfigError(f"weights: {weights}: not a weights file for this backbone ({load_problem(err)})") from err

    def _samples(self, names: tuple[str, ...], store: ImageStore, split: str) -> SampleSet:
        by_name = {c.name: c for c in self.categories}
        samples: tuple = ()
        for name in names:
            samples += getattr(by_name[name], split)
        return SampleSet(samples, store)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        self._plan()  # refuse early what may not be touched, before the (possibly slow) build
        method, strategy, store, pool = self._build()
        experiences = strategy.experiences(self.tasks)
        self._n_steps = len(experiences)
        created = not self.run_dir.exists()
        with run_lock(self.run_dir):
            try:
                results = Results(self.run_dir)
                state = self._open_run_dir(results)
                self._run(state, experiences, method, strategy, store, pool, results)
            except BaseException:
                self._discard_unfinished(created)
                raise
        return self.run_dir

    def _discard_unfinished(self, created: bool) -> None:
        """After a failure before the first checkpoint of a run started here: remove what it wrote
        (the folder itself if this invocation created it), so the corrected command starts cleanly.
        A resumed folder, or one with a completed step, is left as it is."""
        if self._checkpointed or not self._started:  # not started here: another run's, or a resumed one
            return
        if created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:  # it held only clbench's lock and leftovers before: everything in it is this run's
            _clear_folder(self.run_dir)

    def _run(self, state: dict[str, Any] | None, experiences: list[Experience], method, strategy, store, pool,
             results: Results) -> None:
        completed = -1
        if state is not None:
            completed = int(state["step"])
            self._restore(state, method, strategy)
            log.info("resuming %s after step %d", self.run_dir, completed)
            del state
        atomic.write_json(self.run_dir / "env.json", environment_info(self.config, self.device, pool, self.categories))
        for experience in experiences:
            if experience.step <= completed:
                continue
            self._step(experience, method, strategy, store, pool, results)
        summary = self.summary(results, experiences, pool)
        atomic.write_json(self.run_dir / "summary.json", summary)
        shutil.rmtree(self.run_dir / "feature_cache", ignore_errors=True)
        self._plots()
        warn_undefined(summary)

    def _restore(self, state: dict[str, Any], method: AnomalyMethod, strategy: Strategy) -> None:
        """Load a checked checkpoint into the method and the strategy."""
        try:
            method.load_method_state(state["method"])
            method.load_training_state(state.get("training", {}))
            strategy.load_state_dict(state["strategy"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise ConfigError(f"{self.run_dir / CHECKPOINT}: does not fit this run's method or strategy "
                              f"({_first_line(err)}); pass --overwrite to start again") from None

    def _step(self, experience: Experience, method, strategy, store, pool, results: Results) -> None:
        step, label = experience.step, experience.label
        memory.reset_peaks(self.device)
        forwarded = sum(b.images_forwarded for b in pool.backbones)
        forward_seconds = sum(b.forward_seconds for b in pool.backbones)
        current = self._samples(experience.task_names, store, "train")
        val = self._samples(experience.task_names, store, "val")
        torch.manual_seed(self.config.seed * 1_000_003 + step)
        method.train()
        start = time.perf_counter()
        strategy.train(method, experience, current, val)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        evaluation = evaluate_all(method, self.categories, store, self.config.eval_batch_size, self.progress)
        eval_seconds = time.perf_counter() - start

        for task, values in evaluation.items():
            for metric, value in values.items():
                results.metrics.append(dict(step=step, trained_task=label, eval_task=task, metric=metric, value=value))
        for key, value in method.fit_info.items():
            results.training.append(dict(step=step, trained_task=label, key=key, value=value))
        components = method.memory_components() | strategy.memory_components() | memory.peak_components(self.device)
        for component, size in components.items():
            results.memory.append(dict(step=step, trained_task=label, component=component, bytes=int(size)))
        n_test = sum(len(c.test) for c in self.categories)
        forwarded = sum(b.images_forwarded for b in pool.backbones) - forwarded
        forward_seconds = sum(b.forward_seconds for b in pool.backbones) - forward_seconds
        for phase, seconds, images in (
            ("train", train_seconds, len(current)),
            ("evaluate", eval_seconds, n_test),
            ("backbone_forward", forward_seconds, forwarded),
        ):
            rate = images / seconds if seconds > 0 else float("nan")
            results.timings.append(dict(step=step, phase=phase, seconds=seconds, images=images, images_per_s=rate))
        results.save()
        self._checkpoint(step, method, strategy, results)
        pixel = {task: round(v["pixel_auroc"], 3) for task, v in evaluation.items()}
        log.info("step %d (%s): train %.1fs, eval %.1fs, pixel AUROC %s", step, label, train_seconds, eval_seconds, pixel)

    def _checkpoint(self, step: int, method: AnomalyMethod, strategy: Strategy, results: Results) -> None:
        """The state after ``step``, with the results' rows (a resume restores and checks them)."""
        state = {"step": step, "method": method.state_dict(), "training": method.training_state(),
                 "strategy": strategy.state_dict(), "results": results.rows()}
        path = self.run_dir / CHECKPOINT
        try:
            atomic.write_with(path, lambda tmp: torch.save(state, tmp))
        except RuntimeError as err:  # torch's writer reports a full disk or a file-size limit so
            raise OSError(f"{path}: cannot write the checkpoint ({_first_line(err, 80)}): disk full or file-size "
                          "limit reached? The steps completed before are kept: free space, then run again "
                          "with --resume") from err
        self._checkpointed = True

    # -- summary -------------------------------------------------------------------------------
    def summary(self, results: Results, experiences: list[Experience], pool: BackbonePool) -> dict[str, Any]:
        metrics = sorted({row["metric"] for row in results.metrics})
        joint = len(experiences) == 1 and len(self.tasks) > 1
        steps = {int(row["step"]) for row in results.metrics}
        if steps != set(range(len(experiences))):  # never a "complete" summary over missing steps
            raise ConfigError(f"{self.run_dir / 'metrics.csv'}: results for steps {sorted(steps)} of "
                              f"0..{len(experiences) - 1}; summary.json not written")
        summary: dict[str, Any] = {"complete": True, "steps": len(experiences), "tasks": self.tasks, "metrics": {}}
        for metric in metrics:
            R = results.matrix(metric, self.tasks)
            stats = summarize_joint(R[-1]) if joint else summarize(R)
            stats["final"] = dict(zip(self.tasks, R[-1].tolist()))
            undefined = [self.tasks[j] for j in undefined_tasks(R)]
            if undefined:  # the stats above are NaN (null in JSON), never a mean over fewer tasks
                stats["undefined_tasks"] = undefined
            summary["metrics"][metric] = stats
        distinct = {s.key for c in self.categories for s in c.train + c.val + c.test}
        summary["distinct_images"] = len(distinct)
        summary["backbone_forward_images"] = int(
            sum(r["images"] for r in results.timings if r["phase"] == "backbone_forward")
        )
        return summary

    def _plots(self) -> None:
        from clbench.reporting.plots import plot_run

        plot_run(self.run_dir, metrics=("pixel_auroc", "image_auroc"))


def _own_leftover(name: str) -> bool:
    """Entries clbench may find in a run folder before its config exists (lock, marker, temp files)."""
    return name in (LOCK_NAME, RUN_MARKER) or atomic.TEMP_PATTERN.match(name) is not None


def _clear_folder(folder: Path) -> None:
    """Empty a run folder for ``--overwrite``, keeping the lock this process holds on it; symbolic
    links inside are removed, never followed."""
    for entry in os.scandir(folder):
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def warn_undefined(summary: Mapping[str, Any]) -> None:
    """One warning line per metric that is undefined (NaN) for some task: its summary values are
    null rather than a mean over fewer tasks than the run has."""
    for metric, stats in (summary.get("metrics") or {}).items():
        undefined = stats.get("undefined_tasks") or []
        if undefined:
            null = [key for key in SUMMARY_STATS if not isinstance(stats.get(key), float) or math.isnan(stats[key])]
            log.warning("warning: %s is undefined (NaN) for task(s) %s; in summary.json its %s %s null", metric,
                        ", ".join(repr(t) for t in undefined), ", ".join(null), "is" if len(null) == 1 else "are")


def run_experiment(config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    return Experiment(config, resume=resume, overwrite=overwrite, progress=progress).run()
