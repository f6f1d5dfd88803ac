"""A run folder, owned in one place: every file name, the atomic writers, the readers, the
accuracy-matrix pivot, the checkpoint and the marker.

Runner, sweep, report, plots and the CLI all reach a run's files through ``RunFolder`` (and a run's
result tables through ``Results``), so a file is named once and read one way. The layout (README,
"Results")::

    config.yaml  env.json  metrics.csv  memory.csv  timings.csv  training.csv  summary.json
    plots/  checkpoint.pt  data_fingerprint.json  .clbench-run.json (marker)  .lock
    feature_cache/ (while a run spills features; removed at its end)

Readers come in the strictness their callers need, each with its own one-line errors:
``table`` (plots: a last row cut mid-line is dropped with a warning, ValueError otherwise),
``read_checked_csv`` (the report: a complete run's file must be whole, ``RunFileDamaged``) and
``Results`` (a resume: the tables must begin with exactly what the checkpoint holds, ConfigError).
``config`` / ``env`` / ``summary`` never raise: a missing, unreadable or non-mapping file is ``{}``.

pandas and torch are imported only inside the functions that need them: the CLI imports this
module on start (``clbench sweep`` and ``report`` decide completion with it)."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import yaml

from clbench.engine import atomic
from clbench.engine.config import ConfigError, read_yaml_mapping
from clbench.engine.locks import LOCK_NAME

if TYPE_CHECKING:
    import pandas as pd
    import torch

CONFIG = "config.yaml"
ENV = "env.json"
SUMMARY = "summary.json"
PLOTS = "plots"
CHECKPOINT = "checkpoint.pt"
FINGERPRINT = "data_fingerprint.json"  # the dataset's files at the start of the run: a resume compares it
MARKER = ".clbench-run.json"  # written first into a run folder: what --overwrite may delete
LOCK = LOCK_NAME  # held while a process writes the folder (``clbench.engine.locks``)
FEATURE_CACHE = "feature_cache"  # spilled backbone features during a run
PROBE_MAPS = "probe_maps"  # the probe images' maps after every step (clbench.engine.probes)
PANEL_GLOB = "maps_*.png"  # the panels drawn from them in a plots folder (clbench.reporting.probe_plots)
TENSORBOARD = "tensorboard"  # event files of the TensorBoard tracker (clbench.tracking.tensorboard)
TRACKERS_STATE = "trackers.json"  # what each tracker logged last, and its ids (clbench.tracking)
WRITTEN_FOLDERS = (PLOTS, FEATURE_CACHE, PROBE_MAPS, TENSORBOARD)  # folders a run writes into inside its run folder


@dataclass(frozen=True)
class Table:
    """A tidy result table: its file and its columns, in order."""

    file: str
    columns: tuple[str, ...]


TABLES: dict[str, Table] = {
    "metrics": Table("metrics.csv", ("step", "trained_task", "eval_task", "metric", "value")),
    "memory": Table("memory.csv", ("step", "trained_task", "component", "bytes")),
    "timings": Table("timings.csv", ("step", "phase", "seconds", "images", "images_per_s")),
    # one row per fit_info key (epoch empty) and per key of each epoch of method.epoch_log
    "training": Table("training.csv", ("step", "trained_task", "epoch", "key", "value")),
}
LEGACY_TRAINING_COLUMNS = ("step", "trained_task", "key", "value")  # before per-epoch rows: resumed compatibly
TEXT_COLUMNS = ("trained_task", "eval_task", "metric", "component", "phase", "key")  # names stay text: '01' is not 1
NAN_TEXT = ("", "nan", "NaN")  # how pandas writes a NaN (an undefined metric is legitimate)
RECOVER = "pass --overwrite to start again"


class RunFileDamaged(Exception):
    """One line (naming the file by its name): what is wrong with a complete run's result file."""


# --------------------------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------------------------
def first_line(err: BaseException | str, limit: int = 200) -> str:
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
    return first_line(err, 100)


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _plain(value: Any) -> Any:
    """numpy scalars as Python values: a checkpoint must load with ``weights_only=True``."""
    import numpy as np  # here, not at the top: ``clbench --help`` and ``report --help`` need no numpy

    return value.item() if isinstance(value, np.generic) else value


def read_mapping(path: Path, parse: Callable[[str], Any] = json.loads,
                 on_error: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A JSON or YAML mapping (``parse``), or ``{}``: missing, unreadable, invalid or not a mapping.
    ``on_error`` hears one line for a file that exists but cannot be read."""
    if not path.is_file():
        return {}
    try:
        data = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        if on_error is not None:
            on_error(f"{path}: unreadable ({_reason(err)})")
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------
# reading tables
# --------------------------------------------------------------------------------------------
def read_csv(path: str | Path, columns: Sequence[str]) -> "pd.DataFrame":
    """``pd.read_csv`` with the name columns kept as text, exactly as written: categories named
    ``01``/``02`` (BTAD) stay strings, and a category named ``NA`` is not a missing value."""
    import pandas as pd

    text = {c: str for c in columns if c in TEXT_COLUMNS}
    return pd.read_csv(path, dtype=text, keep_default_na=False,
                       na_values={c: list(NAN_TEXT) for c in columns if c not in text})


def read_run_csv(path: Path, columns: Sequence[str]) -> "pd.DataFrame":
    """A CSV a run wrote, tolerantly (plots of a run in progress), or one ValueError naming the
    file: unreadable, not the expected columns, or steps that are not whole numbers. A last row
    cut mid-line (a damaged copy) is dropped, with a warning."""
    import warnings

    import pandas as pd

    try:
        raw = path.read_bytes()
        frame = read_csv(path, columns)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({_reason(err)})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column '{missing[0]}' (not a clbench {path.name})")
    if raw and not raw.endswith(b"\n") and len(frame):
        warnings.warn(f"{path}: ends in the middle of a row (truncated); that row is left out", stacklevel=5)
        frame = frame.iloc[:-1]
    if pd.to_numeric(frame["step"], errors="coerce").isna().any():
        raise ValueError(f"{path}: a step that is not a number")
    return frame


def read_checked_csv(path: Path, columns: Sequence[str]) -> "pd.DataFrame":
    """A complete run's CSV, strictly (the report): complete lines, the expected columns, integer
    steps, numbers in the last column; anything else is ``RunFileDamaged``. Read as text first: a
    task named "NA" or "null" stays a name, not a NaN."""
    import io

    import pandas as pd

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RunFileDamaged(f"{path.name} is missing") from None
    except OSError as err:
        raise RunFileDamaged(f"{path.name} is unreadable ({err.strerror or err})") from None
    if not raw.strip():
        raise RunFileDamaged(f"{path.name} is empty")
    if not raw.endswith(b"\n"):
        raise RunFileDamaged(f"{path.name} ends in the middle of a row (truncated)")
    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError is a ValueError
        raise RunFileDamaged(f"{path.name} is unreadable ({_reason(err)})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RunFileDamaged(f"{path.name} has no column '{missing[0]}' (a different clbench format?)")
    step = pd.to_numeric(frame["step"], errors="coerce")
    bad = frame.index[step.isna() | (step % 1 != 0)]
    if len(bad):
        raise RunFileDamaged(f"{path.name} line {int(bad[0]) + 2}: step {frame['step'].iloc[bad[0]]!r} is not a whole number")
    frame["step"] = step.astype(int)
    number = columns[-1]
    values = pd.to_numeric(frame[number].where(~frame[number].isin(NAN_TEXT)), errors="coerce")
    bad = frame.index[values.isna() & ~frame[number].isin(NAN_TEXT)]
    if len(bad):
        raise RunFileDamaged(f"{path.name} line {int(bad[0]) + 2}: {number} {frame[number].iloc[bad[0]]!r} is not a number")
    frame[number] = values.astype(float)
    return frame


# --------------------------------------------------------------------------------------------
# the accuracy matrix (the one pivot: summary.json, the printed matrix, the plots)
# --------------------------------------------------------------------------------------------
def numeric(values: "pd.Series") -> "pd.Series":
    """Coerce to float so stray strings ("nan", "") become NaN instead of crashing."""
    import pandas as pd

    return pd.to_numeric(values, errors="coerce").astype(float)


def step_labels(frame: "pd.DataFrame") -> "pd.Series":
    """Map step -> 'step k: <trained_task>' (first trained_task seen for that step)."""
    import pandas as pd

    first = frame.sort_values("step", kind="stable").groupby("step", sort=True)["trained_task"].first()
    return pd.Series({int(s): f"step {int(s)}: {t}" for s, t in first.items()})


def _ordered_tasks(seen: Sequence[str], tasks: Sequence[str] | None) -> list[str]:
    """Stream order: given tasks first (all of them), then any unexpected extras."""
    if tasks is None:
        return list(dict.fromkeys(seen))
    ordered = list(dict.fromkeys(tasks))
    return ordered + [t for t in dict.fromkeys(seen) if t not in ordered]


def accuracy_matrix(metrics: "pd.DataFrame", metric: str = "pixel_auroc",
                    tasks: Sequence[str] | None = None) -> "pd.DataFrame":
    """R[step, task] of one metric from tidy metrics rows: rows = steps in order (labelled
    'step k: <trained_task>'), columns = eval tasks in stream order.

    Columns follow ``tasks`` if given (tasks never evaluated become NaN columns, unexpected ones
    follow), else the order of first appearance of ``eval_task``. A run writes exactly one value per
    (step, eval_task, metric); should a frame hold several, they are averaged (NaN ones skipped).
    The mean of one value is that value bit for bit, so summary.json (which took the first value),
    the printed matrix and the plots (which averaged) are all unchanged. Raises ValueError if
    ``metric`` does not occur, listing the metrics that do."""
    sel = metrics[metrics["metric"] == metric].copy()
    if sel.empty:
        available = sorted(metrics["metric"].dropna().unique().tolist())
        raise ValueError(f"metric {metric!r} not in metrics (available: {available})")
    sel["step"] = sel["step"].astype(int)
    sel["value"] = numeric(sel["value"])
    wide = sel.groupby(["step", "eval_task"], sort=True)["value"].mean().unstack("eval_task")
    wide = wide.reindex(columns=_ordered_tasks(sel["eval_task"].tolist(), tasks))
    labels = step_labels(sel)
    wide.index = [labels[int(s)] for s in wide.index]
    wide.index.name = "step"
    wide.columns.name = "eval_task"
    return wide


# --------------------------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------------------------
class RunFolder:
    """One run folder: where each file is, how it is read and written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- paths ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def env_path(self) -> Path:
        return self.path / ENV

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def fingerprint_path(self) -> Path:
        return self.path / FINGERPRINT

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS

    @property
    def feature_cache_dir(self) -> Path:
        return self.path / FEATURE_CACHE

    def csv_path(self, kind: str) -> Path:
        """The file of a result table: ``metrics``, ``memory``, ``timings`` or ``training``."""
        return self.path / TABLES[kind].file

    # -- state ---------------------------------------------------------------------------------
    def is_started(self) -> bool:
        """A run wrote its config here (a resume continues it)."""
        return self.config_path.is_file()

    def is_complete(self) -> bool:
        """The run finished: its ``summary.json`` says ``complete: true`` (it is written last)."""
        return self.summary().get("complete") is True

    def has_marker(self) -> bool:
        return self.marker_path.is_file()

    @staticmethod
    def is_own_leftover(name: str) -> bool:
        """Entries clbench may find in a run folder before its config exists (lock, marker, temp files)."""
        return name in (LOCK, MARKER) or atomic.TEMP_PATTERN.match(name) is not None

    def foreign_entries(self) -> list[str]:
        """Names in the folder that are not clbench's leftovers, sorted."""
        return sorted(name for name in os.listdir(self.path) if not self.is_own_leftover(name))

    # -- mappings ------------------------------------------------------------------------------
    def config(self, on_error: Callable[[str], None] | None = None) -> dict[str, Any]:
        """``config.yaml``: ``{}`` if missing, unreadable or not a mapping; ``on_error`` hears one line
        for a file that exists but cannot be read."""
        return read_mapping(self.config_path, yaml.safe_load, on_error)

    def env(self, on_error: Callable[[str], None] | None = None) -> dict[str, Any]:
        return read_mapping(self.env_path, json.loads, on_error)

    def summary(self, on_error: Callable[[str], None] | None = None) -> dict[str, Any]:
        return read_mapping(self.summary_path, json.loads, on_error)

    def checked_config(self) -> dict[str, Any]:
        """``config.yaml`` for a resume: anything but a mapping is one ConfigError naming the file."""
        return read_yaml_mapping(self.config_path, "not a run config")

    def saved_fingerprint(self) -> dict[str, Any] | None:
        """The dataset fingerprint the run started with (None if the file is missing)."""
        path = self.fingerprint_path
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: unreadable ({first_line(err)}); {RECOVER}") from None
        return saved if isinstance(saved, dict) else {}

    # -- tables --------------------------------------------------------------------------------
    def read_csv(self, kind: str) -> "pd.DataFrame":
        """A result table as written (names as text), unchecked; pandas' and the OS's errors pass."""
        return read_csv(self.csv_path(kind), TABLES[kind].columns)

    def table(self, kind: str) -> "pd.DataFrame":
        """A result table, tolerantly (``read_run_csv``): for plots of runs in progress."""
        return read_run_csv(self.csv_path(kind), TABLES[kind].columns)

    def metrics(self) -> "pd.DataFrame":
        return self.table("metrics")

    def memory(self) -> "pd.DataFrame":
        return self.table("memory")

    def training(self) -> "pd.DataFrame":
        return self.table("training")

    def timings(self) -> "pd.DataFrame":
        return self.table("timings")

    def checked_table(self, kind: str) -> "pd.DataFrame":
        """A complete run's table, strictly (``read_checked_csv``): ``RunFileDamaged`` if not whole."""
        return read_checked_csv(self.csv_path(kind), TABLES[kind].columns)

    def steps_done(self) -> int:
        """How many steps ``metrics.csv`` has results for (0 if it cannot be read)."""
        import pandas as pd

        try:
            return int(pd.read_csv(self.csv_path("metrics"), usecols=["step"])["step"].nunique())
        except (OSError, ValueError, KeyError, UnicodeDecodeError):
            return 0

    def accuracy_matrix(self, metric: str = "pixel_auroc", tasks: Sequence[str] | None = None) -> "pd.DataFrame":
        """R[step, task] of ``metric`` from ``metrics.csv`` (see ``accuracy_matrix``)."""
        return accuracy_matrix(self.metrics(), metric, tasks)

    # -- writing -------------------------------------------------------------------------------
    def write_marker(self, name: str, *, created: bool = True) -> None:
        """The marker that makes the folder recognisably clbench's (``created``: a fresh run's time)."""
        data = {"clbench": "run folder", "name": name}
        if created:
            data["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic.write_json(self.marker_path, data)

    def write_config(self, resolved: Mapping[str, Any]) -> None:
        atomic.write_yaml(self.config_path, dict(resolved))

    def write_env(self, info: Mapping[str, Any]) -> None:
        atomic.write_json(self.env_path, info)

    def write_fingerprint(self, fingerprint: Mapping[str, Any]) -> None:
        atomic.write_json(self.fingerprint_path, fingerprint)

    def disk_bytes(self) -> dict[str, int]:
        """What the run keeps on disk, by kind (summary.json's ``disk_bytes``): the checkpoint, the probe
        maps, the result tables and records; plots are drawn after it (and redrawn at will)."""
        sizes = {"checkpoint": 0, "probe_maps": 0, "results": 0}
        for entry in self.path.iterdir():
            if entry.name == PROBE_MAPS and entry.is_dir() and not entry.is_symlink():
                sizes["probe_maps"] = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
            elif entry.name == CHECKPOINT and entry.is_file():
                sizes["checkpoint"] = entry.stat().st_size
            elif entry.is_file() and not entry.is_symlink() and entry.name != LOCK:
                sizes["results"] += entry.stat().st_size
        sizes["total"] = sum(sizes.values())
        return sizes

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic.write_json(self.summary_path, summary)

    def remove_leftovers(self) -> list[Path]:
        """Temporary files a killed atomic write left in the folder or its plots (under the lock)."""
        return (atomic.remove_leftovers(self.path) + atomic.remove_leftovers(self.plots_dir)
                + atomic.remove_leftovers(self.path / PROBE_MAPS))

    def remove_feature_cache(self) -> None:
        shutil.rmtree(self.feature_cache_dir, ignore_errors=True)

    def clear(self) -> None:
        """Empty the folder for ``--overwrite``, keeping the lock this process holds on it; symbolic
        links inside are removed, never followed."""
        for entry in os.scandir(self.path):
            if entry.name == LOCK:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    # -- checkpoint ----------------------------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Tensors and plain data, atomically; a full disk or file-size limit is one OSError line."""
        import torch

        path = self.checkpoint_path
        try:
            atomic.write_with(path, lambda tmp: torch.save(dict(state), tmp))
        except RuntimeError as err:  # torch's writer reports a full disk or a file-size limit so
            raise OSError(f"{path}: cannot write the checkpoint ({first_line(err, 80)}): disk full or file-size "
                          "limit reached? The steps completed before are kept: free space, then run again "
                          "with --resume") from err

    def load_checkpoint(self, device: "torch.device | str", n_steps: int) -> dict[str, Any]:
        """The checkpoint, loaded safely (``weights_only=True``: tensors and plain containers, never
        code) and checked to be one of this run's; any other file is one line naming it."""
        import torch

        path = self.checkpoint_path
        try:
            state = torch.load(path, weights_only=True, map_location=device)
        except Exception as err:  # noqa: BLE001 - garbage, truncation, pickled code: the same fault to a user
            raise ConfigError(f"{path}: not a valid clbench checkpoint ({load_problem(err)}); {RECOVER}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"{path}: not a clbench checkpoint (a {type(state).__name__}, not a mapping); {RECOVER}")
        for key, kind in (("step", int), ("method", dict), ("strategy", dict)):
            if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
                raise ConfigError(f"{path}: not a clbench checkpoint ('{key}' missing or malformed); {RECOVER}")
        if not 0 <= state["step"] < n_steps:
            raise ConfigError(f"{path}: checkpoint step {state['step']} is outside this run's 0..{n_steps - 1}; {RECOVER}")
        if not isinstance(state.get("training", {}), dict):
            raise ConfigError(f"{path}: not a clbench checkpoint ('training' malformed); {RECOVER}")
        return state


# --------------------------------------------------------------------------------------------
# a run's result tables (written after every step, checked on resume)
# --------------------------------------------------------------------------------------------
@dataclass
class Results:
    """Tidy rows of a run, rewritten atomically after every step.

    The checkpoint carries the rows too (plain values), so a resume continues from exactly what
    the completed steps produced and can check the CSVs on disk against them. A training.csv of
    the format before per-epoch rows (no ``epoch`` column) is resumed compatibly: checked in its
    own columns, then rewritten with an empty ``epoch`` for its rows at the next step."""

    folder: RunFolder
    metrics: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)

    # -- rows of a step ------------------------------------------------------------------------
    def add_metrics(self, step: int, label: str, evaluation: Mapping[str, Mapping[str, float]]) -> None:
        for task, values in evaluation.items():
            for metric, value in values.items():
                self.metrics.append(dict(step=step, trained_task=label, eval_task=task, metric=metric, value=value))

    def add_training(self, step: int, label: str, fit_info: Mapping[str, Any],
                     epoch_log: Sequence[Mapping[str, Any]] = ()) -> None:
        """The step's ``fit_info`` (epoch empty), then one row per key of each epoch record (its
        ``epoch`` entry is the row's epoch, its position if it has none)."""
        for key, value in fit_info.items():
            self.training.append(dict(step=step, trained_task=label, epoch=None, key=key, value=value))
        for position, record in enumerate(epoch_log):
            epoch = int(record.get("epoch", position))
            for key, value in record.items():
                if key != "epoch":
                    self.training.append(dict(step=step, trained_task=label, epoch=epoch, key=key, value=float(value)))

    def add_memory(self, step: int, label: str, components: Mapping[str, int]) -> None:
        for component, size in components.items():
            self.memory.append(dict(step=step, trained_task=label, component=component, bytes=int(size)))

    def add_timing(self, step: int, phase: str, seconds: float, images: int) -> None:
        rate = images / seconds if seconds > 0 else float("nan")
        self.timings.append(dict(step=step, phase=phase, seconds=seconds, images=images, images_per_s=rate))

    # -- files ---------------------------------------------------------------------------------
    def frame(self, kind: str, columns: Sequence[str] | None = None) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame(getattr(self, kind), columns=list(columns or TABLES[kind].columns))

    def save(self) -> None:
        for kind in TABLES:
            atomic.write_csv(self.folder.csv_path(kind), self.frame(kind))

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Every row as plain Python values (what ``torch.load(weights_only=True)`` reads back)."""
        return {kind: [{k: _plain(v) for k, v in row.items()} for row in getattr(self, kind)] for kind in TABLES}

    def restore(self, rows: Any) -> None:
        """Rows saved in a checkpoint by ``rows()``, each checked against its CSV file on disk."""
        checkpoint = self.folder.checkpoint_path
        if not isinstance(rows, dict) or any(not isinstance(rows.get(kind), list) for kind in TABLES):
            raise ConfigError(f"{checkpoint}: not a clbench checkpoint (its results are malformed); {RECOVER}")
        for kind in TABLES:
            setattr(self, kind, list(rows[kind]))
            self._check_file(kind)
        self.training = [row if "epoch" in row else {**row, "epoch": None} for row in self.training]

    def _check_file(self, kind: str) -> None:
        """The file must begin with exactly what was written at the checkpoint's step (a kill before
        the next checkpoint may have appended that step's rows after it)."""
        path, checkpoint = self.folder.csv_path(kind), self.folder.checkpoint_path
        try:
            with open(path, "rb") as handle:
                legacy = kind == "training" and handle.readline() == (",".join(LEGACY_TRAINING_COLUMNS) + "\n").encode()
                handle.seek(0)
                expected = self._expected_bytes(kind, LEGACY_TRAINING_COLUMNS if legacy else None)
                found = handle.read(len(expected))
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing, but {checkpoint.name} holds results up to its step; "
                              f"restore the file or {RECOVER}") from None
        if found != expected:
            raise ConfigError(f"{path}: does not match {checkpoint.name} (truncated, older or edited); "
                              f"restore the file or {RECOVER}")

    def _expected_bytes(self, kind: str, columns: Sequence[str] | None) -> bytes:
        return self.frame(kind, columns).to_csv(index=False, float_format=atomic.CSV_FLOAT_FORMAT).encode()

    def load_csv(self, completed_step: int, tasks: list[str]) -> None:
        """Rows of steps up to ``completed_step`` from the CSVs, for a checkpoint written before
        checkpoints carried their rows; every completed step must be there, each with the same
        (task, metric) rows (a value cut short mid-number cannot be told from these files)."""
        checkpoint = self.folder.checkpoint_path
        for kind in TABLES:
            path = self.folder.csv_path(kind)
            if not path.is_file():
                if kind == "metrics":
                    raise ConfigError(f"{path}: missing, but {checkpoint.name} is after step {completed_step}; {RECOVER}")
                continue
            frame = self._read_csv(kind, path)
            frame = frame[frame["step"] <= completed_step]
            if kind == "metrics":
                self._check_metric_rows(frame, path, completed_step, tasks)
            setattr(self, kind, frame.to_dict("records"))

    def _check_metric_rows(self, frame: "pd.DataFrame", path: Path, completed_step: int, tasks: list[str]) -> None:
        checkpoint = self.folder.checkpoint_path
        steps = set(frame["step"])
        if steps != set(range(completed_step + 1)):
            raise ConfigError(f"{path}: has results for {len(steps)} step(s) but {checkpoint.name} is after step "
                              f"{completed_step} (truncated or edited); {RECOVER}")
        pairs = [set(zip(group["eval_task"], group["metric"])) for _, group in frame.groupby("step")]
        if any(p != pairs[0] for p in pairs) or {task for task, _ in pairs[0]} != set(tasks):
            raise ConfigError(f"{path}: rows missing or cut short (truncated or edited); {RECOVER}")

    @staticmethod
    def _read_csv(kind: str, path: Path) -> "pd.DataFrame":
        """A results CSV with its own columns (a legacy training.csv gains an empty ``epoch``) and a
        numeric step."""
        import pandas as pd

        columns = list(TABLES[kind].columns)
        try:
            frame = read_csv(path, columns)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
            raise ConfigError(f"{path}: unreadable ({first_line(err)}); {RECOVER}") from None
        if kind == "training" and list(frame.columns) == list(LEGACY_TRAINING_COLUMNS):
            frame.insert(2, "epoch", None)
        text = [c for c in columns if c in TEXT_COLUMNS]
        numeric_columns = [c for c in columns if c not in text and not (kind == "training" and c in ("value", "epoch"))]
        if list(frame.columns) != columns or any(not pd.api.types.is_numeric_dtype(frame[c]) for c in
                                                  (numeric_columns if len(frame) else [])) \
                or frame["step"].isna().any():
            raise ConfigError(f"{path}: not a clbench {kind} file, or truncated mid-line; {RECOVER}")
        frame["step"] = frame["step"].astype(int)
        return frame
