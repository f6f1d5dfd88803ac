"""Greedy k-center coreset: the same picks as anomalib 2.7.0's ``KCenterGreedy`` (on its own
projection, and unprojected for the same seed), covering radius within 10% of anomalib's,
brute-force agreement, uniqueness, determinism, coverage vs random subsets, and the JL projection's
dimension against sklearn and anomalib."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib.models.components.dimensionality_reduction import SparseRandomProjection as AnomalibProjection
from anomalib.models.components.sampling import KCenterGreedy
from sklearn.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim

from clbench.features.coreset import (
    coreset_indices,
    covering_radius,
    greedy_k_center,
    jl_min_dim,
    nearest_center_distances,
    random_projection,
    seeded_start,
    sparse_random_matrix,
)


def brute_force_greedy(x: np.ndarray, k: int, start: int) -> list[int]:
    """Textbook Gonzalez greedy in float64 with a plain loop over points."""
    selected = [start]
    while len(selected) < k:
        best, best_distance = -1, -1.0
        for i in range(len(x)):
            if i in selected:
                continue
            nearest = min(float(np.sum((x[i] - x[j]) ** 2)) for j in selected)
            if nearest > best_distance:
                best, best_distance = i, nearest
        selected.append(best)
    return selected


def clustered(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Non-negative, clustered points: closer to CNN patch features than isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(8, d, generator=g) * 4
    return (centres[torch.randint(8, (n,), generator=g)] + torch.randn(n, d, generator=g)).relu()


def test_matches_brute_force_greedy_without_projection() -> None:
    x = clustered(120, 6, seed=1)
    for start in (0, 37):
        ours = greedy_k_center(x, 15, start=start).tolist()
        assert ours == brute_force_greedy(x.double().numpy(), 15, start)


def anomalib_picks(x: torch.Tensor, k: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """anomalib's selection (its random start drawn from the global generator seeded with ``seed``)
    and the points it ran the greedy loop on (its projection of ``x``)."""
    torch.manual_seed(seed)
    sampler = KCenterGreedy(x, sampling_ratio=k / x.shape[0])
    return sampler.select_coreset_idxs(), sampler.features


def test_same_picks_as_anomalib_on_its_projection() -> None:
    x = low_rank(2000, 256, seed=2)  # 256 > JL dim 187: anomalib projects
    theirs, projected = anomalib_picks(x, 100, seed=0)
    assert projected.shape == (2000, jl_min_dim(2000)) and len(theirs) == 100
    assert greedy_k_center(projected, 100, start=theirs[0]).tolist() == theirs


def test_same_coreset_as_anomalib_without_projection() -> None:
    """anomalib skips its projection for non-2-D embeddings; the seeded start is the same draw."""
    x = clustered(1500, 24, seed=4)
    for seed in (0, 7):
        theirs, _ = anomalib_picks(x.unsqueeze(1), 60, seed)
        assert coreset_indices(x, 60, eps=None, seed=seed).tolist() == theirs


def test_covering_radius_within_10_percent_of_anomalib() -> None:
    """Different random projections pick different points: compare the k-center objective on the
    original features, as a mean over 3 seeds (one seed's radius mostly reflects its projection)."""
    x = low_rank(2000, 256, seed=3)
    ours = [covering_radius(x, coreset_indices(x, 100, seed=s)) for s in range(3)]
    theirs = [covering_radius(x, torch.tensor(anomalib_picks(x, 100, s)[0])) for s in range(3)]
    assert np.mean(ours) <= 1.10 * np.mean(theirs)


def test_coreset_without_projection_equals_plain_greedy() -> None:
    x = clustered(200, 5)
    index = coreset_indices(x, 20, eps=None, seed=3)
    assert index.tolist() == greedy_k_center(x, 20, start=seeded_start(200, 3)).tolist()


def test_indices_unique_in_range_and_deterministic() -> None:
    x = clustered(3000, 64)
    a = coreset_indices(x, 300, seed=5)
    b = coreset_indices(x, 300, seed=5)
    c = coreset_indices(x, 300, seed=6)
    assert a.dtype == torch.long and a.shape == (300,)
    assert len(set(a.tolist())) == 300 and 0 <= int(a.min()) and int(a.max()) < 3000
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unique_even_with_duplicate_points() -> None:
    x = torch.ones(10, 4)
    x[5:] = 2.0
    index = greedy_k_center(x, 8, start=0)
    assert len(set(index.tolist())) == 8


def test_k_at_least_n_keeps_everything() -> None:
    x = torch.randn(7, 3)
    assert coreset_indices(x, 7).tolist() == list(range(7))
    assert coreset_indices(x, 100).tolist() == list(range(7))


def low_rank(n: int, d: int, rank: int = 3, seed: int = 0) -> torch.Tensor:
    """Points near a ``rank``-dim subspace of R^d (patch features have low intrinsic dimension)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.01 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("d", [4, 256])  # 256 > JL dim for 2000 points (187): projected
def test_greedy_covers_better_than_random_subsets(d: int) -> None:
    x = low_rank(2000, d, seed=2)
    k = 100
    greedy = covering_radius(x, coreset_indices(x, k, seed=0))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        random_subset = torch.randperm(2000, generator=g)[:k]
        assert greedy <= covering_radius(x, random_subset)


def test_covering_radius_matches_cdist() -> None:
    x = clustered(500, 16)
    centres = torch.tensor([0, 10, 99, 250])
    expected = torch.cdist(x.double(), x[centres].double()).min(dim=1).values
    torch.testing.assert_close(nearest_center_distances(x, x[centres]).double(), expected, rtol=1e-4, atol=1e-4)
    assert covering_radius(x, centres) == pytest.approx(float(expected.max()), rel=1e-5)


@pytest.mark.parametrize("n", [1000, 50_000, 300_000])
def test_projection_dimension_matches_sklearn(n: int) -> None:
    expected = int(johnson_lindenstrauss_min_dim(n, eps=0.9))
    assert jl_min_dim(n, 0.9) == expected
    matrix = sparse_random_matrix(1536, expected, seed=0)
    assert matrix.shape == (1536, expected)
    assert AnomalibProjection(eps=0.9)._johnson_lindenstrauss_min_dim(n, eps=0.9) == expected
    if n == 1000:  # sklearn's own transformer agrees (it needs the data; keep that one small)
        data = np.zeros((n, 1536), dtype=np.float32)
        assert SparseRandomProjection(eps=0.9, random_state=0).fit(data).n_components_ == expected
        assert random_projection(torch.from_numpy(data), eps=0.9).shape == (n, expected)


def test_sparse_matrix_density_and_scale_follow_sklearn_rule() -> None:
    d, k = 1536, 250
    matrix = sparse_random_matrix(d, k, seed=1)
    density = 1 / np.sqrt(d)
    nonzero = matrix != 0
    assert abs(nonzero.float().mean().item() - density) < 0.1 * density
    values = matrix[nonzero].abs().unique()
    assert values.numel() == 1 and values.item() == pytest.approx(np.sqrt(1 / density) / np.sqrt(k), rel=1e-6)
    reference = AnomalibProjection(eps=0.9)  # anomalib's matrix: (k, d), the same entries' law
    reference.n_components = k
    theirs = reference._sparse_random_matrix(n_features=d)
    assert theirs[theirs != 0].abs().unique().item() == pytest.approx(values.item(), rel=1e-6)
    assert abs((theirs != 0).float().mean().item() - nonzero.float().mean().item()) < 0.1 * density
    signs = matrix[nonzero].sign()
    assert abs(signs.mean().item()) < 0.05
    assert torch.equal(matrix, sparse_random_matrix(d, k, seed=1))


def test_projection_is_skipped_when_it_would_not_reduce() -> None:
    x = torch.randn(50, 8)  # JL dim for 50 points (~96) > 8 features
    assert torch.equal(random_projection(x), x)
