"""Experiment trackers (TensorBoard, MLflow): optional mirrors of a run's results, off by default.

A run folder is the record; a tracker copies it into the tool a lab already watches. It reads
only what is durable in the folder (metrics.csv, memory.csv, training.csv, config.yaml, plots/), so
it needs nothing of the runner's internals:

* ``sync(up_to_step)`` logs every step from the one after the last it logged up to ``up_to_step``.
  The runner calls it after each checkpoint (so a step is logged only once its results can no
  longer be redone) and when a run resumes (steps checkpointed but not yet logged before a kill).
  What a tracker logged last is kept in ``trackers.json`` in the run folder, and each tracker also
  guards against a step it logged just before a kill (MLflow: the step is already in the history;
  TensorBoard: the writer reopens with ``purge_step``): a resumed run logs no step twice.
* ``finish()`` logs the config and the plots as artifacts once the run is complete.

Trackers are named in the run config (``trackers: [tensorboard, mlflow]``, ``--tracker``) and
imported only when named; a missing package is one line before the run starts (``check``).
A sweep's cells are tracked as runs of their own, grouped under the sweep's name (``group_of``).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

from clbench.engine import atomic
from clbench.engine.config import ConfigError
from clbench.engine.rundir import TRACKERS_STATE, RunFolder, first_line, read_mapping

log = logging.getLogger(__name__)

# name -> (module, class, the package it needs, pip extra)
TRACKERS: dict[str, tuple[str, str, str, str]] = {
    "tensorboard": ("clbench.tracking.tensorboard", "TensorBoardTracker", "tensorboard", "tensorboard"),
    "mlflow": ("clbench.tracking.mlflow", "MLflowTracker", "mlflow", "mlflow"),
}


class Tracker(ABC):
    """One tracker of one run folder."""

    name: ClassVar[str]

    def __init__(self, folder: RunFolder, state: dict[str, Any], *, group: str | None, tracking_uri: str | None) -> None:
        self.folder = folder
        self.state = state  # this tracker's entry of trackers.json (ids, "last_step"); saved by TrackerSet
        self.group = group
        self.tracking_uri = tracking_uri

    @property
    def last_step(self) -> int:
        return int(self.state.get("last_step", -1))

    @abstractmethod
    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Log one step's values (``step_values``: metric/<metric>/<task>, summary/<metric>/<acc|bwt|fm>,
        memory/<component>, train/<key>) at ``step``."""

    @abstractmethod
    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Copy files (config.yaml, summary.json, plots) into the tracker's run."""

    def close(self) -> None:
        """Flush and release (end the MLflow run, close the event writer); called more than once.
        ``state["finished"]`` says whether the run was complete (``TrackerSet.finish``)."""


def check(names: Sequence[str]) -> None:
    """One line for an unknown tracker or a package that is not installed (before a run starts)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"trackers: unknown tracker '{name}' (known: {', '.join(TRACKERS)})")
        package, extra = TRACKERS[name][2], TRACKERS[name][3]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"trackers: '{name}' needs the {package} package: pip install 'clbench[{extra}]'")


def group_of(run_dir: Path) -> str | None:
    """The sweep a cell belongs to (``<sweep>/runs/<cell>`` with the sweep's sweep.yaml), else None."""
    sweep_dir = run_dir.parent.parent
    if run_dir.parent.name != "runs" or not (sweep_dir / "sweep.yaml").is_file():
        return None
    import yaml

    name = read_mapping(sweep_dir / "sweep.yaml", yaml.safe_load).get("name")
    return str(name) if name else sweep_dir.name


class TrackerSet:
    """The trackers of one run, with their shared state file."""

    def __init__(self, folder: RunFolder, names: Sequence[str], taught: dict[str, int],
                 tracking_uri: str | None = None) -> None:
        check(names)
        self.folder = folder
        self.taught = dict(taught)  # category -> the step that taught it (the runner's schedule)
        self.path = folder.path / TRACKERS_STATE
        saved = read_mapping(self.path) if self.path.is_file() else {}
        self.states: dict[str, dict[str, Any]] = {n: dict(saved.get(n) or {}) for n in names}
        group = group_of(folder.path)
        self.trackers: list[Tracker] = []
        for name in names:
            module, cls, _, _ = TRACKERS[name]
            tracker_cls = getattr(importlib.import_module(module), cls)
            self.trackers.append(tracker_cls(folder, self.states[name], group=group, tracking_uri=tracking_uri))
        self._save()

    def _save(self) -> None:
        atomic.write_json(self.path, self.states)

    def sync(self, up_to_step: int) -> None:
        """Log the steps each tracker has not logged yet, up to ``up_to_step`` (from the folder's tables)."""
        pending = [t for t in self.trackers if t.last_step < up_to_step]
        if not pending:
            return
        for step in range(min(t.last_step for t in pending) + 1, up_to_step + 1):
            values = step_values(self.folder, step, self.taught)
            for tracker in pending:
                if tracker.last_step < step:
                    tracker.log_step(step, values)
                    tracker.state["last_step"] = step
                    self._save()

    def finish(self) -> None:
        """The config, summary and plots as artifacts; then close."""
        paths = [p for p in (self.folder.config_path, self.folder.summary_path) if p.is_file()]
        paths += sorted(self.folder.plots_dir.glob("*.png")) if self.folder.plots_dir.is_dir() else []
        for tracker in self.trackers:
            if not tracker.state.get("artifacts_logged"):
                tracker.log_artifacts(paths)
                tracker.state["artifacts_logged"] = True
                self._save()
        for tracker in self.trackers:
            tracker.state["finished"] = True  # close() ends the tracker's run as complete, not failed
        self._save()
        self.close()

    def close(self) -> None:
        """Close every tracker; a tracker that fails to close is a warning, never an error that would
        hide the run's own (the runner closes in ``finally``) or fail a run whose folder is complete."""
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001 - a mirror's failure must not mask the run's outcome
                log.warning("tracker %s: could not close (%s)", tracker.name, first_line(err))


def step_values(folder: RunFolder, step: int, taught: dict[str, int]) -> dict[str, float]:
    """Everything a tracker logs for ``step``, flat: ``metric/<metric>/<task>`` (every task's value after
    the step), ``summary/<metric>/<acc|bwt|fm>`` (over the steps so far: ``clbench.metrics.forgetting``),
    ``memory/<component>`` (bytes) and ``train/<key>`` (the step's training record, epoch rows left out)."""
    import numpy as np

    from clbench.engine.evaluation import TASK_ID_METRIC
    from clbench.engine.rundir import accuracy_matrix
    from clbench.metrics.forgetting import summarize

    values: dict[str, float] = {}
    metrics = folder.metrics()
    now = metrics[metrics["step"] == step]
    for row in now.itertuples():
        values[f"metric/{row.metric}/{row.eval_task}"] = float(row.value)
    tasks = list(dict.fromkeys(str(t) for t in metrics["eval_task"]))
    for metric in sorted(set(now["metric"])):
        if metric == TASK_ID_METRIC:
            continue
        R = accuracy_matrix(metrics[metrics["step"] <= step], metric, tasks).to_numpy(dtype=float)
        seen = [j for j, t in enumerate(tasks) if taught.get(t, step + 1) <= step]  # tasks taught so far
        if not seen:
            continue
        stats = summarize(R[:, seen], [taught[tasks[j]] for j in seen])
        for key in ("acc", "bwt", "fm"):
            if np.isfinite(stats[key]):
                values[f"summary/{metric}/{key}"] = float(stats[key])
    if folder.csv_path("memory").is_file():
        memory = folder.memory()
        for row in memory[memory["step"] == step].itertuples():
            values[f"memory/{row.component}"] = float(row.bytes)
    if folder.csv_path("training").is_file():
        training = folder.training()
        rows = training[(training["step"] == step)]
        if "epoch" in rows.columns:
            rows = rows[rows["epoch"].isna()]
        for row in rows.itertuples():
            try:
                values[f"train/{row.key}"] = float(row.value)
            except (TypeError, ValueError):
                continue
    return values
