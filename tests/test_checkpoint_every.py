"""``checkpoint_every: K``: a checkpoint every K steps (and after the last), and a killed run that
resumes from the last checkpoint redoes the steps after it to the same results."""
from __future__ import annotations

import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.engine.config import ConfigError, RunConfig
from clbench.engine.rundir import CHECKPOINT
from clbench.engine.validation import validate_run
from helpers import clbench_process

RUN = "padim-sequential-resnet18-seed0"


def test_checkpoint_every_is_checked() -> None:
    with pytest.raises(ConfigError, match="checkpoint_every=0 is not an integer >= 1"):
        validate_run(RunConfig(checkpoint_every=0))


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_resumes_from_the_last_one_to_identical_metrics(
    synthetic_root: Path, tmp_path: Path
) -> None:
    args = ["run", "--data-root", str(synthetic_root), "--tasks", "4", "--image-size", "64", "--weights", "none",
            "--device", "cpu", "--param", "n_features=40", "--no-progress", "--no-plots"]
    reference = clbench_process(args + ["--output", str(tmp_path / "ref")])
    killed = clbench_process(args + ["--output", str(tmp_path / "killed"), "--checkpoint-every", "2"],
                             kill_after_training_step=3)
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stderr.read().decode()
    run_dir = tmp_path / "killed" / RUN
    # steps 0-2 were written, but only step 1 (the 2nd) was checkpointed: step 2 is redone on resume
    assert set(pd.read_csv(run_dir / "metrics.csv").step) == {0, 1, 2}
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 1

    resumed = clbench_process(args + ["--output", str(tmp_path / "killed"), "--resume", "--checkpoint-every", "3"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    ref_dir = tmp_path / "ref" / RUN
    assert (run_dir / "metrics.csv").read_bytes() == (ref_dir / "metrics.csv").read_bytes()
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 3  # the last step always checkpoints
    assert (run_dir / "summary.json").exists()
