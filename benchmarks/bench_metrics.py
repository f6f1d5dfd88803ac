"""Time clbench.metrics.anomaly against sklearn on a task-sized pixel test set.

Run:  python benchmarks/bench_metrics.py [--n 10000000] [--reps 3]

Times ``auroc`` vs ``sklearn.metrics.roc_auc_score`` on n float32 scores
with ~3% positives (continuous scores, then heavily tied scores), best of
``reps`` runs, checks the values agree within 1e-6; the same for ``f1_max``
vs the max of 2PR/(P+R) over ``sklearn.metrics.precision_recall_curve``;
then times ``aupro`` and ``pixel_metrics`` on (200, 224, 224) maps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import best_of  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from clbench.metrics.anomaly import aupro, auroc, f1_max, pixel_metrics  # noqa: E402


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """max 2PR/(P+R) over sklearn's precision-recall curve (P+R = 0 counts as 0)."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    num, den = 2 * precision * recall, precision + recall
    return float(np.max(np.divide(num, den, out=np.zeros_like(num), where=den != 0)))


def bench_pair(name: str, ours_fn, ref_fn, scores: np.ndarray, labels: np.ndarray, reps: int) -> bool:
    """Print both timings and the speed-up; return whether the values agree."""
    t_ours, ours = best_of(reps, lambda: ours_fn(scores, labels))
    t_sk, ref = best_of(reps, lambda: ref_fn(labels, scores))
    agree = abs(ours - ref) <= 1e-6
    print(
        f"{name} n={scores.size:,}: clbench {t_ours:.3f} s, sklearn {t_sk:.3f} s, "
        f"speed-up x{t_sk / t_ours:.1f}; values {ours:.9f} vs {ref:.9f} ({'agree' if agree else 'DIFFER'})"
    )
    return agree


def make_maps(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise maps with a few rectangular defects in half of the images."""
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for k in range(n // 2, n):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, h - 40, size=2)
            masks[k, r : r + rng.integers(5, 40), c : c + rng.integers(5, 40)] = 255
    maps = rng.standard_normal((n, h, w), dtype=np.float32)
    maps += np.float32(1.5) * (masks > 0)  # in place: stays float32
    return maps, masks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10**7, help="number of scores for the AUROC timing")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (best-of)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    labels = rng.random(args.n) < 0.03
    scores = (rng.standard_normal(args.n) + labels).astype(np.float32)
    tied = np.round(scores * 4).astype(np.float32)  # ~40 distinct values
    ok = True
    for kind, values in (("float32, continuous", scores), ("float32, heavy ties", tied)):
        ok &= bench_pair(f"auroc [{kind}]", auroc, roc_auc_score, values, labels, args.reps)
        ok &= bench_pair(f"f1_max [{kind}]", f1_max, sklearn_f1_max, values, labels, args.reps)

    maps, masks = make_maps(rng, 200, 224, 224)
    t_pro, value = best_of(args.reps, lambda: aupro(maps, masks))
    print(f"aupro {maps.shape} {maps.dtype}, {np.mean(masks > 0):.1%} anomalous pixels: {t_pro:.3f} s, value {value:.6f}")
    t_pix, result = best_of(args.reps, lambda: pixel_metrics(maps, masks))
    print(f"pixel_metrics {maps.shape}: {t_pix:.3f} s, {result}")
    if not ok:
        print("ERROR: clbench and sklearn disagree by more than 1e-6")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
