"""Anomaly-detection metrics: exact, and fast on 10^7-pixel test sets.

All metrics take raw anomaly scores (higher = more anomalous): no sigmoid,
clamping or normalisation is applied, because every metric here depends only
on the ordering of the scores.

Why the approach is exact and fast
----------------------------------
Every metric is computed from two sorted arrays, the scores of the positives
and the scores of the negatives (``np.sort`` is a SIMD sort and much cheaper
than the ``argsort`` that sklearn uses).  For a value ``v``,
``np.searchsorted(sorted_neg, v, 'left')`` is the exact number of negatives
``< v`` and ``'right'`` the number ``<= v``; these integer counts give

* AUROC = P(pos > neg) + 1/2 P(pos == neg), an integer numerator over
  ``n_pos * n_neg`` (ties count 1/2, like sklearn's trapezoidal ROC area);
* AP = mean over positives of the precision at the threshold equal to that
  positive's score (sklearn's step-wise AP, tie groups share one precision);
* F1-max = max over thresholds t of 2 TP(t) / (TP(t) + FP(t) + n_pos), with
  TP(t) = #pos >= t and FP(t) = #neg >= t (a threshold classifies
  score >= t as anomalous; tied scores move together).  Between two
  consecutive positive scores raising t only removes false positives, so the
  maximum is attained at a threshold equal to a positive score: the same
  counts as AP, evaluated at the positives only, hence exact over *every*
  distinct threshold;
* AUPRO: the FPR at each distinct positive score; the PRO curve only changes
  at positive scores, so those points (plus the ends of the horizontal runs
  between them) are exactly the vertices of the curve evaluated at every
  distinct threshold, collinear points omitted.  Only the positive pixels
  need an ``argsort`` (to carry their region weights).

``pixel_metrics`` splits and sorts once and shares the arrays (and the
per-positive counts of AP and F1-max) between the four metrics.

F1-max and the benchmark paper's code
-------------------------------------
``pixel_f1_max`` / ``image_f1_max`` are the F1 of the best threshold, as
anomalib's ``F1Max`` reports it (anomalib's curve is torchmetrics', in
float32, and it adds 1e-10 to P + R: agreement to ~1e-7 relative; here the
counts are integers and the ratio float64).  The paper's code (clad,
``src/utilities/utility_ad.py``, ``test_epoch_anomaly_maps``: the evaluation
of all eight methods) takes ``max 2PR/(P+R)`` over sklearn's
``precision_recall_curve``, i.e. over every distinct threshold, and stores it
as ``"f1"`` (pixel) and ``"f1_img"`` (image): the same quantity as here.  Its
other route, ``reconstruct_epoch_with_evaluation_ad`` -> ``test_results`` ->
``calculate_additional_metrics`` (meant for its reconstruction models; taken
by any architecture not listed in ``strategy_ad.py``'s routing, which names
STFPM ``"storig"`` while ``train_stfpm.json`` says ``"stfpm"``), stores as
``"f1"`` the maximum of ``utility_metrics.calculate_f1`` over a grid of 50
equally spaced thresholds ``np.linspace(min, max, 50)``.  The F1 at any fixed
set of thresholds is at most the exact F1-max (a maximum over a subset), so
that grid value is a lower bound of ``pixel_f1_max``, equal only when the
grid happens to contain an optimal threshold.

Undefined metrics
-----------------
With only one class present (no anomalous pixel, or no normal pixel) the
metrics are undefined: ``auroc``/``average_precision``/``aupro`` raise
:class:`UndefinedMetricError` (a ``ValueError``), while ``pixel_metrics`` and
``image_metrics`` return ``float('nan')`` for the affected keys.  Any other
bad input (shape mismatch, NaN/inf scores, non-binary labels) raises
``ValueError`` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "UndefinedMetricError",
    "auroc",
    "average_precision",
    "f1_max",
    "aupro",
    "pixel_metrics",
    "image_metrics",
]

# MVTec AD evaluation code labels regions with 8-connectivity per image.
_STRUCTURE_2D = np.ones((3, 3), dtype=bool)


class UndefinedMetricError(ValueError):
    """The metric is undefined because only one class is present."""


@dataclass(frozen=True)
class _Split:
    """Scores of positives and negatives, each sorted ascending."""

    pos: np.ndarray
    neg: np.ndarray


# ----------------------------------------------------------------------------
# Input checking (once, at the boundary)
# ----------------------------------------------------------------------------


def _as_scores(scores: np.ndarray) -> np.ndarray:
    """Real-valued scores; float32 is kept as is (no upcast of big arrays)."""
    scores = np.asarray(scores)
    kind = scores.dtype.kind
    if kind == "b":
        return scores.view(np.uint8)
    if kind == "f" and scores.dtype.itemsize < 4:
        return scores.astype(np.float32)  # float16: exact, and sortable by SIMD
    if kind not in "fiu":
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    return scores


def _as_binary(labels: np.ndarray) -> np.ndarray:
    """Bool view/copy of labels that must be bool or numbers in {0, 1}."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels
    if labels.dtype.kind not in "fiu":
        raise ValueError(f"labels must be bool or in {{0, 1}}, got dtype {labels.dtype}")
    if np.count_nonzero(labels) != np.count_nonzero(labels == 1):
        raise ValueError("labels must be bool or in {0, 1}; binarise masks first (e.g. masks > 0)")
    if labels.dtype.itemsize == 1:
        return labels.view(bool)  # 0/1 bytes are valid bools: no copy
    return labels != 0


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def _check_finite_sorted(*sorted_arrays: np.ndarray) -> None:
    """O(1) finiteness check: np.sort puts -inf first and NaN/+inf last."""
    for arr in sorted_arrays:
        if arr.size and arr.dtype.kind == "f" and not (np.isfinite(arr[0]) and np.isfinite(arr[-1])):
            raise ValueError("scores contain NaN or inf")


def _split_sorted(scores: np.ndarray, positive: np.ndarray) -> _Split:
    """Sort positives and negatives separately and validate them."""
    pos = scores[positive]  # boolean indexing copies, so sort in place
    neg = scores[~positive]
    pos.sort()
    neg.sort()
    _check_finite_sorted(pos, neg)
    if pos.size == 0 or neg.size == 0:
        which = "positive" if pos.size == 0 else "negative"
        raise UndefinedMetricError(f"metric undefined: no {which} samples (only one class present)")
    return _Split(pos=pos, neg=neg)


def _prepare(scores: np.ndarray, labels: np.ndarray) -> _Split:
    """Validate (scores, binary labels) of any equal shape and split them."""
    scores = _as_scores(scores)
    labels = np.asarray(labels)
    _check_same_shape(scores, labels, "scores and labels")
    return _split_sorted(scores.ravel(), _as_binary(labels).ravel())


# ----------------------------------------------------------------------------
# Metrics on a split
# ----------------------------------------------------------------------------


def _auroc_split(split: _Split) -> float:
    """Mann-Whitney U from integer counts: exact, ties count 1/2."""
    below = np.searchsorted(split.neg, split.pos, side="left").sum(dtype=np.int64)
    below_or_eq = np.searchsorted(split.neg, split.pos, side="right").sum(dtype=np.int64)
    # 2U = 2 #(neg < pos) + #(neg == pos); Python ints keep the ratio exact.
    return (int(below) + int(below_or_eq)) / (2 * split.pos.size * split.neg.size)


@dataclass(frozen=True)
class _Counts:
    """TP and FP at each threshold t = a positive's score (t ascending)."""

    tp: np.ndarray  # #pos >= t
    fp: np.ndarray  # #neg >= t
    n_pos: int


def _counts_at_positives(split: _Split) -> _Counts:
    """Counts at every positive score: shared by AP and F1-max."""
    n_pos, n_neg = split.pos.size, split.neg.size
    tp = n_pos - np.searchsorted(split.pos, split.pos, side="left")
    fp = n_neg - np.searchsorted(split.neg, split.pos, side="left")
    return _Counts(tp=tp, fp=fp, n_pos=n_pos)


def _average_precision_counts(counts: _Counts) -> float:
    """Mean over positives of precision at threshold = that positive's score."""
    return float(np.mean(counts.tp / (counts.tp + counts.fp)))


def _f1_max_counts(counts: _Counts) -> float:
    """max_t 2 TP / (TP + FP + n_pos) over thresholds at positive scores.

    TP + FP >= 1 there, so the denominator is never 0; integer counts keep
    F1 = 2PR/(P+R) free of the P+R = 0 guard sklearn-based code needs.
    """
    f1 = 2.0 * counts.tp / (counts.tp + counts.fp + counts.n_pos)
    return float(f1.max())


def _average_precision_split(split: _Split) -> float:
    return _average_precision_counts(_counts_at_positives(split))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area of the polyline (x nondecreasing) on [x[0], x_max].

    Linear interpolation at x_max, as in the MVTec AD evaluation code.
    """
    end = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.sum(0.5 * (y[1:end] + y[: end - 1]) * np.diff(x[:end])))
    if end < x.size and x[end - 1] < x_max:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float(0.5 * (y0 + y_max) * (x_max - x0))
    return area


def _pro_curve(neg_sorted: np.ndarray, pos_scores: np.ndarray, pos_region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (FPR, PRO) of the per-region-overlap curve over all thresholds.

    PRO(t) = mean over regions of the fraction of the region's pixels >= t.
    It only changes at positive scores p_1 > p_2 > ... > p_m, so the curve is
    (0,0) -> A_1 -> B_1 -> ... -> A_m -> B_m -> (1,1) with
    A_k = (#neg > p_k, PRO(p_{k-1})) and B_k = (#neg >= p_k, PRO(p_k)) (FPR
    counts over n_neg).  The points dropped (negative-only thresholds) lie on
    the horizontal runs A_k..B_{k-1}, so the polyline and its area are the same.
    """
    n_regions = int(pos_region.max())
    sizes = np.bincount(pos_region, minlength=n_regions + 1)
    order = np.argsort(pos_scores)[::-1]  # descending
    scores_desc = pos_scores[order]
    cum = np.cumsum(1.0 / sizes[pos_region[order]]) / n_regions
    last_of_group = np.append(scores_desc[1:] != scores_desc[:-1], True)
    thresholds, pro_b = scores_desc[last_of_group], cum[last_of_group]
    pro_a = np.concatenate([[0.0], pro_b[:-1]])
    n_neg = neg_sorted.size
    fpr_a = (n_neg - np.searchsorted(neg_sorted, thresholds, side="right")) / n_neg
    fpr_b = (n_neg - np.searchsorted(neg_sorted, thresholds, side="left")) / n_neg
    fpr = np.concatenate([[0.0], np.column_stack([fpr_a, fpr_b]).ravel(), [1.0]])
    pro = np.concatenate([[0.0], np.column_stack([pro_a, pro_b]).ravel(), [1.0]])
    return fpr, pro


def _label_regions(positive: np.ndarray) -> np.ndarray:
    """8-connected components per image (no connections across images)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = _STRUCTURE_2D
    regions, _ = ndimage.label(positive, structure=structure)
    return regions


def _aupro_split(split: _Split, maps: np.ndarray, positive: np.ndarray, fpr_limit: float) -> float:
    """AUPRO given the sorted negatives and the (N, H, W) positive mask."""
    regions = _label_regions(positive)
    fpr, pro = _pro_curve(split.neg, maps[positive], regions[positive])
    return float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


def _check_maps(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N, H, W) maps and their masks binarised by > 0."""
    maps = _as_scores(maps)
    masks = np.asarray(masks)
    _check_same_shape(maps, masks, "maps and masks")
    if maps.ndim != 3:
        raise ValueError(f"maps and masks must be (N, H, W), got shape {maps.shape}")
    return maps, masks > 0


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC, equal to ``sklearn.metrics.roc_auc_score``.

    Any shape (flattened); ``labels`` bool or in {0, 1}.  Sorts each class
    once and counts pairs with ``searchsorted`` in int64, so ties count 1/2
    exactly and float32 scores are never upcast.  Raises ``ValueError`` on a
    single class (:class:`UndefinedMetricError`), a shape mismatch,
    non-binary labels or NaN/inf scores.
    """
    return _auroc_split(_prepare(scores, labels))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise AP, equal to ``sklearn.metrics.average_precision_score``.

    AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds; a tie group of
    c positives raises recall by c/n_pos at one shared precision, which is
    the mean over positives of the precision at their own score.  Same
    input rules and errors as :func:`auroc`.
    """
    return _average_precision_split(_prepare(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """F1 at the best threshold, exact over every distinct threshold.

    A threshold t labels ``score >= t`` anomalous (tied scores move
    together); F1 = 2PR/(P+R).  Equal to the maximum of 2PR/(P+R) over the
    points of ``sklearn.metrics.precision_recall_curve`` and to anomalib's
    ``F1Max``.  Same input rules and errors as :func:`auroc`.
    """
    return _f1_max_counts(_counts_at_positives(_prepare(scores, labels)))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to FPR = ``fpr_limit``, divided by it.

    MVTec AD's definition: regions are the 8-connected components of each
    image's mask (``masks > 0``); FPR is over all mask-negative pixels of all
    images (an image without regions only adds negatives); PRO(t) is the mean
    over all regions of the fraction of the region's pixels with score >= t.
    The curve is exact at every distinct threshold, with (0,0) and (1,1)
    added, interpolated linearly at ``fpr_limit`` and integrated with the
    trapezoid rule.  ``maps``, ``masks``: (N, H, W).  Raises
    :class:`UndefinedMetricError` when there is no region or no negative.
    """
    _check_fpr_limit(fpr_limit)
    maps, positive = _check_maps(maps, masks)
    return _aupro_split(_split_sorted(maps.ravel(), positive.ravel()), maps, positive, fpr_limit)


PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max")
IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max")


def pixel_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Pixel AUROC, AUPRO (FPR <= 0.3), AP and F1-max of (N, H, W) maps vs masks.

    All pixels of all images form one set (like pixel AUROC).  Masks are
    binarised by ``> 0`` (so 0/255 masks work).  Splits and sorts the pixels
    once for all four metrics.  If the set has no anomalous or no normal
    pixel all four are ``nan``; other bad input raises.
    """
    maps, positive = _check_maps(maps, masks)
    try:
        split = _split_sorted(maps.ravel(), positive.ravel())
    except UndefinedMetricError:
        return dict.fromkeys(PIXEL_KEYS, float("nan"))
    counts = _counts_at_positives(split)
    return {
        "pixel_auroc": _auroc_split(split),
        "pixel_aupro": _aupro_split(split, maps, positive, 0.3),
        "pixel_ap": _average_precision_counts(counts),
        "pixel_f1_max": _f1_max_counts(counts),
    }


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max; labels bool or {0, 1}.

    All are ``nan`` when the test set holds a single class; other bad input
    raises ``ValueError``.
    """
    try:
        split = _prepare(scores, labels)
    except UndefinedMetricError:
        return dict.fromkeys(IMAGE_KEYS, float("nan"))
    counts = _counts_at_positives(split)
    return {
        "image_auroc": _auroc_split(split),
        "image_ap": _average_precision_counts(counts),
        "image_f1_max": _f1_max_counts(counts),
    }
