"""Continual-learning summaries of an accuracy matrix.

``R`` is an (S, T) array: ``R[s, j]`` is the metric on task ``j`` evaluated
after training step ``s``.  Task ``j`` is learned at step ``j`` (0-based), so a
sequential run has S == T; let ``F = S - 1`` be the final step (``F = T - 1``
for a sequential run, which is the case the formulas below are usually
written for; rows after ``T - 1`` are extra training steps after the last
task, and the final state is still the last row).

    ACC = mean_{j in [0, T-1]} R[F, j]

    BWT = 1/(T-1) * sum_{j=0}^{T-2} ( R[F, j] - R[j, j] )
          (Lopez-Paz & Ranzato, 2017; negative = forgetting)

    FM  = 1/(T-1) * sum_{j=0}^{T-2} ( max_{l in [j, F-1]} R[l, j] - R[F, j] )
          (Chaudhry et al., 2018; positive = forgetting)

FM for task ``j`` takes the best value from the step at which ``j`` was
learned (``l = j``) up to the step before the final one (``l = F - 1``); steps
before ``j`` (task not yet learned) are never used.  This fixes an
off-by-one of the benchmark paper's code, whose forgetting loop does not use
exactly this range.  The last task (``j = T - 1``) is excluded from BWT and FM
because it has no "later" value in a sequential run.  BWT and FM are NaN
when T < 2.

NaN entries (metric undefined for a task, e.g. a test set without a
defective image or without a single anomalous pixel) are never dropped: a
summary that uses a NaN entry is NaN.  Averaging over the defined tasks only
would silently report ACC/BWT/FM over fewer tasks than the run has, and the
number would look like any other.  ``undefined_tasks(R)`` names the tasks
with a NaN entry; the runner records them in ``summary.json`` (where NaN is
written as ``null``) next to the values they make undefined, and warns at the
end of the run.  No RuntimeWarning is emitted for NaN entries.

Schedules: several categories per step
--------------------------------------
With a protocol (IUF's 10-5: ten categories at step 0, five at step 1) R is
(steps, categories) and category ``j`` is taught at step ``taught_at[j]``
(``taught_at`` argument; default ``j``, the square case above, with exactly
the numbers above).  Every measure is taken per category relative to the
step that taught it:

    BWT = mean_{j in E} ( R[F, j] - R[taught_at[j], j] )
    FM  = mean_{j in E} ( max_{l in [taught_at[j], F-1]} R[l, j] - R[F, j] )

with E the categories *not* taught at the last teaching step
(``taught_at[j] < max(taught_at)``: with one category per step, every task
but the last, as above, also when extra rows follow it).  ACC is the mean of
the final row over all categories, as above.  Relative forgetting runs over
the categories taught before the final step (``taught_at[j] < F``).

Relative forgetting (the benchmark paper's)
-------------------------------------------
The paper's code (clad, ``src/utilities/utility_ad.py``, ``forgetting``,
called after every step on the pixel ``"f1"``) computes, at step F:

    RF = 1/F * sum_{j=0}^{F-1} max(0, max_{l in [0, F-1]} ( 1 - R[F, j] / R[l, j] ))

``relative_forgetting`` reproduces it at the final step, as a fraction (the
report shows x100 as %).  It differs from FM in three ways:

* relative, not absolute: for positive entries the term is
  ``max(0, (M_j - R[F, j]) / M_j)`` with ``M_j = max_{l<F} R[l, j]``;
* ``l`` runs over *all* earlier steps, including the steps before task ``j``
  was learned (``l < j``: the model had never seen ``j``), so a high
  not-yet-learned value counts as "forgotten" too; FM only looks from ``l = j``;
* every term is clipped at 0 (the code's ``max_value = 0.0`` start), so
  RF >= 0 by construction while FM may be negative.  The paper's published
  table reports CFA at -4.70 % (main paper, not among /shared/seeds): that
  figure cannot come from this function as written.

Edge cases (documented choices): F = 0 (a single step, e.g. joint training)
gives NaN, like FM (the code returns 0.0 there, which would read as "no
forgetting" for a run that cannot forget).  ``j`` runs over the tasks learned
before the final step (``j < min(F, T)``; the code assumes S == T).  A
reference ``R[l, j] == 0`` is skipped: in the code (numpy floats) its ratio is
``-inf`` or ``0/0 = nan``, neither of which raises the max above its start 0.
NaN entries follow the rule above: a NaN final value or reference makes RF
NaN (the code's ``max(0.0, nan)`` would count that task as "not forgotten").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["acc", "bwt", "forgetting_measure", "relative_forgetting", "summarize", "summarize_joint",
           "undefined_tasks"]


def _mean(values: np.ndarray) -> float:
    """Mean of all entries: NaN if any entry is NaN (never a mean over fewer terms) or none exists."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size and not np.isnan(values).any() else float("nan")


def _max(values: np.ndarray) -> float:
    """Max of all entries: NaN if any entry is NaN or none exists."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.max()) if values.size and not np.isnan(values).any() else float("nan")


def undefined_tasks(R: np.ndarray) -> list[int]:
    """Indices of the tasks (columns) with a NaN entry at any step: what makes a summary NaN."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim == 1:
        R = R[None, :]
    return [int(j) for j in np.flatnonzero(np.isnan(R).any(axis=0))]


def _as_matrix(R: np.ndarray, *, need_diagonal: bool) -> np.ndarray:
    """Validated float (S, T) matrix; S >= T when the diagonal R[j, j] is used."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] == 0:
        raise ValueError(f"R must be a non-empty 2-D (steps, tasks) array, got shape {R.shape}")
    if need_diagonal and R.shape[0] < R.shape[1]:
        raise ValueError(f"R must have at least as many steps as tasks (S >= T), got shape {R.shape}")
    return R


def _taught(R: np.ndarray, taught_at: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated (R, taught_at): the diagonal (task j at step j, S >= T) when ``taught_at`` is None."""
    R = _as_matrix(R, need_diagonal=taught_at is None)
    if taught_at is None:
        return R, np.arange(R.shape[1])
    steps = np.asarray(taught_at)
    if steps.shape != (R.shape[1],) or not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(f"taught_at must give one integer step per task ({R.shape[1]}), got {list(taught_at)}")
    if steps.min() < 0 or steps.max() >= R.shape[0]:
        raise ValueError(f"taught_at must be steps in 0..{R.shape[0] - 1}, got {steps.tolist()}")
    return R, steps.astype(np.int64)


def _earlier(taught: np.ndarray) -> np.ndarray:
    """The tasks BWT and FM use: those not taught at the last teaching step."""
    return np.flatnonzero(taught < taught.max())


def acc(R: np.ndarray) -> float:
    """Mean of the final row over all T tasks (NaN if one is NaN)."""
    R = _as_matrix(R, need_diagonal=False)
    return _mean(R[-1])


def bwt(R: np.ndarray, taught_at: Sequence[int] | None = None) -> float:
    """Backward transfer: mean over the tasks taught before the last teaching step of
    R[F, j] - R[taught_at[j], j] (square default: mean_{j<T-1} (R[F, j] - R[j, j])); NaN if none."""
    R, taught = _taught(R, taught_at)
    j = _earlier(taught)
    if j.size == 0:
        return float("nan")
    return _mean(R[-1, j] - R[taught[j], j])


def forgetting_measure(R: np.ndarray, taught_at: Sequence[int] | None = None) -> float:
    """Forgetting: mean over the tasks taught before the last teaching step of
    max_{taught_at[j] <= l <= F-1} R[l, j] - R[F, j]; NaN if there are none."""
    R, taught = _taught(R, taught_at)
    final = R.shape[0] - 1
    j = _earlier(taught)
    if j.size == 0:
        return float("nan")
    drops = [_max(R[taught[k]:final, k]) - R[final, k] for k in j]
    return _mean(np.array(drops))


def relative_forgetting(R: np.ndarray, taught_at: Sequence[int] | None = None) -> float:
    """The paper's relative forgetting at the final step F = S - 1 (a fraction, >= 0).

    mean over the tasks taught before F (square default: j < min(F, T)) of
    max(0, max_{l < F} (1 - R[F, j] / R[l, j])); NaN if F < 1 or an entry it uses is NaN.
    Zero references are skipped (see the module docstring).
    """
    R = _as_matrix(R, need_diagonal=False)
    taught = np.arange(R.shape[1]) if taught_at is None else _taught(R, taught_at)[1]
    final = R.shape[0] - 1
    if final < 1:
        return float("nan")
    terms = []
    for j in np.flatnonzero(taught < final):
        last, refs = R[final, j], R[:final, j]
        if np.isnan(last) or np.isnan(refs).any():
            return float("nan")
        refs = refs[refs != 0]
        terms.append(float(np.max(1.0 - last / refs, initial=0.0)))  # initial 0: the clip
    return _mean(np.array(terms))


def summarize(R: np.ndarray, taught_at: Sequence[int] | None = None) -> dict[str, float]:
    """ACC, BWT, FM and the paper's relative forgetting of an (S, T) matrix; ``taught_at[j]`` is the
    step that taught task j (default j: one task per step, S >= T)."""
    R, taught = _taught(R, taught_at)
    return {"acc": acc(R), "bwt": bwt(R, taught), "fm": forgetting_measure(R, taught),
            "relative_forgetting": relative_forgetting(R, taught)}


def summarize_joint(R_row: np.ndarray) -> dict[str, float]:
    """Summary of a single-step run (joint training / upper bound).

    ``R_row`` is the (T,) or (1, T) row of per-task metrics after the one
    step; only ACC is defined (NaN if a task's value is), BWT, FM and
    relative forgetting are NaN (nothing was learned later).
    """
    row = np.asarray(R_row, dtype=np.float64)
    if row.ndim == 2 and row.shape[0] == 1:
        row = row[0]
    if row.ndim != 1 or row.size == 0:
        raise ValueError(f"R_row must be a non-empty (T,) or (1, T) array, got shape {np.shape(R_row)}")
    nan = float("nan")
    return {"acc": _mean(row), "bwt": nan, "fm": nan, "relative_forgetting": nan}
