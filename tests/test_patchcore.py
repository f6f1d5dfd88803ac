"""PatchCore: Algorithm 2's bank sizes, coreset subsets, task selection, eq. 7 by hand, resume,
seed 003's 184.3 MB, the embedding, and an end-to-end run through the engine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clbench.features.backbones import BackbonePool
from clbench.engine.config import RunConfig
from clbench.engine.runner import run_experiment
from methods.base import MethodContext, TaskData
from clbench.features.knn import FlatL2Index
from methods.patchcore import PatchCore, bank_targets, neighbourhood, patch_embedding

from helpers import EMBED_DIMS, PATCHES, EmbeddingTable, KeyStream

P, D = PATCHES, EMBED_DIMS
Table, FakeStream = EmbeddingTable, KeyStream


POOL = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)  # one resnet18 for all


def make_patchcore(table: Table, **params) -> PatchCore:
    context = MethodContext(POOL, torch.device("cpu"), image_size=2, seed=0, progress=False)
    params = {"backbone": "resnet18", "sigma": 0.0, "batch_size": 4} | params
    model = PatchCore(context, **params)
    model.register_buffer("memory_bank", torch.empty(0, D))  # fake embeddings are D-dimensional
    model.embed = table.embed
    return model


def fit(model: PatchCore, keys: list[str], step: int, names: tuple[str, ...] = ("t",)) -> None:
    model.fit_task(TaskData(step, names, FakeStream(keys), val=None, seed=step))


def task_tables(n_tasks: int, n_images: int, seed: int = 0, spread: float = 1.0) -> tuple[Table, list[list[str]]]:
    """Task j's patches around (10 j, 10 j, 10 j): clearly separated tasks."""
    g = torch.Generator().manual_seed(seed)
    table = Table()
    keys = [table.add(f"task{j}", 10.0 * j + spread * torch.randn(n_images, P, D, generator=g)) for j in range(n_tasks)]
    return table, keys


def rows(t: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in t.tolist()}


# -- Algorithm 2 ----------------------------------------------------------------------------------
def test_bank_targets_follow_algorithm_2() -> None:
    assert bank_targets([], 500, 120) == [120]
    assert bank_targets([120], 500, 120) == [60, 60]
    assert bank_targets([60, 60], 10, 120) == [40, 40, 10]  # a small new bank stays whole
    assert bank_targets([30, 60], 500, 120) == [30, 40, 40]  # and so does a small old one
    with pytest.raises(ValueError, match="smaller than the number of tasks"):
        bank_targets([1, 1], 5, 2)


def test_bank_sizes_shrink_to_budget_over_t_and_keep_subsets() -> None:
    budget, n_tasks = 120, 4
    table, keys = task_tables(n_tasks, n_images=50)  # 200 patches per task > budget
    model = make_patchcore(table, budget=budget)
    previous: list[torch.Tensor] = []
    for t in range(1, n_tasks + 1):
        fit(model, keys[t - 1], t - 1)
        sizes = model.bank_sizes.tolist()
        assert sizes == [budget // t] * t
        assert sum(sizes) <= budget and model.memory_bank.shape == (sum(sizes), D)
        banks = model.banks()
        for old, new in zip(previous, banks):  # re-subsampling keeps a subset of the old rows
            assert rows(new) <= rows(old) and len(rows(new)) == len(new)
        newest = torch.stack([table[k] for k in keys[t - 1]]).flatten(0, 1)
        assert rows(banks[-1]) <= rows(newest)
        previous = [b.clone() for b in banks]


def test_small_banks_are_kept_whole() -> None:
    table, keys = task_tables(2, n_images=5)  # 20 patches per task, budget 1000
    model = make_patchcore(table, budget=1000)
    fit(model, keys[0], 0)
    fit(model, keys[1], 1)
    assert model.bank_sizes.tolist() == [20, 20]
    expected = torch.cat([torch.stack([table[k] for k in ks]).flatten(0, 1) for ks in keys])
    assert torch.equal(model.memory_bank, expected)


def test_training_is_deterministic() -> None:
    table, keys = task_tables(2, n_images=40)
    banks = []
    for _ in range(2):
        model = make_patchcore(table, budget=50)
        fit(model, keys[0], 0)
        fit(model, keys[1], 1)
        banks.append(model.memory_bank)
    assert torch.equal(*banks)


def test_joint_step_makes_one_bank_and_routes_every_image_to_it() -> None:
    table, keys = task_tables(3, n_images=20)
    model = make_patchcore(table, budget=100)
    fit(model, keys[0] + keys[1] + keys[2], 0, names=("a", "b", "c"))
    assert model.bank_sizes.tolist() == [100] and model.bank_tasks.tolist() == [3]
    prediction = model.predict(next(FakeStream(keys[1]).batches(4)))
    assert prediction.extras["task_index"].tolist() == [0] * 4  # one bank of several categories: step 0's


# -- scoring --------------------------------------------------------------------------------------
def test_task_selection_picks_the_right_bank() -> None:
    table, keys = task_tables(3, n_images=10)
    model = make_patchcore(table, budget=60)
    for j in range(3):
        fit(model, keys[j], j)
    test_table, test_keys = task_tables(3, n_images=4, seed=1)
    model.embed = test_table.embed
    for j in range(3):
        prediction = model.predict(next(FakeStream(test_keys[j]).batches(4)))
        assert prediction.extras["task_index"].dtype == torch.long
        assert prediction.extras["task_index"].tolist() == [j] * 4
        assert prediction.maps.shape == (4, 2, 2) and prediction.scores.shape == (4,)
        assert float(prediction.maps.max()) < 5  # scored against its own task's bank


def test_image_score_reweighting_by_hand() -> None:
    bank = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 3.0]])
    model = make_patchcore(Table())
    model.load_method_state({"memory_bank": bank, "bank_sizes": torch.tensor([5]), "bank_tasks": torch.tensor([1])})
    test = torch.tensor([[[0.1, 0.0, 0.0], [0.0, 1.9, 0.0], [1.0, 0.2, 0.0], [0.0, 0.5, 0.0]]])
    model.embed = lambda batch: test
    prediction = model.predict(next(FakeStream(["x"]).batches(1)))

    x, b = test[0].double().numpy(), bank.double().numpy()
    distances = np.linalg.norm(x[:, None] - b[None], axis=2)  # (P, 5)
    patch_scores = distances.min(1)
    np.testing.assert_allclose(prediction.maps.numpy().ravel(), patch_scores, rtol=1e-5, atol=1e-6)
    worst = patch_scores.argmax()  # m_test* = [0, .5, 0] (0.5 from the origin)
    s_star, m_star = patch_scores[worst], distances[worst].argmin()
    support = np.argsort(np.linalg.norm(b - b[m_star], axis=1))[:3]  # m* and its 2 nearest: rows 0, 1, 2
    assert m_star == 0 and sorted(support.tolist()) == [0, 1, 2]
    d = np.linalg.norm(x[worst] - b[support], axis=1)
    expected = (1 - np.exp(d[0]) / np.exp(d).sum()) * s_star
    assert prediction.scores.item() == pytest.approx(expected, rel=1e-5)
    model.params["num_neighbors"] = 1  # anomalib's shortcut: the plain maximum
    assert model.predict(next(FakeStream(["x"]).batches(1))).scores.item() == pytest.approx(s_star, rel=1e-5)


def test_neighbourhood_puts_m_star_first_even_with_duplicates() -> None:
    bank = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 1.0], [9.0, 9.0], [1.0, 2.0]])
    index = FlatL2Index(bank)
    support = neighbourhood(index, bank, torch.tensor([1, 3]), 3)
    assert support[0].tolist() == [1, 0, 4]  # m* = row 1, then its duplicate row 0, then row 4
    assert support[1].tolist()[0] == 3 and 3 not in support[1].tolist()[1:]


def test_state_round_trip_and_memory_accounting() -> None:
    table, keys = task_tables(3, n_images=20)
    model = make_patchcore(table, budget=90)
    for j in range(3):
        fit(model, keys[j], j)
    state = model.state_dict()
    assert set(state) == {"memory_bank", "bank_sizes", "bank_tasks"}
    fresh = make_patchcore(table, budget=90)
    fresh.load_method_state(state)
    batch = next(FakeStream(keys[2][:4] + keys[0][:3]).batches(8))
    a, b = model.predict(batch), fresh.predict(batch)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.extras["task_index"], b.extras["task_index"])
    memory = model.memory_components()
    bank_bytes = 90 * D * 4
    assert memory["method_state"] == bank_bytes + 2 * 3 * 8  # banks + two (3,) int64 bookkeeping rows
    assert memory["method_cache"] == bank_bytes  # faiss's copies of the banks


@pytest.mark.parametrize("key, value", [("score_weighting", "max"), ("aggregation", "none"), ("upsample_mode", "bicubic")])
def test_bad_choices_are_one_line_errors(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{key}='{value}' is not one of"):
        make_patchcore(Table(), **{key: value})


def test_predict_before_fit_is_an_error() -> None:
    model = make_patchcore(Table())
    with pytest.raises(RuntimeError, match="before any task"):
        model.predict(next(FakeStream(["x"]).batches(1)))


# -- embedding and memory -------------------------------------------------------------------------
def test_patch_embedding_pools_upsamples_and_concatenates() -> None:
    layer2, layer3 = torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)
    emb = patch_embedding([layer2, layer3])
    assert emb.shape == (2, 64, 12)
    pooled2 = torch.nn.AvgPool2d(3, 1, 1)(layer2)  # anomalib's feature pooler
    up3 = torch.nn.functional.interpolate(torch.nn.AvgPool2d(3, 1, 1)(layer3), size=(8, 8), mode="bilinear")
    expected = torch.cat([pooled2, up3], 1).permute(0, 2, 3, 1).reshape(2, 64, 12)
    torch.testing.assert_close(emb, expected)


def test_analytic_memory_reproduces_seed_003() -> None:
    memory = PatchCore.analytic_memory({"budget": 30000}, 224)  # default wide_resnet50_2, layer2+3
    assert memory["method_state/memory_bank"] == 30000 * 1536 * 4 == 184_320_000  # "184.3MB"
    assert PatchCore.analytic_memory({"budget": 30000}, 512)["method_state/memory_bank"] == 184_320_000
    small = PatchCore.analytic_memory({"backbone": "resnet18", "budget": 1000}, 64)
    assert small["method_state/memory_bank"] == 1000 * (128 + 256) * 4


@pytest.mark.slow
def test_end_to_end_through_the_engine(synthetic_root: Path, tmp_path: Path) -> None:
    """Three tasks of 11 training images x 64 patches (704): budget 1000 makes steps 1-2 subsample."""
    config = RunConfig(
        method="patchcore", data_root=str(synthetic_root), synthetic=False, tasks=3, image_size=64,
        weights="none", output_dir=str(tmp_path), device="cpu", method_params={"backbone": "resnet18", "budget": 1000},
    )
    run_dir = run_experiment(config, progress=False)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    task_id = metrics[metrics["metric"] == "task_id_accuracy"]
    order = {t: j for j, t in enumerate(sorted(task_id["eval_task"].unique()))}
    taught = task_id["eval_task"].map(order) <= task_id["step"]
    assert len(task_id) == 3 * 3 and task_id["value"][taught].between(0, 1).all()
    assert task_id["value"][~taught].isna().all()  # a task not yet taught has no right answer
    memory = pd.read_csv(run_dir / "memory.csv")
    state = memory[memory["component"] == "method_state"].sort_values("step")["bytes"].tolist()
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    sizes = saved["bank_sizes"].tolist()
    assert sizes == [333, 333, 333]
    assert saved["memory_bank"].shape == (999, 384)
    assert state[-1] == sum(t.numel() * t.element_size() for t in saved.values())
    assert state[0] == 704 * 384 * 4 + 2 * 8 and state[1] == 1000 * 384 * 4 + 2 * 2 * 8
