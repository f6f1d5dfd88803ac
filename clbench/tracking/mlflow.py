"""MLflow tracker: one MLflow run per run folder, in the experiment of its sweep (or "clbench").

Only an ``MlflowClient`` bound to the tracking URI is used, never MLflow's global fluent state, so
that runs in one process (tests, a local sweep) cannot leak into each other. The default store is
the file store ``<output>/mlruns`` (the runner's default URI): MLflow 3 refuses it unless
``MLFLOW_ALLOW_FILE_STORE`` is set, and its database stores need SQLAlchemy (full ``mlflow``, not
``mlflow-skinny``), so for a ``file:`` URI the tracker sets that variable (unless the user set it).

Resume: the MLflow run id is kept in trackers.json and the run is reopened (status set back to
RUNNING); a step at or below the last step already in a key's history is skipped (the history is
read once per key after a reopen), so a step logged just before a kill is not logged twice.
A run ends FINISHED after ``finish``; a run that ends with an error is marked FAILED; a killed
run stays RUNNING until it is resumed.

Metric keys: MLflow allows alphanumerics and ``_ - . / : space``; any other character of a task or
key name is mapped by ``KEY_MAP`` (``+`` -> ``_plus_``, ``=`` -> ``_eq_``, anything else -> ``_``).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

from clbench.engine.config import ConfigError
from clbench.engine.rundir import RunFolder, first_line
from clbench.tracking import Tracker

DEFAULT_EXPERIMENT = "clbench"  # a lone run's experiment; a sweep cell's is the sweep's name
KEY_MAP = {"+": "_plus_", "=": "_eq_"}  # other characters MLflow refuses in a metric key -> "_"
_REFUSED = re.compile(r"[^A-Za-z0-9_\-./: ]")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (characters)
BATCH = 100  # MLflow's limit on params (and tags) per log_batch call; metrics: 1000


def metric_key(name: str) -> str:
    """``name`` as an MLflow metric key (``KEY_MAP``)."""
    return _REFUSED.sub(lambda m: KEY_MAP.get(m.group(0), "_"), name)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, string values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def _allow_file_store(uri: str) -> None:
    if urlparse(uri).scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


class MLflowTracker(Tracker):
    """One run folder's MLflow run."""

    name = "mlflow"

    def __init__(self, folder: RunFolder, state: dict[str, Any], *, group: str | None, tracking_uri: str | None) -> None:
        super().__init__(folder, state, group=group, tracking_uri=tracking_uri)
        from mlflow.tracking import MlflowClient  # lazily: the mlflow extra

        uri = tracking_uri or (folder.path.parent / "mlruns").resolve().as_uri()
        _allow_file_store(uri)
        try:
            self.client = MlflowClient(tracking_uri=uri)
        except Exception as err:  # noqa: BLE001 - e.g. sqlite:// without SQLAlchemy (mlflow-skinny)
            raise ConfigError(f"tracking_uri: MLflow cannot open '{uri}' ({first_line(err)}); database stores "
                              "need the full package: pip install mlflow") from None
        self._last_logged: dict[str, int] = {}  # metric key -> the last step in its history
        self._reopened = self._reopen()
        if not self._reopened:
            self.state["last_step"] = -1  # a new MLflow run: every step the folder holds is logged into it
            self.state.pop("artifacts_logged", None)
            self.state["run_id"] = self._create()
        self.run_id: str = self.state["run_id"]
        self._closed = False

    def _reopen(self) -> bool:
        """Reopen the run of an earlier process (a resume); False if there is none in this store."""
        from mlflow.exceptions import MlflowException

        run_id = self.state.get("run_id")
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except MlflowException:  # another tracking URI, or the run was deleted: start a new one
            return False
        if run.info.lifecycle_stage != "active":
            return False
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return True

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.group or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # a sweep's other cell created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _create(self) -> str:
        from mlflow.entities import Param

        config = self.folder.config()
        tags = {key: str(config[key]) for key in ("method", "strategy", "seed") if key in config}
        tags["run_dir"] = str(self.folder.path.resolve())
        if self.group:
            tags["sweep"] = self.group
        run = self.client.create_run(self._experiment_id(), run_name=self.folder.path.name, tags=tags)
        params = [Param(k, v) for k, v in flatten(config).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(run.info.run_id, params=params[start:start + BATCH])
        return run.info.run_id

    def _last_step_of(self, key: str) -> int:
        if key not in self._last_logged:
            history = self.client.get_metric_history(self.run_id, key) if self._reopened else []
            self._last_logged[key] = max((m.step for m in history), default=-1)
        return self._last_logged[key]

    def log_step(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for name, value in values.items():
            key = metric_key(name)
            if step > self._last_step_of(key):  # not already logged before a kill
                metrics.append(Metric(key, float(value), now, step))
                self._last_logged[key] = step
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """config.yaml and summary.json at the artifact root, PNG plots under ``plots/``."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), "plots" if path.suffix.lower() == ".png" else None)

    def close(self) -> None:
        """FINISHED once ``finish`` ran; FAILED when a run ends with an error before it (a resume
        sets it running again)."""
        if self._closed:
            return
        self._closed = True
        self.client.set_terminated(self.run_id, "FINISHED" if self.state.get("finished") else "FAILED")
