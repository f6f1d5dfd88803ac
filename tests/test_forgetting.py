"""Tests of clbench.forgetting on matrices whose answers are worked out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from clbench.forgetting import acc, bwt, forgetting_measure, summarize, summarize_joint

# R[s, j]: metric on task j after step s.
R3 = np.array(
    [
        [0.90, 0.50, 0.40],
        [0.80, 0.95, 0.45],
        [0.70, 0.85, 0.99],
    ]
)
# ACC = (0.70 + 0.85 + 0.99) / 3 = 2.54 / 3
# BWT = ((0.70 - 0.90) + (0.85 - 0.95)) / 2 = (-0.20 - 0.10) / 2 = -0.15
# FM  = ((max(0.90, 0.80) - 0.70) + (max(0.95) - 0.85)) / 2 = (0.20 + 0.10) / 2 = 0.15


def test_hand_computed_3x3() -> None:
    assert acc(R3) == pytest.approx(2.54 / 3)
    assert bwt(R3) == pytest.approx(-0.15)
    assert forgetting_measure(R3) == pytest.approx(0.15)
    assert summarize(R3) == pytest.approx({"acc": 2.54 / 3, "bwt": -0.15, "fm": 0.15})


def test_no_forgetting() -> None:
    # Each task keeps exactly the value it had when learned.
    R = np.array(
        [
            [0.8, 0.1, 0.2],
            [0.8, 0.9, 0.3],
            [0.8, 0.9, 0.7],
        ]
    )
    assert bwt(R) == pytest.approx(0.0)
    assert forgetting_measure(R) == pytest.approx(0.0)
    assert acc(R) == pytest.approx(0.8)


def test_best_value_at_intermediate_step() -> None:
    # Task 0 improves after step 0 (backward transfer) then drops.
    R = np.array(
        [
            [0.60, 0.0, 0.0, 0.0],
            [0.90, 0.80, 0.0, 0.0],
            [0.70, 0.85, 0.70, 0.0],
            [0.65, 0.75, 0.72, 0.90],
        ]
    )
    # FM terms (max over l in [j, 2]):
    #   j=0: max(0.60, 0.90, 0.70) - 0.65 = 0.25   (R[j, j] would give -0.05)
    #   j=1: max(0.80, 0.85)       - 0.75 = 0.10
    #   j=2: max(0.70)             - 0.72 = -0.02
    assert forgetting_measure(R) == pytest.approx((0.25 + 0.10 - 0.02) / 3)
    # BWT uses R[j, j]: (0.65-0.60) + (0.75-0.80) + (0.72-0.70) = 0.02
    assert bwt(R) == pytest.approx(0.02 / 3)
    assert acc(R) == pytest.approx((0.65 + 0.75 + 0.72 + 0.90) / 4)


def test_values_before_learning_are_ignored() -> None:
    # High values above the diagonal (task not yet learned) must not enter FM.
    R = np.array(
        [
            [0.5, 0.99],
            [0.4, 0.60],
        ]
    )
    assert forgetting_measure(R) == pytest.approx(0.1)  # only task 0: 0.5 - 0.4
    assert bwt(R) == pytest.approx(-0.1)


def test_nan_entries_are_ignored() -> None:
    R = np.array(
        [
            [0.90, np.nan, np.nan],
            [np.nan, 0.80, np.nan],
            [0.70, np.nan, 0.60],
        ]
    )
    # ACC over defined final entries: (0.70 + 0.60) / 2
    # BWT: only j=0 defined: 0.70 - 0.90; j=1 final value is NaN
    # FM: j=0: max(0.90, NaN) - 0.70 = 0.20; j=1: final NaN -> ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" warnings
        assert acc(R) == pytest.approx(0.65)
        assert bwt(R) == pytest.approx(-0.20)
        assert forgetting_measure(R) == pytest.approx(0.20)
        all_nan = np.full((2, 2), np.nan)
        assert all(math.isnan(v) for v in summarize(all_nan).values())


def test_single_task() -> None:
    R = np.array([[0.75]])
    result = summarize(R)
    assert result["acc"] == 0.75
    assert math.isnan(result["bwt"]) and math.isnan(result["fm"])


def test_extra_steps_after_last_task_use_last_row_as_final() -> None:
    # S = 3 steps, T = 2 tasks: row 2 is an extra step after task 1 was learned.
    R = np.array(
        [
            [0.9, 0.1],
            [0.8, 0.9],
            [0.6, 0.7],
        ]
    )
    # final = row 2; FM for j=0: max(R[0:2, 0]) - 0.6 = 0.3; BWT: 0.6 - 0.9
    assert summarize(R) == pytest.approx({"acc": 0.65, "bwt": -0.3, "fm": 0.3})


def test_summarize_joint() -> None:
    for row in (np.array([0.9, 0.8, np.nan]), np.array([[0.9, 0.8, np.nan]])):
        result = summarize_joint(row)
        assert result["acc"] == pytest.approx(0.85)
        assert math.isnan(result["bwt"]) and math.isnan(result["fm"])
    with pytest.raises(ValueError, match="R_row"):
        summarize_joint(np.ones((2, 3)))


def test_shape_validation() -> None:
    with pytest.raises(ValueError, match="2-D"):
        summarize(np.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        acc(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="S >= T"):
        summarize(np.ones((2, 3)))
    with pytest.raises(ValueError, match="S >= T"):
        bwt(np.ones((1, 2)))
    assert acc(np.ones((1, 3))) == 1.0  # a partial run still has a final row
