"""Time clbench's greedy k-center coreset against anomalib 2.7.0's ``KCenterGreedy`` on the same inputs.

Run:  python benchmarks/bench_coreset.py [--n 20000] [--dim 1536] [--k 2000] [--data patches|gaussian]

Both run the whole selection (sparse random projection with eps 0.9 included) from the same seed:
anomalib draws its random start from the global generator (``torch.manual_seed(seed)``), clbench
from a generator seeded with the seed, which is the same draw. Printed: best-of-``--reps`` seconds
for each, the speed-up, and the covering radius of each selection (max over all points of the
distance to the nearest selected point) on the original, unprojected features.

A consistency check runs clbench's loop on anomalib's projected points from anomalib's start: it
must pick the same points (up to float near-ties late in a long run). As one seed's radius mostly
reflects its random projection, the radii are then compared as means over ``--seeds`` seeds; the
exit status is 0 when clbench's mean is within ``--tolerance`` (default 2%) of anomalib's.

glibc: anomalib's loop allocates a large temporary per centre and keeps a small index tensor; with
glibc's dynamic mmap threshold the large blocks then come from the heap and the small live ones pin
it, so resident memory grows by about half a temporary per centre (measured: ~20 GB at 20,000 x
1536 -> 2,000 on a 23 GB machine, killed). The script fixes the threshold at 128 KiB (``mallopt``,
as ``MALLOC_MMAP_THRESHOLD_=131072`` would), which removes the growth and does not slow either side.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's per-centre progress bar
_LIBC = ctypes.util.find_library("c")
if _LIBC and hasattr(ctypes.CDLL(_LIBC), "mallopt"):
    ctypes.CDLL(_LIBC).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: see the docstring (glibc)
warnings.filterwarnings("ignore", category=FutureWarning)  # anomalib's import-time deprecations

import numpy as np  # noqa: E402
import torch  # noqa: E402
from anomalib.models.components.sampling import KCenterGreedy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import best_of  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from clbench.features.coreset import coreset_indices, covering_radius, greedy_k_center  # noqa: E402


def anomalib_coreset(features: torch.Tensor, k: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """anomalib's selection and the projected points it ran on."""
    torch.manual_seed(seed)
    sampler = KCenterGreedy(features, sampling_ratio=k / features.shape[0])
    return sampler.select_coreset_idxs(), sampler.features


def make_features(n: int, dim: int, kind: str, seed: int) -> torch.Tensor:
    """``patches``: non-negative, clustered, low intrinsic dimension (like pooled CNN features:
    40 modes, each a rank-16 family, ReLU); ``gaussian``: isotropic noise (the hardest case)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, dim, generator=g)
    modes = torch.randn(40, dim, generator=g).relu()
    bases = torch.randn(40, 16, dim, generator=g) * 0.3
    which = torch.randint(40, (n,), generator=g)
    coefficients = torch.randn(n, 16, generator=g)
    out = torch.empty(n, dim)
    for begin in range(0, n, 4096):
        w, c = which[begin : begin + 4096], coefficients[begin : begin + 4096]
        block = modes[w] + torch.einsum("nr,nrd->nd", c, bases[w])
        out[begin : begin + 4096] = (block + 0.05 * torch.randn(block.shape, generator=g)).relu()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--data", choices=["patches", "gaussian"], default="patches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=1, help="timing runs per implementation (best of)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the mean covering radius (1: this seed only)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed relative excess of clbench's mean radius")
    args = parser.parse_args()

    features = make_features(args.n, args.dim, args.data, args.seed)
    print(f"{args.n:,} x {args.dim} float32 '{args.data}' features -> {args.k:,} centres, seed {args.seed}, "
          f"{torch.get_num_threads()} threads, best of {args.reps}")

    t_ours, ours = best_of(args.reps, lambda: coreset_indices(features, args.k, seed=args.seed))
    print(f"clbench  : {t_ours:8.2f} s")
    t_ref, (ref, ref_projected) = best_of(args.reps, lambda: anomalib_coreset(features, args.k, args.seed))
    print(f"anomalib : {t_ref:8.2f} s   (KCenterGreedy, anomalib 2.7.0)")
    print(f"speed-up : x{t_ref / t_ours:.1f}")

    same = greedy_k_center(ref_projected, args.k, start=ref[0]).tolist()
    agree = next((i for i, (a, b) in enumerate(zip(same, ref)) if a != b), len(ref))
    print(f"same projection and start: clbench's loop reproduces anomalib's first {agree:,} of {len(ref):,} picks")

    radii_ours = [covering_radius(features, ours)]
    radii_ref = [covering_radius(features, torch.tensor(ref))]
    for seed in range(args.seed + 1, args.seed + args.seeds):
        radii_ours.append(covering_radius(features, coreset_indices(features, args.k, seed=seed)))
        radii_ref.append(covering_radius(features, torch.tensor(anomalib_coreset(features, args.k, seed)[0])))
    for i, (a, b) in enumerate(zip(radii_ours, radii_ref)):
        print(f"  seed {args.seed + i}: covering radius clbench {a:.4f}, anomalib {b:.4f}")
    m_ours, m_ref = float(np.mean(radii_ours)), float(np.mean(radii_ref))
    ok = m_ours <= (1 + args.tolerance) * m_ref
    print(f"mean over {len(radii_ours)} seed(s): clbench {m_ours:.4f}, anomalib {m_ref:.4f}, ratio {m_ours / m_ref:.4f} "
          f"({'within' if ok else 'WORSE than'} {args.tolerance:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
