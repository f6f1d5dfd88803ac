"""End to end on the built-in synthetic data: the results contract, one backbone pass per image,
joint runs, and a killed run that resumes to identical metrics."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from clbench.engine.config import ConfigError, RunConfig
from clbench.data import list_categories, load_category
from clbench.engine.rundir import CHECKPOINT
from clbench.engine.runner import run_experiment
from helpers import clbench_process


def make_config(root: Path, out: Path, **overrides) -> RunConfig:
    base = dict(data_root=str(root), synthetic=False, tasks=3, image_size=64, weights="none",
                output_dir=str(out), device="cpu", method_params={"n_features": 40})
    base.update(overrides)
    return RunConfig(**base)


@pytest.mark.slow
def test_sequential_run_writes_the_results_contract(synthetic_root: Path, tmp_path: Path) -> None:
    run_dir = run_experiment(make_config(synthetic_root, tmp_path), progress=False)
    assert run_dir == tmp_path / "padim-sequential-resnet18-seed0"
    for name in ("config.yaml", "env.json", "metrics.csv", "memory.csv", "timings.csv", "summary.json", CHECKPOINT):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "feature_cache").exists()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    tasks = config["tasks"]
    assert len(tasks) == 3 and config["method_params"]["n_features"] == 40 and config["method_params"]["epsilon"] == 0.01

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == ["step", "trained_task", "eval_task", "metric", "value"]
    pixel = metrics[metrics.metric == "pixel_auroc"].pivot(index="step", columns="eval_task", values="value")[tasks]
    assert pixel.shape == (3, 3) and pixel.notna().all().all()  # the whole matrix, unlearned tasks too
    assert np.diag(pixel.to_numpy()).mean() > 0.7  # learned tasks are localised well above chance
    assert set(metrics.metric) >= {"pixel_auroc", "image_auroc", "pixel_aupro", "pixel_ap"}
    assert list(metrics.drop_duplicates("step").trained_task) == tasks

    summary = json.loads((run_dir / "summary.json").read_text())
    R = pixel.to_numpy()
    assert summary["metrics"]["pixel_auroc"]["acc"] == pytest.approx(R[-1].mean())
    assert summary["metrics"]["pixel_auroc"]["bwt"] == pytest.approx(np.mean([R[2, j] - R[j, j] for j in range(2)]))

    memory = pd.read_csv(run_dir / "memory.csv")
    state = memory[memory.component == "method_state"].set_index("step")["bytes"]
    assert (state > 0).all() and state.nunique() == 1  # PaDiM's memory is fixed in the number of tasks
    assert set(memory.component) >= {"model_frozen", "method_state", "replay_buffer", "peak_rss", "peak_cuda"}

    # a frozen backbone sees each image once per run: train + test images, not steps x test images
    categories = [load_category(synthetic_root, t, 0.1, 0) for t in tasks]
    used = sum(len(c.train) + len(c.test) for c in categories)
    assert summary["backbone_forward_images"] == used
    timings = pd.read_csv(run_dir / "timings.csv")
    assert set(timings.phase) == {"train", "evaluate", "backbone_forward"}

    env = json.loads((run_dir / "env.json").read_text())
    assert env["weights"]["pretrained"] is False and env["weights"]["source"] == "none"
    assert env["held_out"]["fraction"] == 0.1 and "torch" in env["packages"]
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted([
        "forgetting_image_auroc.png", "forgetting_pixel_auroc.png", "heatmap_image_auroc.png",
        "heatmap_pixel_auroc.png", "memory.png", *(f"maps_{t}.png" for t in tasks),  # one probe-map panel per task
    ])


@pytest.mark.slow
def test_joint_run_is_one_step_over_all_tasks(synthetic_root: Path, tmp_path: Path) -> None:
    run_dir = run_experiment(make_config(synthetic_root, tmp_path, strategy="joint"), progress=False)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics.step) == {0} and set(metrics.trained_task) == {"joint"}
    assert metrics.eval_task.nunique() == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["pixel_auroc"]["fm"] is None  # NaN (undefined for one step) is JSON null


@pytest.mark.slow
def test_existing_run_needs_resume_or_overwrite(synthetic_root: Path, tmp_path: Path) -> None:
    config = make_config(synthetic_root, tmp_path, tasks=2)
    run_experiment(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_experiment(config, progress=False)
    changed = make_config(synthetic_root, tmp_path, tasks=2, method_params={"n_features": 30})
    with pytest.raises(ConfigError, match="cannot resume, 'method_params'"):
        run_experiment(changed, resume=True, progress=False)
    run_experiment(changed, overwrite=True, progress=False)


@pytest.mark.slow
def test_a_run_saved_with_synthetic_true_resumes_under_auto(tiny_root: Path, tmp_path: Path) -> None:
    """Runs made before ``synthetic`` became auto|true|false saved ``synthetic: true``; the key says
    only whether data may be generated (the dataset fingerprint guards the data), so it may differ."""
    run_dir = run_experiment(make_config(tiny_root, tmp_path, tasks=1, image_size=32, method_params={"n_features": 8}),
                             progress=False)
    path = run_dir / "config.yaml"
    path.write_text(path.read_text().replace("synthetic: false\n", "synthetic: true\n"))
    assert yaml.safe_load(path.read_text())["synthetic"] is True
    resumed = make_config(tiny_root, tmp_path, tasks=1, image_size=32, method_params={"n_features": 8}, synthetic="auto")
    assert run_experiment(resumed, resume=True, progress=False) == run_dir




@pytest.mark.slow
def test_killed_run_resumes_to_identical_metrics(synthetic_root: Path, tmp_path: Path) -> None:
    args = ["run", "--data-root", str(synthetic_root), "--tasks", "4", "--image-size", "64", "--weights", "none",
            "--device", "cpu", "--param", "n_features=40", "--no-progress"]
    reference = clbench_process(args + ["--output", str(tmp_path / "ref")])
    killed = clbench_process(args + ["--output", str(tmp_path / "killed")], kill_after_training_step=2)
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stderr.read().decode()
    run_dir = tmp_path / "killed" / "padim-sequential-resnet18-seed0"
    assert not (run_dir / "summary.json").exists()  # it really died mid-run
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 1  # step 2 trained, never saved
    assert set(pd.read_csv(run_dir / "metrics.csv").step) == {0, 1}

    resumed = clbench_process(args + ["--output", str(tmp_path / "killed"), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    ref_dir = tmp_path / "ref" / "padim-sequential-resnet18-seed0"
    assert (run_dir / "metrics.csv").read_bytes() == (ref_dir / "metrics.csv").read_bytes()
    assert (run_dir / "summary.json").exists()
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "feature_cache").exists()  # nothing left behind


def test_synthetic_data_is_generated_completed_but_never_written_into_user_data(tmp_path: Path) -> None:
    from clbench.data.root import ensure_dataset
    from clbench.data.synth import MARKER as SYNTHETIC_MARKER

    root = tmp_path / "synth"
    config = RunConfig(data_root=str(root), synthetic=True, synthetic_categories=3, image_size=32)
    ensure_dataset(config)
    assert len(list_categories(root)) == 3 and (root / SYNTHETIC_MARKER).is_file()
    import shutil

    shutil.rmtree(root / list_categories(root)[1])  # as if a generation had been killed
    ensure_dataset(config)
    assert len(list_categories(root)) == 3
    user = tmp_path / "mvtec"
    (user / "bottle" / "train" / "good").mkdir(parents=True)
    ensure_dataset(RunConfig(data_root=str(user), synthetic=True, synthetic_categories=3))
    assert list_categories(user) == ["bottle"]
