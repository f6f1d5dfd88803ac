"""PatchCore's streamed step (composable coreset, methods/patchcore.py docstring): a step that fits
under ``stream_bytes``, or has one category, gives today's bank bit for bit; a joint step past the
cap gives a bank of the budget's size, made of the step's patches, covering them within the
composable-coreset bound; and at most about the cap of patches is held at once."""
from __future__ import annotations

import pytest
import torch

import methods.patchcore as patchcore
from clbench.data import Batch
from clbench.engine import seeding
from clbench.features.backbones import BackbonePool
from clbench.features.coreset import coreset_indices, covering_radius
from methods.base import MethodContext, TaskData
from methods.patchcore import PatchCore, StreamedCoreset

from helpers import EmbeddingTable, InMemoryStream, KeyStream, smooth_batch

POOL = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None)
P, D = 4, 8  # patches per image, embedding dims of the tables below
ROW_BYTES = D * 4
BATCH = 4  # images per batch


def make_model(table: EmbeddingTable, **params) -> PatchCore:
    context = MethodContext(POOL, torch.device("cpu"), image_size=2, seed=0, progress=False)
    model = PatchCore(context, **({"backbone": "resnet18", "sigma": 0.0, "batch_size": BATCH} | params))
    model.register_buffer("memory_bank", torch.empty(0, D))
    model.embed = table.embed
    return model


def clustered(n_categories: int, n_images: int, seed: int = 0) -> tuple[EmbeddingTable, list[list[str]]]:
    """Category j's patches around 10 j on every axis (unit spread): clearly separated categories."""
    g = torch.Generator().manual_seed(seed)
    table = EmbeddingTable()
    keys = [table.add(f"cat{j}", 10.0 * j + torch.randn(n_images, P, D, generator=g)) for j in range(n_categories)]
    return table, keys


def all_patches(table: EmbeddingTable, keys: list[str]) -> torch.Tensor:
    return torch.stack([table[k] for k in keys]).flatten(0, 1)


def fit(model: PatchCore, keys: list[str], step: int, names: tuple[str, ...]) -> None:
    model.fit_task(TaskData(step, names, KeyStream(keys), val=None, seed=step))


def row_indices(patches: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Where each of ``rows`` is in ``patches`` (exact equality); fails if one is not there."""
    equal = (patches.unsqueeze(1) == rows.unsqueeze(0)).all(dim=2)  # (N, k)
    assert equal.any(dim=0).all(), "a bank row is not a patch of the step"
    return equal.int().argmax(dim=0)


def category_of(rows: torch.Tensor) -> set[int]:
    """The categories of ``clustered`` rows (category j lies around 10 j)."""
    return set(torch.round(rows.mean(dim=1) / 10).long().tolist())


def unstreamed(patches: torch.Tensor, size: int, seed: int, eps: float | None = 0.9) -> torch.Tensor:
    """Today's algorithm: one greedy coreset over every patch of the step."""
    return patches.index_select(0, coreset_indices(patches, size, eps=eps, seed=seed))


class Recording(StreamedCoreset):
    """Records the most patch bytes held between batches and the largest part it subsampled."""

    instances: list["Recording"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.peak_held, self.largest_part = 0, 0
        Recording.instances.append(self)

    def add(self, categories, patches) -> None:
        self.peak_held = max(self.peak_held, self.pending_bytes + patches.nelement() * patches.element_size())
        super().add(categories, patches)

    def compress(self, rows: torch.Tensor) -> None:
        self.largest_part = max(self.largest_part, rows.shape[0])
        super().compress(rows)


@pytest.fixture
def recording(monkeypatch) -> type[Recording]:
    Recording.instances = []
    monkeypatch.setattr(patchcore, "StreamedCoreset", Recording)
    return Recording


def test_one_category_step_is_todays_bank_whatever_the_cap(recording) -> None:
    table, keys = clustered(2, n_images=30)
    model = make_model(table, budget=40, stream_bytes=1)  # far below one category: still one part
    for step in range(2):
        fit(model, keys[step], step, (f"cat{step}",))
    step0, step1 = all_patches(table, keys[0]), all_patches(table, keys[1])
    bank0 = unstreamed(unstreamed(step0, 40, seeding.bank_seed(0, 0)), 20, seeding.bank_seed(1, 0))
    bank1 = unstreamed(step1, 20, seeding.bank_seed(1, 1))
    assert torch.equal(model.memory_bank, torch.cat([bank0, bank1]))
    assert not any(r.streamed for r in recording.instances)


def test_joint_step_under_the_cap_is_todays_bank() -> None:
    table, keys = clustered(3, n_images=10)
    patches = all_patches(table, sum(keys, []))
    model = make_model(table, budget=25, stream_bytes=patches.nelement() * 4)  # exactly fits
    fit(model, sum(keys, []), 0, ("cat0", "cat1", "cat2"))
    assert torch.equal(model.memory_bank, unstreamed(patches, 25, seeding.bank_seed(0, 0)))


@pytest.mark.parametrize("cap_rows", [120, 50])  # one category's rows; under half of one (chunked)
def test_joint_step_streams_within_the_composable_bound(recording, cap_rows: int) -> None:
    """Bound (exact distances, projection off): a part's greedy radius <= 2 r*, the union's greedy
    radius <= 2 r*, so the bank covers every patch within 4 r* <= 4 x the greedy radius on all
    patches (r* <= any k-subset's radius). 4 is what the composition guarantees, not a margin."""
    n_categories, n_images, budget = 4, 30, 40  # 120 patches per category
    table, keys = clustered(n_categories, n_images)
    step_keys = sum(keys, [])
    patches = all_patches(table, step_keys)
    model = make_model(table, budget=budget, projection_eps=None, stream_bytes=cap_rows * ROW_BYTES)
    fit(model, step_keys, 0, tuple(f"cat{j}" for j in range(n_categories)))

    (stream,) = recording.instances
    assert stream.streamed
    bank = model.memory_bank
    assert bank.shape == (budget, D) and model.bank_sizes.tolist() == [budget]
    indices = row_indices(patches, bank)  # every row an actual patch of the step
    assert len(set(indices.tolist())) == budget
    every = torch.arange(len(patches))
    streamed_radius = covering_radius(patches, indices)
    greedy_radius = covering_radius(patches, coreset_indices(patches, budget, eps=None, seed=seeding.bank_seed(0, 0)))
    assert streamed_radius <= 4 * greedy_radius
    # the bound can fail: a bank that leaves out one category (a lost part) is far outside it
    first_three = every[: 3 * n_images * P]
    lost_part = first_three[coreset_indices(patches[first_three], budget, eps=None, seed=0)]
    assert covering_radius(patches, lost_part) > 4 * greedy_radius


@pytest.mark.parametrize("cap_rows", [120, 50])
def test_joint_step_holds_about_one_part_at_once(recording, cap_rows: int) -> None:
    n_categories, n_images = 4, 30
    table, keys = clustered(n_categories, n_images)
    cap = cap_rows * ROW_BYTES
    model = make_model(table, budget=40, stream_bytes=cap)
    fit(model, sum(keys, []), 0, tuple(f"cat{j}" for j in range(n_categories)))
    (stream,) = recording.instances
    step_rows, category_rows, batch_bytes = n_categories * n_images * P, n_images * P, BATCH * P * ROW_BYTES
    assert stream.peak_held <= cap + batch_bytes < step_rows * ROW_BYTES // 2
    assert stream.largest_part <= min(category_rows, cap_rows + BATCH * P)
    # a part per category, or per chunk of about the cap (whole images), never mixing categories
    assert all(len(category_of(s)) == 1 for s in stream.selections)
    if cap_rows >= category_rows:
        assert [category_of(s).pop() for s in stream.selections] == list(range(n_categories))
    else:
        assert len(stream.selections) >= -(-step_rows // (cap_rows + BATCH * P))


def test_replayed_images_are_parts_of_their_own(recording) -> None:
    """Replay's batches: the current category's images, then replayed ones of earlier categories."""
    table, keys = clustered(3, n_images=30)
    mixed = []
    for i in range(0, 30, 2):
        mixed += keys[2][i : i + 2] + keys[(i // 2) % 2][i : i + 2]
    model = make_model(table, budget=30, batch_size=4, stream_bytes=40 * ROW_BYTES)
    fit(model, mixed, 0, ("cat2",))
    (stream,) = recording.instances
    assert stream.streamed and model.memory_bank.shape == (30, D)
    row_indices(all_patches(table, mixed), model.memory_bank)
    # parts: cat2 (current), cat0 and cat1 (replayed), each subsampled on its own
    assert all(len(category_of(s)) == 1 for s in stream.selections)
    assert set().union(*map(category_of, stream.selections)) == {0, 1, 2}


def test_streamed_bank_is_deterministic_and_real_backbone_patches() -> None:
    """resnet18 (random init) at 32 px, two categories, a cap of one image's patches."""
    context = MethodContext(BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=None),
                            torch.device("cpu"), image_size=32, seed=0, progress=False)
    parts = [smooth_batch(4, seed, 32, task=name) for seed, name in enumerate(("alpha", "beta"))]
    batch = Batch(torch.cat([p.pixels for p in parts]), parts[0].keys + parts[1].keys,
                  torch.cat([p.labels for p in parts]), torch.cat([p.masks for p in parts]))
    banks = []
    for _ in range(2):
        model = PatchCore(context, backbone="resnet18", budget=20, batch_size=2, stream_bytes=16 * 384 * 4)
        model.fit_task(TaskData(0, ("alpha", "beta"), InMemoryStream(batch), val=None, seed=5))
        banks.append(model.memory_bank)
    every = model.embed(batch).flatten(0, 1)
    assert torch.equal(banks[0], banks[1]) and banks[0].shape == (20, 384)
    row_indices(every, banks[0])
