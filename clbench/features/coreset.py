"""Greedy k-center coreset selection (minimax facility location) with a sparse random projection.

PatchCore (Roth et al., 2022, Alg. 1) shrinks a memory bank to a coreset whose elements cover the
original points: greedily add the point farthest from the centres chosen so far (Gonzalez's
2-approximation of the k-center problem). Distances are computed on a Johnson-Lindenstrauss
sparse random projection of the features (eps = 0.9 in PatchCore and seed 003), which preserves
pairwise distances well enough for the argmax while making each step ~6x cheaper at 1536 dims.

General purpose: nothing here knows about PatchCore. Choices made where the papers are vague:

* The first centre is a seeded random index and is *part of* the coreset (Gonzalez's algorithm),
  as in anomalib 2.7.0's ``KCenterGreedy`` (older anomalib releases left their random start out).
  Given the same points and start the two select the same points in the same order, and for the
  same seed the start is the same draw (``torch.randint`` on a generator seeded with it): tested
  against the library in tests/test_coreset.py. The paper's code (clad ``get_coreset_idx_randomp``)
  starts at index 0, projects with an unseeded sklearn ``SparseRandomProjection`` and runs the
  loop in float16 on a GPU.
* The projection target dimension is sklearn's ``johnson_lindenstrauss_min_dim(n, eps)`` (anomalib's
  formula too); when it is not smaller than the feature dimension (tiny inputs) the features are
  used unprojected, where sklearn would raise and anomalib would project *up*.
* The projection matrix follows sklearn's/anomalib's ``SparseRandomProjection`` density rule
  (Li et al., 2006: density 1/sqrt(n_features), entries +-sqrt(1/density)/sqrt(n_components)),
  drawn with a seeded torch generator on the CPU so it is the same on every device.

Speed (see benchmarks/bench_coreset.py): the greedy loop keeps everything in torch and float32,
stores the projected points transposed (d, N) so the per-centre product is one BLAS gemv over
contiguous memory, uses the expansion ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 with precomputed
norms (points are centred first, which keeps the expansion's cancellation error small for
non-negative CNN features), updates the running minimum in place and never leaves the device
inside the loop (no ``.item()``), so one iteration is a handful of kernel launches on a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_EPS = 0.9  # PatchCore's and seed 003's JL distortion for coreset selection


def jl_min_dim(n_samples: int, eps: float = DEFAULT_EPS) -> int:
    """Johnson-Lindenstrauss target dimension for ``n_samples`` points: sklearn's
    ``johnson_lindenstrauss_min_dim`` formula, written out because importing scikit-learn for it
    costs a PatchCore run about 1 s (tests/test_coreset.py checks it equals sklearn's)."""
    if not 0 < eps < 1 or n_samples <= 0:
        raise ValueError(f"jl_min_dim: needs 0 < eps < 1 and n_samples > 0, got eps={eps}, n_samples={n_samples}")
    return int(4 * np.log(np.float64(n_samples)) / (eps**2 / 2 - eps**3 / 3))


def sparse_random_matrix(
    n_features: int, n_components: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n_features, n_components) very sparse random projection matrix, stored dense.

    Each entry is non-zero with probability ``density = 1 / sqrt(n_features)`` and then
    +-sqrt(1 / density) / sqrt(n_components) with equal probability (sklearn's "auto" density).
    Stored dense: a dense GEMM beats sparse kernels at these sizes and works on every device.
    """
    if n_features < 1 or n_components < 1:
        raise ValueError(f"sparse_random_matrix: need positive sizes, got {n_features}x{n_components}")
    generator = torch.Generator().manual_seed(seed)
    density = 1.0 / n_features**0.5
    nonzero = torch.rand(n_features, n_components, generator=generator) < density
    sign = torch.randint(0, 2, (n_features, n_components), generator=generator, dtype=torch.int8) * 2 - 1
    scale = (1.0 / density) ** 0.5 / n_components**0.5
    matrix = nonzero.float() * sign.float() * scale
    return matrix.to(device)


def random_projection(features: torch.Tensor, *, eps: float = DEFAULT_EPS, seed: int = 0) -> torch.Tensor:
    """(N, D) -> (N, jl_min_dim(N, eps)) float32; the input itself when that is not smaller than D."""
    n, d = features.shape
    target = jl_min_dim(n, eps) if n > 1 else d
    if target >= d:
        return features.float()
    matrix = sparse_random_matrix(d, target, seed=seed, device=features.device)
    return features.float() @ matrix


def seeded_start(n: int, seed: int) -> int:
    """The first centre: a random index drawn from a generator seeded with ``seed``."""
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)).item())


def greedy_k_center(features: torch.Tensor, k: int, *, start: int = 0) -> torch.Tensor:
    """Indices (k,) int64 of a greedy k-center selection on ``features`` (N, d), starting at ``start``.

    Exact greedy (ties: lowest index, as ``argmax``): centre i+1 is the point with the largest
    squared distance to its nearest centre among 0..i. Selected points get -inf so they are never
    picked again, even with duplicate points. ``k >= N`` returns every index in order 0..N-1.
    """
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    if not 0 <= start < n:
        raise ValueError(f"greedy_k_center: start {start} out of range 0..{n - 1}")
    x = features.float()
    x = x - x.mean(dim=0, keepdim=True)
    points = x.t().contiguous()  # (d, N): the per-centre gemv reads contiguous memory
    norms = points.square().sum(dim=0)  # (N,)
    min_sq = torch.full((n,), float("inf"), device=x.device)
    distance_sq = torch.empty(n, device=x.device)
    selected = torch.empty(k, dtype=torch.long, device=x.device)
    index = torch.tensor([start], device=x.device)
    for i in range(k):
        selected[i : i + 1] = index
        centre = points.index_select(1, index).squeeze(1)  # (d,)
        # ||x||^2 - 2 x.c + ||c||^2, fused into one gemv with beta = 1
        torch.addmv(norms, points.t(), centre, alpha=-2.0, out=distance_sq)
        distance_sq += norms.index_select(0, index)
        torch.minimum(min_sq, distance_sq, out=min_sq)
        min_sq.index_fill_(0, index, float("-inf"))  # never picked again
        index = min_sq.argmax().view(1)
    return selected


def coreset_indices(
    features: torch.Tensor, k: int, *, eps: float | None = DEFAULT_EPS, seed: int = 0
) -> torch.Tensor:
    """Indices (k,) of a greedy k-center coreset of ``features`` (N, D): seeded, deterministic.

    ``eps``: JL distortion of the sparse random projection used for the distances (None: no
    projection). The seed draws both the projection and the first centre.
    """
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    reduced = features.float() if eps is None else random_projection(features, eps=eps, seed=seed)
    return greedy_k_center(reduced, k, start=seeded_start(n, seed))


def nearest_center_distances(
    features: torch.Tensor, centers: torch.Tensor, *, chunk: int = 8192
) -> torch.Tensor:
    """(N,) Euclidean distance of every point to its nearest centre (float32, chunked over points)."""
    shift = features.float().mean(dim=0, keepdim=True)  # centring: smaller cancellation error
    c = centers.float() - shift
    c_norms = c.square().sum(dim=1)
    out = torch.empty(features.shape[0], device=features.device)
    for begin in range(0, features.shape[0], chunk):
        x = features[begin : begin + chunk].float() - shift
        nearest = (c_norms - 2.0 * (x @ c.t())).argmin(dim=1)  # ||x||^2 is constant per row
        # exact distance to the chosen centre: no sqrt-amplified cancellation error near 0
        out[begin : begin + chunk] = torch.linalg.vector_norm(x - c[nearest], dim=1)
    return out


def covering_radius(features: torch.Tensor, indices: torch.Tensor, *, chunk: int = 8192) -> float:
    """Max over points of the distance to the nearest selected point: the k-center objective."""
    return float(nearest_center_distances(features, features[indices], chunk=chunk).max())


__all__ = [
    "DEFAULT_EPS",
    "jl_min_dim",
    "sparse_random_matrix",
    "random_projection",
    "seeded_start",
    "greedy_k_center",
    "coreset_indices",
    "nearest_center_distances",
    "covering_radius",
]
