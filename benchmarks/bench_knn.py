"""Throughput of exact nearest-neighbour search: faiss IndexFlatL2 vs torch.cdist + topk vs anomalib
2.7.0's PatchCore search (``PatchcoreModel.nearest_neighbors``: BLAS expansion + min/topk).

Run:  python benchmarks/bench_knn.py [--bank 30000] [--dim 1536] [--images 8] [--patches 784] [--k 1]

The PatchCore scoring workload: the 784 patches (28x28 grid at 224 px) of each of ``--images``
test images searched at once against one bank (seed 003's 30,000 x 1536 at the full budget).
Prints patches/s for each (best of ``--reps``; index construction timed separately) and checks
that faiss agrees with both (distances within 1e-3; index disagreements are near-ties).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

warnings.filterwarnings("ignore", category=FutureWarning)  # anomalib's import-time deprecations
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import best_of  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from clbench.features.knn import FlatL2Index, knn_torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=30_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--patches", type=int, default=784)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    bank = torch.randn(args.bank, args.dim, generator=g).relu().to(device)
    queries = torch.randn(args.images * args.patches, args.dim, generator=g).relu().to(device)
    n = queries.shape[0]
    print(f"{n:,} queries ({args.images} images x {args.patches} patches) vs bank {args.bank:,} x {args.dim}, "
          f"k={args.k}, {args.device}, {torch.get_num_threads()} threads")

    t_build, index = best_of(1, lambda: FlatL2Index(bank))
    t_faiss, (d_faiss, i_faiss) = best_of(args.reps, lambda: index.search(queries, args.k))
    t_torch, (d_torch, i_torch) = best_of(args.reps, lambda: knn_torch(queries, bank, args.k))
    owner = SimpleNamespace(memory_bank=bank, euclidean_dist=PatchcoreModel.euclidean_dist)
    t_anomalib, (d_anomalib, _) = best_of(args.reps, lambda: PatchcoreModel.nearest_neighbors(owner, queries, args.k))
    d_anomalib = d_anomalib.view(n, -1)
    print(f"faiss IndexFlatL2 ({'GPU' if index.gpu else 'CPU'}): {n / t_faiss:12,.0f} patches/s  ({t_faiss:.3f} s; index build {t_build:.3f} s)")
    print(f"torch cdist+topk       : {n / t_torch:12,.0f} patches/s  ({t_torch:.3f} s)")
    print(f"anomalib 2.7.0         : {n / t_anomalib:12,.0f} patches/s  ({t_anomalib:.3f} s)")
    print(f"faiss / cdist          : x{t_torch / t_faiss:.2f}")
    print(f"faiss / anomalib       : x{t_anomalib / t_faiss:.2f}")

    gap = max((d_faiss[:, 0] - d_torch[:, 0]).abs().max().item(), (d_faiss[:, 0] - d_anomalib[:, 0]).abs().max().item())
    differ = (i_faiss[:, 0] != i_torch[:, 0]).sum().item()
    print(f"agreement: max |distance difference| {gap:.2e}, nearest indices differ for {differ} of {n:,} queries")
    return 0 if gap < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
