"""Trackers against the real libraries: what TensorBoard's event files and MLflow's store hold, read
back with their own readers, equals the run folder's tables; a killed and resumed run logs no step
twice; a sweep cell is a run of the sweep's experiment; a missing package is one line."""
from __future__ import annotations

import importlib.util
import json
import math
import signal
from pathlib import Path

import pandas as pd
import pytest

from clbench.engine.config import ConfigError
from clbench.engine.rundir import TRACKERS_STATE
from clbench.tracking import check
from helpers import clbench_process, engine_run

RUN = "padim-sequential-resnet18-seed0"
FAST = dict(tasks=3, image_size=32, probe_maps=0, method_params={"n_features": 20})


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())


def mlflow_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def run_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / TRACKERS_STATE).read_text())["mlflow"]["run_id"]


def same(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=rel)


def assert_metrics_equal(run_dir: Path, tb: dict, ml: dict) -> None:
    """Every metrics.csv value at its step, in both stores (TensorBoard keeps float32)."""
    from clbench.tracking.mlflow import metric_key

    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"eval_task": str})
    assert len(metrics) > 0
    for row in metrics.itertuples():
        tag = f"metric/{row.metric}/{row.eval_task}"
        assert [v for s, v in tb[tag] if s == row.step] and all(
            same(v, row.value, 1e-6) for s, v in tb[tag] if s == row.step), (tag, row.step)
        assert [v for s, v in ml[metric_key(tag)] if s == row.step] == pytest.approx([row.value], nan_ok=True)


@pytest.mark.slow
def test_logged_values_read_back_equal_the_run_folder(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_dir = engine_run("padim", "sequential", {}, synthetic_root, out, trackers=["tensorboard", "mlflow"], **FAST)
    tb = tb_scalars(run_dir)
    client = mlflow_client(out)
    run = client.get_run(run_id_of(run_dir))
    ml = mlflow_history(client, run.info.run_id)
    assert_metrics_equal(run_dir, tb, ml)
    assert {s for s, _ in tb["metric/pixel_auroc/" + pd.read_csv(run_dir / "metrics.csv").eval_task[0]]} == {0, 1, 2}

    acc = json.loads((run_dir / "summary.json").read_text())["metrics"]["pixel_auroc"]["acc"]
    assert tb["summary/pixel_auroc/acc"][-1][0] == 2 and tb["summary/pixel_auroc/acc"][-1][1] == pytest.approx(acc, rel=1e-6)
    assert ml["summary/pixel_auroc/acc"][-1] == (2, pytest.approx(acc))
    memory = pd.read_csv(run_dir / "memory.csv")
    last = memory[memory.step == 2].iloc[0]
    assert ml[f"memory/{last.component}"][-1] == (2, pytest.approx(float(last.bytes)))

    # the MLflow run: named after the folder, tagged, the config as params, artifacts, finished
    assert run.info.run_name == RUN and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "clbench"
    assert run.data.tags["method"] == "padim" and run.data.tags["strategy"] == "sequential"
    assert run.data.params["method_params.n_features"] == "20" and run.data.params["image_size"] == "32"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"config.yaml", "summary.json"} <= artifacts and "plots/heatmap_pixel_auroc.png" in plots

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert "plots/heatmap_pixel_auroc" in events.Tags()["images"]


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_tracker_runs_without_duplicate_steps(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the file store the runs wrote
    out = tmp_path / "out"
    args = ["run", "--data-root", str(synthetic_root), "--tasks", "3", "--image-size", "32", "--weights", "none",
            "--device", "cpu", "--param", "n_features=20", "--no-progress", "--no-plots", "--probe-maps", "0",
            "--checkpoint-every", "1", "--tracker", "tensorboard", "--tracker", "mlflow", "--output", str(out)]
    killed = clbench_process(args, kill_after_training_step=1)
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stderr.read().decode()
    run_dir = out / RUN
    run_id = run_id_of(run_dir)
    client = mlflow_client(out)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: never ended
    assert {s for steps in mlflow_history(client, run_id).values() for s, _ in steps} == {0}
    # the worst moment of a kill: step 0 is in both stores but trackers.json does not say so yet
    state = json.loads((run_dir / TRACKERS_STATE).read_text())
    for name in ("tensorboard", "mlflow"):
        state[name]["last_step"] = -1
    (run_dir / TRACKERS_STATE).write_text(json.dumps(state))

    resumed = clbench_process(args + ["--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert run_id_of(run_dir) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    tb, ml = tb_scalars(run_dir), mlflow_history(client, run_id)
    for store in (tb, ml):  # one value per step and key (bwt/fm begin at step 1), every metric at every step
        steps = {key: [s for s, _ in values] for key, values in store.items()}
        assert all(s == sorted(set(s)) and set(s) <= {0, 1, 2} for s in steps.values()), steps
        assert all(s == [0, 1, 2] for key, s in steps.items() if key.startswith("metric/")), steps
    assert_metrics_equal(run_dir, tb, ml)


@pytest.mark.slow
def test_a_sweep_cell_is_a_run_of_the_sweeps_experiment(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep-folder"
    sweep.mkdir()
    (sweep / "sweep.yaml").write_text("name: s1\nformat: 1\n")
    run_dir = engine_run("padim", "sequential", {}, synthetic_root, sweep / "runs", trackers=["mlflow"], plots=False,
                         **{**FAST, "tasks": 2})
    client = mlflow_client(sweep / "runs")  # the default store: mlruns/ in the run's output directory
    experiment = client.get_experiment_by_name("s1")
    assert experiment is not None and client.get_experiment_by_name("clbench") is None
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_id, r.info.run_name) for r in runs] == [(run_id_of(run_dir), run_dir.name)]
    assert runs[0].data.tags["sweep"] == "s1"


def test_metric_keys_mlflow_refuses_are_mapped() -> None:
    from clbench.tracking.mlflow import metric_key

    assert metric_key("metric/pixel_auroc/a+b") == "metric/pixel_auroc/a_plus_b"
    assert metric_key("train/loss(x=1)") == "train/loss_x_eq_1_"
    assert metric_key("memory/bank size: 2-3.5") == "memory/bank size: 2-3.5"  # allowed as they are


def test_a_missing_tracker_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ConfigError, match=r"^trackers: 'mlflow' needs the mlflow package: pip install 'clbench\[mlflow\]'$"):
        check(["mlflow"])


def test_an_unknown_tracker_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^trackers: unknown tracker 'wandb' \(known: tensorboard, mlflow\)$"):
        check(["wandb"])
