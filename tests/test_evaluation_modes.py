"""Task-aware (oracle) and task-agnostic evaluation, and task-identification accuracy: PatchCore scores
against the bank it is given, agnostic is what PatchCore routes to itself, the engine's
``task_id_accuracy`` rows equal a recount of every image's routing, a method that does not route gets
none, and the setting is validated."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clbench.data import Batch, ImageStore, load_category
from clbench.engine.config import ConfigError, RunConfig, load
from clbench.engine.evaluation import TASK_ID_METRIC, evaluate_all, task_id_summary, task_indices
from clbench.features.backbones import BackbonePool
from helpers import EMBED_DIMS, PATCHES, EmbeddingTable, KeyStream, engine_run, key_batch, write_category
from methods.base import AnomalyMethod, MethodContext, Prediction, TaskData
from methods.patchcore import PatchCore

POOL = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)
P, D = PATCHES, EMBED_DIMS
Table, Stream, make_batch = EmbeddingTable, KeyStream, key_batch


# -- PatchCore on hand-made embeddings ------------------------------------------------------------
def patchcore(table: Table) -> PatchCore:
    context = MethodContext(POOL, torch.device("cpu"), image_size=2, seed=0, progress=False)
    model = PatchCore(context, backbone="resnet18", sigma=0.0, batch_size=4, budget=60)
    model.register_buffer("memory_bank", torch.empty(0, D))
    model.embed = table.embed
    return model


def three_tasks() -> tuple[Table, PatchCore, list[list[str]]]:
    """Three tasks around (0, 0, 0), (4, 4, 4) and (8, 8, 8), spread 1.5."""
    g = torch.Generator().manual_seed(0)
    table = Table()
    train, test = [], []
    for j in range(3):
        for split, n, out in (("train", 10, train), ("test", 6, test)):
            keys = [f"t{j}/{split}/{i}" for i in range(n)]
            table.update(zip(keys, 4.0 * j + 1.5 * torch.randn(n, P, D, generator=g)))
            out.append(keys)
    model = patchcore(table)
    for j, keys in enumerate(train):
        model.fit_task(TaskData(j, (f"t{j}",), Stream(keys), val=None, seed=j))
    return table, model, test


def test_oracle_scores_against_the_given_bank_as_a_model_holding_only_that_bank() -> None:
    table, model, test = three_tasks()
    keys = test[0] + test[1] + test[2]
    routed = model.predict(make_batch(keys)).extras["task_index"]
    for j, bank in enumerate(model.banks()):
        by_hand = patchcore(table)  # a model that knows only bank j: nothing to choose
        by_hand.load_method_state({"memory_bank": bank.clone(), "bank_sizes": torch.tensor([len(bank)]),
                                   "bank_tasks": torch.tensor([1])})
        expected = by_hand.predict(make_batch(keys))
        given = model.predict(make_batch(keys, [j] * len(keys)))
        assert torch.equal(given.maps, expected.maps) and torch.equal(given.scores, expected.scores)
        assert torch.equal(given.extras["task_index"], routed)  # still its own routing, not the given index


def test_agnostic_is_the_routing_and_routing_errors_change_the_prediction() -> None:
    _, model, test = three_tasks()
    keys = test[0] + test[1] + test[2]
    agnostic = model.predict(make_batch(keys))
    routed = agnostic.extras["task_index"]
    assert routed.tolist() == [j for j in range(3) for _ in test[j]]  # separated tasks: routed right
    own = model.predict(make_batch(keys, routed.tolist()))  # told what it would choose anyway
    assert torch.equal(own.maps, agnostic.maps) and torch.equal(own.scores, agnostic.scores)
    truth = [0] * len(test[0]) + [0] * len(test[1]) + [2] * len(test[2])  # as if task 1's images were task 0's
    wrong = routed != torch.tensor(truth)
    oracle = model.predict(make_batch(keys, truth))
    assert torch.equal(oracle.scores[~wrong], agnostic.scores[~wrong])
    assert not torch.equal(oracle.scores[wrong], agnostic.scores[wrong])


def test_a_task_index_without_a_bank_is_one_line() -> None:
    _, model, test = three_tasks()
    with pytest.raises(ValueError, match=r"task index \[0, 3\] given, but only banks 0..2 are learned"):
        model.predict(make_batch(test[0][:2], [0, 3]))


# -- the engine -----------------------------------------------------------------------------------
def test_task_indices_are_the_teaching_steps() -> None:
    assert task_indices([("a",), ("b",), ("c",)]) == {"a": 0, "b": 1, "c": 2}
    assert task_indices([("a", "b", "c"), ("d",), ("e", "f")]) == {"a": 0, "b": 0, "c": 0, "d": 1, "e": 2, "f": 2}
    assert task_indices([("a", "b")]) == {"a": 0, "b": 0}  # joint


def test_task_id_summary_averages_only_taught_tasks() -> None:
    nan = math.nan
    R = np.array([[1.0, nan, nan], [0.5, 1.0, nan], [0.25, 0.75, 0.5]])
    summary = task_id_summary(R, ["a", "b", "c"], {"a": 0, "b": 1, "c": 2})
    assert summary["per_step"] == [1.0, 0.75, 0.5] and summary["acc"] == 0.5
    assert summary["final"] == {"a": 0.25, "b": 0.75, "c": 0.5}
    two_at_first = np.array([[1.0, 0.5, nan], [0.25, 0.75, 0.5]])  # a and b taught at step 0, c at step 1
    assert task_id_summary(two_at_first, ["a", "b", "c"], {"a": 0, "b": 0, "c": 1})["per_step"] == [0.75, 0.5]


def _tasks_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for j, name in enumerate(("alpha", "beta", "gamma")):
        write_category(root, name, n_train=4, size=32, seed=j)
    return root


def _recording(monkeypatch) -> list[dict]:
    """Every PatchCore.predict call of a run: the step (banks learned - 1), keys, given and routed index."""
    calls: list[dict] = []
    original = PatchCore.predict

    def predict(self, batch):
        prediction = original(self, batch)
        calls.append({"step": len(self.banks()) - 1, "keys": list(batch.keys), "given": batch.task_index,
                      "routed": prediction.extras["task_index"].tolist()})
        return prediction

    monkeypatch.setattr(PatchCore, "predict", predict)
    return calls


@pytest.fixture
def no_plots(monkeypatch) -> None:
    """Runs without their end-of-run plots (most of a tiny run's time; not what is tested here)."""
    from clbench.engine.runner import Experiment

    monkeypatch.setattr(Experiment, "_plots", lambda self: None)


def _patchcore_run(root: Path, out: Path, evaluation: str) -> pd.DataFrame:
    run = engine_run("patchcore", "sequential", {}, root, out, tasks=3, image_size=32, evaluation=evaluation,
                     name=evaluation, method_params={"backbone": "resnet18", "budget": 30})
    return pd.read_csv(run / "metrics.csv")


def test_engine_task_id_rows_recount_and_oracle_passes_taught_indices(tmp_path: Path, monkeypatch, no_plots) -> None:
    root = _tasks_root(tmp_path)
    tasks = ["alpha", "beta", "gamma"]
    recorded = _recording(monkeypatch)
    runs, calls = {}, {}
    for evaluation in ("agnostic", "oracle"):
        before = len(recorded)
        runs[evaluation] = _patchcore_run(root, tmp_path / "out", evaluation)
        calls[evaluation] = recorded[before:]

    for evaluation, metrics in runs.items():
        rows = metrics[metrics["metric"] == TASK_ID_METRIC]
        assert len(rows) == 3 * 3  # every (step, task): NaN for a task not yet taught
        for step in range(3):
            for j, task in enumerate(tasks):
                value = rows[(rows["step"] == step) & (rows["eval_task"] == task)]["value"].item()
                if j > step:
                    assert math.isnan(value)
                    continue
                routed = [r for c in calls[evaluation] if c["step"] == step
                          for k, r in zip(c["keys"], c["routed"]) if k.startswith(f"{task}/")]
                assert len(routed) == 4 and value == pytest.approx(sum(r == j for r in routed) / len(routed))

    for c in calls["agnostic"]:
        assert c["given"] is None
    for c in calls["oracle"]:
        task = tasks.index(c["keys"][0].split("/")[0])
        if task > c["step"]:
            assert c["given"] is None  # nothing taught to route to: evaluated as agnostic
        else:
            assert c["given"].tolist() == [task] * len(c["keys"])

    agnostic, oracle = (runs[e].set_index(["step", "eval_task", "metric"])["value"] for e in ("agnostic", "oracle"))
    # one bank (step 0) or a task not yet taught: nothing to choose, the settings agree
    for step, task in [(0, "alpha"), (0, "beta"), (0, "gamma"), (1, "gamma")]:
        assert agnostic.loc[(step, task, "pixel_auroc")] == oracle.loc[(step, task, "pixel_auroc")]
    # routing is the method's own under both settings
    pd.testing.assert_series_equal(agnostic.xs(TASK_ID_METRIC, level="metric"), oracle.xs(TASK_ID_METRIC, level="metric"))


def test_a_step_of_several_categories_gives_them_its_index(tmp_path: Path, monkeypatch, no_plots) -> None:
    """Two categories taught at step 0, one at step 1: the task index is the teaching step (PatchCore's bank)."""
    calls = _recording(monkeypatch)
    run = engine_run("patchcore", "sequential", {}, _tasks_root(tmp_path), tmp_path / "out", image_size=32,
                     tasks=[["alpha", "beta"], ["gamma"]], evaluation="oracle",
                     method_params={"backbone": "resnet18", "budget": 30})
    given = {(c["step"], c["keys"][0].split("/")[0]): None if c["given"] is None else set(c["given"].tolist())
             for c in calls}
    assert given == {(0, "alpha"): {0}, (0, "beta"): {0}, (0, "gamma"): None,
                     (1, "alpha"): {0}, (1, "beta"): {0}, (1, "gamma"): {1}}
    rows = pd.read_csv(run / "metrics.csv").query("metric == @TASK_ID_METRIC")
    assert rows[rows["step"] == 0].set_index("eval_task")["value"].isna().to_dict() == \
        {"alpha": False, "beta": False, "gamma": True}


def test_routing_summary_is_final_mean_and_never_undefined(tmp_path: Path, no_plots) -> None:
    import json

    run = engine_run("patchcore", "sequential", {}, _tasks_root(tmp_path), tmp_path / "out", tasks=3, image_size=32,
                     method_params={"backbone": "resnet18", "budget": 30})
    summary = json.loads((run / "summary.json").read_text())
    task_id = summary["metrics"][TASK_ID_METRIC]
    metrics = pd.read_csv(run / "metrics.csv")
    rows = metrics[metrics["metric"] == TASK_ID_METRIC]
    final = rows[rows["step"] == 2]["value"]
    assert task_id["acc"] == pytest.approx(final.mean()) and len(task_id["per_step"]) == 3
    assert task_id["per_step"][0] == 1.0  # one bank: every image of the one taught task goes there
    assert "undefined_tasks" not in task_id


class Constant(AnomalyMethod):
    """A method with one model and no routing."""

    name = "constant"

    def fit_task(self, data: TaskData) -> None:
        pass

    def predict(self, batch: Batch) -> Prediction:
        self.seen.append(batch.task_index)
        n, size = len(batch), batch.masks.shape[-1]
        return Prediction(maps=torch.rand(n, size, size), scores=torch.rand(n))


def test_a_method_without_routing_gets_no_task_id_rows(tiny_root: Path) -> None:
    context = MethodContext(POOL, torch.device("cpu"), image_size=32, seed=0, progress=False)
    method = Constant(context)
    method.seen = []
    categories = [load_category(tiny_root, name) for name in ("alpha", "beta")]
    results = evaluate_all(method, categories, ImageStore(32), 3, progress=False,
                           taught={"alpha": 0, "beta": 1}, oracle=True)
    assert all(TASK_ID_METRIC not in values for values in results.values())
    assert {tuple(t.tolist()) for t in method.seen} == {(0, 0, 0), (0,), (1, 1, 1), (1,)}  # 4 images, batches of 3


def test_engine_padim_has_no_task_id_rows(tiny_root: Path, tmp_path: Path, no_plots) -> None:
    run = engine_run("padim", "sequential", {}, tiny_root, tmp_path / "out", image_size=32, evaluation="oracle",
                     method_params={"backbone": "resnet18"})
    metrics = pd.read_csv(run / "metrics.csv")
    assert TASK_ID_METRIC not in set(metrics["metric"]) and len(metrics)


# -- the setting ----------------------------------------------------------------------------------
def test_default_is_agnostic() -> None:
    assert RunConfig().evaluation == "agnostic"


def test_a_wrong_setting_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("evaluation: oracles\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message
    assert "evaluation" in message and "'oracles'" in message and "agnostic, oracle" in message
