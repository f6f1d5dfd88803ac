"""Tests of clbench.metrics.forgetting on matrices whose answers are worked out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from clbench.metrics.forgetting import (acc, bwt, forgetting_measure, relative_forgetting, summarize, summarize_joint,
                                undefined_tasks)

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
# RF (paper): l over steps 0, 1 for both tasks, terms clipped at 0
#   j=0: max(0, 1 - 0.70/0.90, 1 - 0.70/0.80) = 2/9
#   j=1: max(0, 1 - 0.85/0.50, 1 - 0.85/0.95) = 1 - 0.85/0.95 = 2/19
#   RF = (2/9 + 2/19) / 2 = 28/171


def test_hand_computed_3x3() -> None:
    assert acc(R3) == pytest.approx(2.54 / 3)
    assert bwt(R3) == pytest.approx(-0.15)
    assert forgetting_measure(R3) == pytest.approx(0.15)
    assert relative_forgetting(R3) == pytest.approx(28 / 171)
    assert summarize(R3) == pytest.approx(
        {"acc": 2.54 / 3, "bwt": -0.15, "fm": 0.15, "relative_forgetting": 28 / 171}
    )


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
    assert relative_forgetting(R) == 0.0


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


def test_nan_entries_make_what_uses_them_nan() -> None:
    """D12: a task whose metric is undefined is never averaged away: every summary that uses a NaN
    entry is NaN, and ``undefined_tasks`` names the task."""
    R = np.array(
        [
            [0.90, np.nan, 0.50],
            [0.80, 0.80, 0.40],
            [0.70, 0.75, 0.60],
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" / invalid-value warnings
        assert acc(R) == pytest.approx((0.70 + 0.75 + 0.60) / 3)  # the final row is defined
        assert bwt(R) == pytest.approx(((0.70 - 0.90) + (0.75 - 0.80)) / 2)  # R[1, 1] is defined
        assert forgetting_measure(R) == pytest.approx(((0.90 - 0.70) + (0.80 - 0.75)) / 2)
        assert math.isnan(relative_forgetting(R))  # uses R[0, 1] as a reference for task 1
        assert undefined_tasks(R) == [1]
        R[2, 2] = np.nan  # the last task's final value: ACC is undefined, BWT/FM do not use it
        assert math.isnan(acc(R)) and not math.isnan(bwt(R)) and undefined_tasks(R) == [1, 2]
        R[2, 0] = np.nan
        assert all(math.isnan(v) for v in summarize(R).values())
        all_nan = np.full((2, 2), np.nan)
        assert all(math.isnan(v) for v in summarize(all_nan).values())


def test_single_task() -> None:
    R = np.array([[0.75]])
    result = summarize(R)
    assert result["acc"] == 0.75
    assert math.isnan(result["bwt"]) and math.isnan(result["fm"])
    assert math.isnan(result["relative_forgetting"])  # the paper's code would return 0.0 at T = 0


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
    # RF: F = 2, both tasks learned before it; refs rows 0, 1:
    #   j=0: max(0, 1 - 0.6/0.9, 1 - 0.6/0.8) = 1/3; j=1: max(0, 1 - 0.7/0.1, 1 - 0.7/0.9) = 2/9
    assert summarize(R) == pytest.approx(
        {"acc": 0.65, "bwt": -0.3, "fm": 0.3, "relative_forgetting": (1 / 3 + 2 / 9) / 2}
    )


def test_summarize_joint() -> None:
    for row in (np.array([0.9, 0.8, 0.7]), np.array([[0.9, 0.8, 0.7]])):
        result = summarize_joint(row)
        assert result["acc"] == pytest.approx(0.8)
        assert set(result) == {"acc", "bwt", "fm", "relative_forgetting"}
        assert math.isnan(result["bwt"]) and math.isnan(result["fm"]) and math.isnan(result["relative_forgetting"])
    assert math.isnan(summarize_joint(np.array([0.9, 0.8, np.nan]))["acc"])  # never the mean of 2 of 3 tasks
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


# ----------------------------------------------------------------------------
# The paper's relative forgetting (clad src/utilities/utility_ad.py::forgetting)
# ----------------------------------------------------------------------------


def test_relative_forgetting_uses_steps_before_the_task_was_learned() -> None:
    # Task 1 scored 0.9 at step 0 (never seen) and 0.6 when learned at step 1.
    R = np.array(
        [
            [0.80, 0.90, 0.20],
            [0.80, 0.60, 0.30],
            [0.80, 0.60, 0.95],
        ]
    )
    # j=0: max(0, 1 - 0.8/0.8, 1 - 0.8/0.8) = 0
    # j=1: l=0 (before learning!): 1 - 0.6/0.9 = 1/3; l=1: 0  -> 1/3
    assert relative_forgetting(R) == pytest.approx((0 + 1 / 3) / 2)
    # FM ignores l < j: no forgetting at all
    assert forgetting_measure(R) == pytest.approx(0.0)


def test_relative_forgetting_clips_each_term_at_zero() -> None:
    # Both tasks improve after learning: every ratio is negative, each term is 0.
    R = np.array(
        [
            [0.50, 0.10, 0.10],
            [0.70, 0.40, 0.10],
            [0.90, 0.80, 0.60],
        ]
    )
    assert relative_forgetting(R) == 0.0
    assert forgetting_measure(R) == pytest.approx(((0.7 - 0.9) + (0.4 - 0.8)) / 2)  # FM goes negative
    # One task forgets, one improves: the improvement does not offset it.
    R2 = R.copy()
    R2[2, 0] = 0.35  # j=0: max(0, 1 - 0.35/0.5, 1 - 0.35/0.7) = 0.5; j=1: 0
    assert relative_forgetting(R2) == pytest.approx(0.25)


def test_relative_forgetting_is_relative_not_absolute() -> None:
    # The same absolute drop of 0.1 is 50 % of 0.2 but 10 % of 1.0.
    low = np.array([[0.2, 0.0], [0.1, 0.5]])
    high = np.array([[1.0, 0.0], [0.9, 0.5]])
    assert forgetting_measure(low) == pytest.approx(forgetting_measure(high))
    assert relative_forgetting(low) == pytest.approx(0.5)
    assert relative_forgetting(high) == pytest.approx(0.1)


def test_relative_forgetting_zero_and_nan_references() -> None:
    R = np.array(
        [
            [0.0, 0.0, 0.2, 0.3],
            [0.5, 0.0, 0.2, 0.3],
            [0.4, 0.0, 0.2, 0.3],
            [0.2, 0.1, 0.7, 0.3],
        ]
    )
    # F = 3, j in 0..2:
    #   j=0: refs 0.0 (skipped: -inf in the code), 0.5, 0.4 -> max(0, 1 - 0.2/0.5, 1 - 0.2/0.4) = 0.6
    #   j=1: every ref is 0 -> no ratio above the start 0 -> 0 (as the code)
    #   j=2: refs 0.2 -> 1 - 0.7/0.2 < 0 -> 0
    # RF = (0.6 + 0 + 0) / 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero / empty-slice warnings
        assert relative_forgetting(R) == pytest.approx(0.2)
        # A NaN reference or final value makes RF undefined (the code's max(0.0, nan) would
        # count that task as "not forgotten").
        R[1, 2] = np.nan
        assert math.isnan(relative_forgetting(R))
        assert math.isnan(relative_forgetting(np.array([[0.5, 0.1], [np.nan, 0.9]])))


def test_relative_forgetting_matches_the_papers_loop() -> None:
    """A transcription of clad's forgetting(metrics_test, T) on a random positive matrix."""

    def clad_forgetting(metrics_test: list[list[dict[str, float]]], T: int) -> float:
        result = 0.0
        if T != 0:
            for j in range(T):
                max_value = 0.0
                for l in range(T):
                    ratio = 1 - metrics_test[T][j]["f1"] / metrics_test[l][j]["f1"]
                    max_value = max(max_value, ratio)
                result += max_value
            result /= T
        return result

    R = np.random.default_rng(0).uniform(0.05, 1.0, size=(6, 6))
    metrics_test = [[{"f1": float(v)} for v in row] for row in R]
    assert relative_forgetting(R) == pytest.approx(clad_forgetting(metrics_test, 5), abs=1e-12)
    for T in range(1, 6):  # the paper logs it after every step: the matrix up to that step
        assert relative_forgetting(R[: T + 1]) == pytest.approx(clad_forgetting(metrics_test, T), abs=1e-12)
