"""Exact kNN: faiss IndexFlatL2 against brute-force torch.cdist (distances not squared) and against
anomalib 2.7.0's PatchCore nearest-neighbour search."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from clbench.features.knn import FlatL2Index, knn_faiss, knn_torch


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 differences, no matmul expansion: the ground truth."""
    distances = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    values, indices = distances.topk(k, dim=1, largest=False, sorted=True)
    return values, indices


def untied(values: torch.Tensor, k: int, gap: float = 1e-3) -> torch.Tensor:
    """Rows whose k+1 nearest distances are separated (where indices must agree)."""
    return (values[:, 1 : k + 1] - values[:, :k] > gap).all(dim=1)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_matches_brute_force(backend: str, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    bank = torch.randn(700, 24, generator=g)
    queries = torch.randn(300, 24, generator=g)
    search = knn_faiss if backend == "faiss" else knn_torch
    distances, indices = search(queries, bank, k)
    ref_values, ref_indices = brute_force(queries, bank, k + 1)
    assert distances.dtype == torch.float32 and indices.dtype == torch.long
    assert distances.shape == indices.shape == (300, k)
    torch.testing.assert_close(distances.double(), ref_values[:, :k], rtol=0, atol=1e-4)
    clear = untied(ref_values, k)
    assert clear.float().mean() > 0.9
    assert torch.equal(indices[clear], ref_indices[clear, :k])


def test_distances_are_euclidean_not_squared() -> None:
    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    distances, indices = knn_faiss(torch.tensor([[3.0, 4.0]]), bank, 2)
    assert distances.tolist() == [[5.0, pytest.approx(65**0.5)]]
    assert indices.tolist() == [[0, 1]]


def test_index_reuse_chunking_and_validation() -> None:
    bank = torch.randn(50, 8)
    index = FlatL2Index(bank)
    assert not index.gpu and index.ntotal == 50 and index.nbytes == 50 * 8 * 4
    queries = torch.randn(40, 8)
    d_faiss, i_faiss = index.search(queries, 2)
    d_torch, i_torch = knn_torch(queries, bank, 2, chunk_bytes=4 * 50 * 7)  # 7 rows per chunk
    torch.testing.assert_close(d_faiss, d_torch, rtol=0, atol=1e-4)
    assert torch.equal(i_faiss, i_torch)
    d_self, i_self = index.search(bank, 1)  # a bank row finds itself at ~0
    assert torch.equal(i_self[:, 0], torch.arange(50)) and float(d_self.max()) < 1e-2
    with pytest.raises(ValueError, match="k=51"):
        index.search(queries, 51)
    with pytest.raises(ValueError, match="dims"):
        index.search(torch.randn(2, 9), 1)


@pytest.mark.parametrize("k", [1, 9])
def test_matches_anomalib_patchcore_search(k: int) -> None:
    """anomalib's ``nearest_neighbors`` (BLAS expansion, min / topk) on the same bank and queries."""
    g = torch.Generator().manual_seed(10 + k)
    bank = torch.randn(600, 48, generator=g).relu()  # non-negative, like pooled CNN features
    queries = torch.randn(250, 48, generator=g).relu()
    owner = SimpleNamespace(memory_bank=bank, euclidean_dist=PatchcoreModel.euclidean_dist)
    theirs_d, theirs_i = PatchcoreModel.nearest_neighbors(owner, queries, n_neighbors=k)
    if k == 1:
        theirs_d, theirs_i = theirs_d.unsqueeze(1), theirs_i.unsqueeze(1)
    ours_d, ours_i = FlatL2Index(bank).search(queries, k)
    torch.testing.assert_close(ours_d, theirs_d, rtol=1e-4, atol=1e-4)
    ref_values, _ = brute_force(queries, bank, k + 1)
    clear = untied(ref_values, k)
    assert clear.float().mean() > 0.5 and torch.equal(ours_i[clear], theirs_i[clear])
