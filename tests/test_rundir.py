"""clbench.engine.rundir: the one owner of a run folder. The accuracy-matrix pivot on hand-built
rows, atomic writes, completion, the checkpoint round trip (weights_only), training.csv's per-epoch
rows (from a method's epoch_log, through the runner), the resume of an older training.csv, and the
README's list of run-folder files."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clbench.engine import rundir
from clbench.engine.config import ConfigError, RunConfig
from clbench.engine.rundir import Results, RunFolder, accuracy_matrix
from clbench.engine.runner import run_experiment
from helpers import write_category

REPO = Path(__file__).resolve().parent.parent


# -- the accuracy matrix ---------------------------------------------------------------------------
def _rows(values: dict[tuple[int, str], float], trained: list[str], metric: str = "pixel_auroc") -> list[dict]:
    return [dict(step=s, trained_task=trained[s], eval_task=t, metric=metric, value=v) for (s, t), v in values.items()]


def test_accuracy_matrix_is_R_step_by_task_in_stream_order() -> None:
    """R[s, j] read off by hand: rows are steps in order, columns the given task order (not the
    rows' order), a task never evaluated is a NaN column, other metrics are ignored."""
    values = {(1, "b"): 0.25, (0, "b"): 0.5, (0, "a"): 0.75, (1, "a"): 0.125}
    frame = pd.DataFrame(_rows(values, ["a", "b"]) + _rows({(0, "a"): 9.0}, ["a"], metric="image_auroc"))
    R = accuracy_matrix(frame, "pixel_auroc", ["a", "b", "c"])
    assert list(R.index) == ["step 0: a", "step 1: b"] and list(R.columns) == ["a", "b", "c"]
    np.testing.assert_array_equal(R.to_numpy()[:, :2], [[0.75, 0.5], [0.125, 0.25]])
    assert R["c"].isna().all()
    assert list(accuracy_matrix(frame, "pixel_auroc").columns) == ["b", "a"]  # first appearance without tasks
    with pytest.raises(ValueError, match=r"'pixel_aupro' not in metrics \(available: \['image_auroc', 'pixel_auroc'\]\)"):
        accuracy_matrix(frame, "pixel_aupro")


def test_accuracy_matrix_one_value_is_kept_bit_for_bit_and_duplicates_are_averaged() -> None:
    """The chosen semantics: one value per cell comes out unchanged (what summary.json took as
    'first' and the plots as 'mean'); several are averaged, NaN ones skipped; an all-NaN cell is NaN."""
    third = 1 / 3
    frame = pd.DataFrame(_rows({(0, "a"): third, (0, "b"): float("nan")}, ["a"])
                         + _rows({(0, "a"): 0.5}, ["a"], metric="x"))
    frame = pd.concat([frame, pd.DataFrame(_rows({(0, "c"): 0.25}, ["a"]) + _rows({(0, "c"): 0.75}, ["a"])
                                           + _rows({(0, "c"): float("nan")}, ["a"]))], ignore_index=True)
    R = accuracy_matrix(frame, "pixel_auroc", ["a", "b", "c"]).to_numpy()
    assert R[0, 0] == third and math.isnan(R[0, 1]) and R[0, 2] == 0.5


def test_folder_matrix_reads_metrics_csv_with_names_as_text(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.csv_path("metrics").write_text("step,trained_task,eval_task,metric,value\n"
                                          "0,01,01,pixel_auroc,0.5\n0,01,NA,pixel_auroc,\n")
    R = folder.accuracy_matrix("pixel_auroc", ["01", "NA"])
    assert list(R.columns) == ["01", "NA"] and list(R.index) == ["step 0: 01"]
    assert R.iloc[0, 0] == 0.5 and math.isnan(R.iloc[0, 1])


# -- completion and mappings -----------------------------------------------------------------------
@pytest.mark.parametrize("content,complete", [
    (None, False), ("{not json", False), ("[1, 2]", False), ('{"complete": false}', False),
    ('{"complete": "true"}', False), ('{"complete": true, "steps": 2}', True),
])
def test_is_complete_only_for_a_summary_that_says_so(content: str | None, complete: bool, tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    if content is not None:
        folder.summary_path.write_text(content)
    assert folder.is_complete() is complete


def test_unreadable_config_is_empty_and_said_once(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    heard: list[str] = []
    assert folder.config(on_error=heard.append) == {} and heard == []  # missing: nothing to say
    folder.config_path.write_text("method: [padim\n")
    assert folder.config(on_error=heard.append) == {}
    assert len(heard) == 1 and heard[0].startswith(f"{folder.config_path}: unreadable (") and "\n" not in heard[0]
    folder.config_path.write_text("method: padim\n")
    assert folder.config() == {"method": "padim"} and folder.is_started()


# -- atomic writes ---------------------------------------------------------------------------------
def _results(folder: RunFolder) -> Results:
    results = Results(folder)
    results.add_metrics(0, "a", {"a": {"pixel_auroc": 0.1 + 0.2}})
    results.add_memory(0, "a", {"method_state": np.int64(1024)})
    results.add_timing(0, "train", 0.5, 3)
    results.add_training(0, "a", {"epochs_run": 1.0})
    return results


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    folder = RunFolder(tmp_path)
    results = _results(folder)
    results.save()
    before = folder.csv_path("metrics").read_bytes()
    assert before == b"step,trained_task,eval_task,metric,value\n0,a,a,pixel_auroc,0.30000000000000004\n"
    results.add_metrics(1, "b", {"a": {"pixel_auroc": 0.5}})

    def half_then_fail(self, path, **kwargs):
        Path(path).write_text("step,trai")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="metrics.csv"):
        results.save()
    monkeypatch.undo()
    assert folder.csv_path("metrics").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_round_trip_is_weights_only_and_checked(tmp_path: Path, monkeypatch) -> None:
    folder = RunFolder(tmp_path)
    results = _results(folder)
    results.save()
    state = {"step": 0, "method": {"mean": torch.arange(6.0).reshape(2, 3)}, "training": {},
             "strategy": {"seen": 3}, "results": results.rows()}
    folder.save_checkpoint(state)
    loaded = folder.load_checkpoint("cpu", n_steps=2)
    assert torch.equal(loaded["method"]["mean"], state["method"]["mean"]) and loaded["results"] == state["results"]
    assert isinstance(loaded["results"]["memory"][0]["bytes"], int)  # numpy scalars stored as plain values
    restored = Results(folder)
    restored.restore(loaded["results"])  # the CSVs begin with exactly the checkpoint's rows
    assert restored.rows() == results.rows()

    with pytest.raises(ConfigError, match=r"checkpoint step 0 is outside this run's 0\.\.-1"):
        folder.load_checkpoint("cpu", n_steps=0)
    flag = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    torch.save({"step": 0, "method": Evil(), "strategy": {}}, folder.checkpoint_path)
    with pytest.raises(ConfigError, match="refused, loading it could run code") as err:
        folder.load_checkpoint("cpu", n_steps=2)
    assert str(folder.checkpoint_path) in str(err.value) and not flag.exists()

    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("write failed\nmore")))
    with pytest.raises(OSError, match="cannot write the checkpoint \\(write failed\\): disk full"):
        folder.save_checkpoint(state)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- training.csv: fit_info and per-epoch rows -------------------------------------------------------
EPOCHS = [{"epoch": 0, "loss": 0.5, "loss/st": 0.25, "val_loss": 0.75, "lr": 0.01},
          {"epoch": 1, "loss": 0.125, "loss/st": 0.0625, "val_loss": 0.5, "lr": 0.01}]


def test_training_rows_have_an_epoch_column(tmp_path: Path) -> None:
    results = Results(RunFolder(tmp_path))
    results.add_training(0, "a", {"epochs_run": 2.0}, EPOCHS)
    results.save()
    assert RunFolder(tmp_path).csv_path("training").read_text() == (
        "step,trained_task,epoch,key,value\n"
        "0,a,,epochs_run,2\n"
        "0,a,0,loss,0.5\n0,a,0,loss/st,0.25\n0,a,0,val_loss,0.75\n0,a,0,lr,0.01\n"
        "0,a,1,loss,0.125\n0,a,1,loss/st,0.0625\n0,a,1,val_loss,0.5\n0,a,1,lr,0.01\n")


@pytest.mark.slow
def test_runner_logs_the_methods_epoch_log(tmp_path: Path, monkeypatch) -> None:
    """A method whose fit_task leaves an epoch_log: training.csv gets its rows at every step, and a
    resume checks them against the checkpoint."""
    from methods.padim import PaDiM

    fit = PaDiM.fit_task

    def fit_and_log(self, data):
        fit(self, data)
        self.epoch_log = [dict(record) for record in EPOCHS]

    monkeypatch.setattr(PaDiM, "fit_task", fit_and_log)
    root = tmp_path / "data"
    write_category(root, "alpha", size=32)
    write_category(root, "beta", size=32, seed=1)
    config = RunConfig(method="padim", data_root=str(root), synthetic=False, tasks=2, image_size=32, weights="none",
                       output_dir=str(tmp_path / "out"), device="cpu")
    run = run_experiment(config, progress=False)
    training = RunFolder(run).training()
    assert list(training.columns) == ["step", "trained_task", "epoch", "key", "value"]
    per_epoch = training[training["epoch"].notna()]
    assert len(per_epoch) == 2 * 2 * 4 and set(per_epoch["key"]) == {"loss", "loss/st", "val_loss", "lr"}
    first = per_epoch[(per_epoch["step"] == 1) & (per_epoch["epoch"] == 1)].set_index("key")["value"]
    assert first.to_dict() == {"loss": 0.125, "loss/st": 0.0625, "val_loss": 0.5, "lr": 0.01}
    assert list(per_epoch.drop_duplicates("step")["trained_task"]) == ["alpha", "beta"]
    before = RunFolder(run).csv_path("training").read_bytes()
    assert run_experiment(config, resume=True, progress=False) == run
    assert RunFolder(run).csv_path("training").read_bytes() == before


def _legacy_training(folder: RunFolder, steps: int) -> dict[str, list[dict]]:
    """Rows and files as a clbench before per-epoch rows wrote them (training.csv without epoch)."""
    results = Results(folder)
    for step in range(steps):
        results.add_metrics(step, "a", {"a": {"pixel_auroc": 0.5 + step / 8}})
        results.add_training(step, "a", {"epochs_run": 3.0, "train_loss_last": 0.25})
    results.save()
    rows = results.rows()
    rows["training"] = [{k: v for k, v in row.items() if k != "epoch"} for row in rows["training"]]
    pd.DataFrame(rows["training"], columns=list(rundir.LEGACY_TRAINING_COLUMNS)).to_csv(
        folder.csv_path("training"), index=False, float_format="%.17g")
    return rows


def test_resume_reads_an_older_training_csv_and_rewrites_it_with_epochs(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    rows = _legacy_training(folder, steps=1)
    assert folder.csv_path("training").read_text() == "step,trained_task,key,value\n0,a,epochs_run,3\n0,a,train_loss_last,0.25\n"
    results = Results(folder)
    results.restore(rows)
    results.add_training(1, "a", {"epochs_run": 1.0}, EPOCHS[:1])
    results.save()
    assert folder.csv_path("training").read_text() == (
        "step,trained_task,epoch,key,value\n0,a,,epochs_run,3\n0,a,,train_loss_last,0.25\n1,a,,epochs_run,1\n"
        "1,a,0,loss,0.5\n1,a,0,loss/st,0.25\n1,a,0,val_loss,0.75\n1,a,0,lr,0.01\n")
    again = Results(folder)  # killed after that save, before the next checkpoint: the old rows still match
    again.restore(rows)
    assert again.training[0] == {"step": 0, "trained_task": "a", "key": "epochs_run", "value": 3.0, "epoch": None}

    _legacy_training(folder, steps=1)
    folder.csv_path("training").write_text("step,trained_task,key,value\n0,a,epochs_run,4\n")
    with pytest.raises(ConfigError, match=re.escape(f"{folder.csv_path('training')}: does not match checkpoint.pt")):
        Results(folder).restore(rows)


def test_legacy_checkpoint_without_rows_reads_an_older_training_csv(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    _legacy_training(folder, steps=2)
    results = Results(folder)
    results.load_csv(completed_step=0, tasks=["a"])
    assert [(r["step"], r["key"]) for r in results.training] == [(0, "epochs_run"), (0, "train_loss_last")]
    results.save()
    assert folder.csv_path("training").read_text().splitlines()[:2] == ["step,trained_task,epoch,key,value",
                                                                      "0,a,,epochs_run,3"]


# -- the layout ------------------------------------------------------------------------------------
def test_readme_results_table_lists_exactly_the_run_folder_files() -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Results"):]
    section = section[: section.index("\n## ", 1)]
    listed = {m.rstrip("/") for m in re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)}
    owned = {rundir.CONFIG, rundir.ENV, rundir.SUMMARY, rundir.PLOTS, rundir.CHECKPOINT, rundir.FINGERPRINT,
             rundir.MARKER, rundir.LOCK, rundir.PROBE_MAPS, rundir.TENSORBOARD, rundir.TRACKERS_STATE,
             *(table.file for table in rundir.TABLES.values())}
    assert listed == owned
    for table in rundir.TABLES.values():
        assert f"`{', '.join(table.columns)}`" in section, table.file


def test_no_module_names_a_run_folder_file_but_rundir() -> None:
    """Reading or writing a run's files goes through RunFolder: no other engine, sweep, reporting or
    CLI module builds a path from a run file's literal name."""
    names = ["config.yaml", "env.json", "summary.json", "checkpoint.pt", "data_fingerprint.json", ".clbench-run.json",
             *(table.file for table in rundir.TABLES.values())]
    pattern = re.compile(r"""/\s*["'](%s)["']""" % "|".join(re.escape(n) for n in names))
    offenders = []
    for path in (REPO / "clbench").rglob("*.py"):
        if path.name != "rundir.py":
            offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    assert offenders == []
