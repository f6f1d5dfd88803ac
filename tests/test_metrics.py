"""Tests of clbench.metrics.anomaly against sklearn, anomalib's F1Max and a brute-force AUPRO reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from clbench.metrics.anomaly import (
    UndefinedMetricError,
    aupro,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
    pixel_metrics,
)

TOL = 1e-9


def _random_case(seed: int, n: int = 2000, p: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < p).astype(np.int64)
    scores = rng.standard_normal(n) + 0.8 * labels
    return scores, labels


# ----------------------------------------------------------------------------
# AUROC
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auroc_random_matches_sklearn(seed: int) -> None:
    scores, labels = _random_case(seed)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_heavy_ties_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 2, 3000)
    scores = rng.integers(0, 4, 3000) + labels * rng.integers(0, 2, 3000)  # values 0..4
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)


def test_auroc_constant_scores_is_half() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    assert auroc(np.full(7, 3.25), labels) == 0.5
    assert roc_auc_score(labels, np.full(7, 3.25)) == 0.5


def test_auroc_perfect_and_inverted() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert auroc(scores, labels) == 1.0
    assert auroc(-scores, labels) == 0.0


def test_auroc_float32_matches_sklearn() -> None:
    scores, labels = _random_case(7, n=5000)
    scores32 = scores.astype(np.float32)
    assert auroc(scores32, labels) == pytest.approx(roc_auc_score(labels, scores32), abs=TOL)


def test_auroc_float16_is_exact_as_float32() -> None:
    scores, labels = _random_case(8, n=3000)
    scores16 = scores.astype(np.float16)  # many ties after rounding
    assert auroc(scores16, labels) == pytest.approx(roc_auc_score(labels, scores16.astype(np.float64)), abs=TOL)


def test_auroc_multidimensional_inputs() -> None:
    scores, labels = _random_case(9, n=4 * 6 * 5)
    expected = roc_auc_score(labels, scores)
    assert auroc(scores.reshape(24, 5), labels.reshape(24, 5)) == pytest.approx(expected, abs=TOL)
    assert auroc(scores.reshape(4, 6, 5), labels.reshape(4, 6, 5)) == pytest.approx(expected, abs=TOL)
    # non-contiguous views are fine too
    s3, l3 = scores.reshape(4, 6, 5).transpose(2, 0, 1), labels.reshape(4, 6, 5).transpose(2, 0, 1)
    assert auroc(s3, l3) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int32, np.float64])
def test_auroc_label_dtypes(dtype: type) -> None:
    scores, labels = _random_case(10)
    assert auroc(scores, labels.astype(dtype)) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)


def test_auroc_rejects_non_binary_labels() -> None:
    scores, labels = _random_case(11, n=100)
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        auroc(scores, (labels * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        auroc(scores, labels - 1)  # {-1, 0}


# ----------------------------------------------------------------------------
# Average precision
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_ap_random_matches_sklearn(seed: int) -> None:
    scores, labels = _random_case(200 + seed, p=0.1)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=TOL)


@pytest.mark.parametrize("seed", range(5))
def test_ap_ties_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(300 + seed)
    labels = rng.integers(0, 2, 2000)
    scores = (rng.integers(0, 4, 2000) + labels * rng.integers(0, 2, 2000)).astype(np.float32)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=TOL)


def test_ap_known_values() -> None:
    labels = np.array([0, 0, 1, 1])
    assert average_precision(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    # ranking 1,0,1,0 from the top: AP = (1/1 + 2/3) / 2
    assert average_precision(np.array([0.3, 0.1, 0.4, 0.2]), labels) == pytest.approx(5 / 6, abs=TOL)
    # all tied: AP = precision at the single threshold = prevalence
    assert average_precision(np.zeros(4), labels) == 0.5


# ----------------------------------------------------------------------------
# F1-max
# ----------------------------------------------------------------------------


def _f1_max_sklearn(labels: np.ndarray, scores: np.ndarray) -> float:
    """max 2PR/(P+R) over sklearn's PR-curve points, P+R = 0 counted as F1 = 0."""
    precision, recall, _ = precision_recall_curve(np.ravel(labels), np.ravel(scores))
    num, den = 2 * precision * recall, precision + recall
    return float(np.max(np.divide(num, den, out=np.zeros_like(num), where=den != 0)))


def _f1_max_brute(labels: np.ndarray, scores: np.ndarray) -> float:
    """F1 at every distinct threshold t (score >= t positive), straight from the confusion matrix."""
    labels, scores = np.ravel(labels).astype(bool), np.ravel(scores)
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        fp = np.sum(predicted & ~labels)
        fn = np.sum(~predicted & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_random_matches_sklearn(seed: int) -> None:
    scores, labels = _random_case(1000 + seed, p=0.15)
    assert f1_max(scores, labels) == pytest.approx(_f1_max_sklearn(labels, scores), abs=TOL)


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_ties_match_sklearn_and_brute_force(seed: int) -> None:
    rng = np.random.default_rng(1100 + seed)
    labels = (rng.random(2000) < 0.3).astype(np.int64)
    scores = (rng.integers(0, 4, 2000) + labels * rng.integers(0, 2, 2000)).astype(np.float32)
    expected = _f1_max_sklearn(labels, scores)
    assert f1_max(scores, labels) == pytest.approx(expected, abs=TOL)
    assert _f1_max_brute(labels, scores) == pytest.approx(expected, abs=TOL)


def test_f1_max_ties_move_together() -> None:
    # scores [1, 1, 0], labels [1, 0, 0]: the tied pair cannot be split, so
    # t = 1 gives TP 1, FP 1 -> F1 = 2/3 (not 1), and t = 0 gives 2/4.
    scores, labels = np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0])
    assert f1_max(scores, labels) == pytest.approx(2 / 3, abs=TOL)
    assert _f1_max_sklearn(labels, scores) == pytest.approx(2 / 3, abs=TOL)


def test_f1_max_constant_perfect_inverted_match_sklearn() -> None:
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 1])
    cases = {
        "constant": np.full(8, 0.25),
        "perfect": np.where(labels == 1, 0.9, 0.1) + np.arange(8) * 1e-3,
        "inverted": np.where(labels == 1, 0.1, 0.9) + np.arange(8) * 1e-3,
    }
    for name, scores in cases.items():
        assert f1_max(scores, labels) == pytest.approx(_f1_max_sklearn(labels, scores), abs=TOL), name
    # one threshold, everything positive: P = 3/8, R = 1 -> F1 = 2 * 3/8 / (11/8) = 6/11
    assert f1_max(cases["constant"], labels) == pytest.approx(6 / 11, abs=TOL)
    assert f1_max(cases["perfect"], labels) == 1.0
    assert f1_max(cases["inverted"], labels) == pytest.approx(6 / 11, abs=TOL)  # best: flag everything


def test_f1_max_float32_and_multidimensional_match_sklearn() -> None:
    scores, labels = _random_case(1200, n=4 * 6 * 5)
    scores32 = scores.astype(np.float32)
    expected = _f1_max_sklearn(labels, scores32)
    assert f1_max(scores32.reshape(4, 6, 5), labels.reshape(4, 6, 5)) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("case", ["random", "tied"])
def test_f1_max_matches_anomalib(case: str) -> None:
    import torch
    from types import SimpleNamespace

    from anomalib.metrics import F1Max

    rng = np.random.default_rng(1300)
    labels = (rng.random(3000) < 0.2).astype(np.int64)
    scores = rng.standard_normal(3000) + labels
    if case == "tied":
        scores = np.round(scores * 2)
    metric = F1Max(fields=["pred_score", "gt_label"])
    metric.update(SimpleNamespace(pred_score=torch.from_numpy(scores), gt_label=torch.from_numpy(labels)))
    reference = float(metric.compute())
    # torchmetrics' curve is float32 (counts, P, R) and anomalib adds 1e-10 to P + R
    assert f1_max(scores, labels) == pytest.approx(reference, rel=1e-6)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max])
def test_single_class_raises(metric) -> None:
    with pytest.raises(UndefinedMetricError, match="no positive"):
        metric(np.arange(5.0), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="no negative"):
        metric(np.arange(5.0), np.ones(5, dtype=bool))


@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max])
def test_shape_mismatch_raises(metric) -> None:
    with pytest.raises(ValueError, match="same shape"):
        metric(np.arange(6.0), np.array([0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="same shape"):
        metric(np.arange(6.0).reshape(2, 3), np.array([0, 1, 0, 1, 0, 1]))


@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 1])  # a negative's or a positive's score
def test_non_finite_scores_raise(metric, bad: float, where: int) -> None:
    scores = np.array([0.1, 0.9, 0.3, 0.7], dtype=np.float32)
    scores[where] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        metric(scores, np.array([0, 1, 0, 1]))


def test_error_messages_are_one_line() -> None:
    with pytest.raises(ValueError) as info:
        auroc(np.arange(3.0), np.zeros(3))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------
# AUPRO: brute-force reference
# ----------------------------------------------------------------------------


def _trapezoid_mvtec(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Port of trapezoid_area() of the MVTec AD evaluation code."""
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _aupro_reference(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Evaluate FPR and PRO directly at every distinct threshold (slow, obvious)."""
    masks = masks > 0
    regions = []  # (image index, region mask)
    for k, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(k, labeled == r) for r in range(1, n + 1)]
    negatives = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.sum((maps >= t) & negatives) / np.sum(negatives))
        pros.append(np.mean([np.mean(maps[k][region] >= t) for k, region in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    return _trapezoid_mvtec(np.array(fprs), np.array(pros), fpr_limit) / fpr_limit


def _blob_masks(rng: np.random.Generator, n: int, h: int, w: int, empty: int = 1) -> np.ndarray:
    """Masks with several separate blobs per image; the first `empty` images have none."""
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for k in range(empty, n):
        for _ in range(rng.integers(2, 5)):
            r, c = rng.integers(0, h - 3), rng.integers(0, w - 3)
            masks[k, r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = 255
    return masks


@pytest.mark.parametrize("seed", range(4))
def test_aupro_random_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(400 + seed)
    masks = _blob_masks(rng, 4, 12, 12)
    maps = rng.random(masks.shape) + 0.7 * (masks > 0)
    assert aupro(maps, masks) == pytest.approx(_aupro_reference(maps, masks), abs=TOL)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_tied_maps_match_reference(seed: int) -> None:
    rng = np.random.default_rng(500 + seed)
    masks = _blob_masks(rng, 3, 10, 10)
    maps = (rng.integers(0, 5, masks.shape) + 2 * (masks > 0) * rng.integers(0, 2, masks.shape)).astype(np.float32)
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(_aupro_reference(maps, masks, limit), abs=TOL)


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(600)
    masks = _blob_masks(rng, 3, 10, 10)
    maps = np.where(masks > 0, 2.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert aupro(maps, masks) == pytest.approx(1.0, abs=TOL)


def test_aupro_hand_computed() -> None:
    # One 1x4 image: pixels [a, b, n1, n2]; a, b form one region (8-connected).
    # scores: a=0.9, n1=0.8, b=0.7, n2=0.1.
    # thresholds 0.9: (fpr 0, pro 1/2); 0.8: (1/2, 1/2); 0.7: (1/2, 1); 0.1: (1, 1).
    # Up to fpr 0.3: vertical 0 -> 1/2 at fpr 0, then flat at 1/2 -> area 0.15.
    maps = np.array([[[0.9, 0.7, 0.8, 0.1]]])
    masks = np.array([[[1, 1, 0, 0]]])
    assert aupro(maps, masks) == pytest.approx(0.5, abs=TOL)
    # Up to fpr 1: 0.5*0.5 (flat) + 0.5*1 (after jump) = 0.75
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=TOL)


def test_aupro_diagonal_region_is_one_region_and_regions_weigh_equally() -> None:
    # Image 0: a diagonal pair (8-connected -> ONE region of 2 px) and a
    # separate single pixel region -> 2 regions. Only the single pixel scores high.
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours
    masks[0, 4, 4] = True
    maps = np.zeros((1, 5, 5))
    maps[0, 4, 4] = 1.0
    # t=1: fpr 0, pro = (0 + 1)/2; then t=0 jumps to (1, 1). Area to 0.3:
    # first segment from (0, 0.5) to (1, 1) interpolated at 0.3 -> 0.65
    expected = 0.5 * (0.5 + 0.65) * 0.3 / 0.3
    assert aupro(maps, masks) == pytest.approx(expected, abs=TOL)
    assert aupro(maps, masks) == pytest.approx(_aupro_reference(maps, masks), abs=TOL)


def test_aupro_image_without_regions_only_adds_negatives() -> None:
    rng = np.random.default_rng(700)
    masks = _blob_masks(rng, 3, 10, 10, empty=0)
    maps = rng.random(masks.shape) + 0.5 * (masks > 0)
    extra_map = rng.random((1, 10, 10)) * 2.0
    extra_mask = np.zeros((1, 10, 10), dtype=np.uint8)
    both_maps, both_masks = np.concatenate([maps, extra_map]), np.concatenate([masks, extra_mask])
    result = aupro(both_maps, both_masks)
    assert result == pytest.approx(_aupro_reference(both_maps, both_masks), abs=TOL)
    # The extra negatives score high, so they must lower AUPRO (they are counted as FP).
    assert result < aupro(maps, masks)


def test_aupro_errors() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(UndefinedMetricError):
        aupro(maps, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        aupro(maps, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(maps[0], np.ones((4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, np.ones((2, 4, 4)), fpr_limit=0.0)
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    masks = np.zeros((2, 4, 4))
    masks[0, 0, 0] = 1
    with pytest.raises(ValueError, match="NaN or inf"):
        aupro(bad, masks)


# ----------------------------------------------------------------------------
# pixel_metrics / image_metrics
# ----------------------------------------------------------------------------


def test_pixel_metrics_matches_individual_metrics() -> None:
    rng = np.random.default_rng(800)
    masks = _blob_masks(rng, 4, 16, 16)
    maps = (rng.random(masks.shape) + 0.6 * (masks > 0)).astype(np.float32)
    result = pixel_metrics(maps, masks)  # 0/255 masks binarised by > 0
    assert set(result) == {"pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max"}
    assert all(type(v) is float for v in result.values())  # plain floats (JSON/pandas friendly)
    labels = (masks > 0).ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, maps.ravel()), abs=TOL)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, maps.ravel()), abs=TOL)
    assert result["pixel_aupro"] == pytest.approx(_aupro_reference(maps, masks), abs=TOL)
    # F1-max over all pixels of all images pooled, like pixel AUROC
    assert result["pixel_f1_max"] == pytest.approx(_f1_max_sklearn(labels, maps.ravel()), abs=TOL)


def test_pixel_metrics_undefined_is_nan() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    for masks in (np.zeros((2, 4, 4)), np.full((2, 4, 4), 255)):
        result = pixel_metrics(maps, masks)
        assert set(result) == {"pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max"}
        assert all(math.isnan(v) for v in result.values())
    with pytest.raises(ValueError, match="NaN or inf"):
        pixel_metrics(np.full((2, 4, 4), np.nan), np.zeros((2, 4, 4)))


def test_image_metrics() -> None:
    scores, labels = _random_case(900, n=200, p=0.5)
    result = image_metrics(scores, labels.astype(bool))
    assert set(result) == {"image_auroc", "image_ap", "image_f1_max"}
    assert result["image_f1_max"] == pytest.approx(_f1_max_sklearn(labels, scores), abs=TOL)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert all(type(v) is float for v in result.values())
    undefined = image_metrics(scores, np.ones(200, dtype=int))
    assert set(undefined) == set(result) and all(math.isnan(v) for v in undefined.values())
    with pytest.raises(ValueError, match="same shape"):
        image_metrics(scores, labels[:-1])
