"""Timing helper shared by the benchmark scripts (they run as `python benchmarks/<name>.py`)."""
from __future__ import annotations

import time
from collections.abc import Callable


def best_of(reps: int, fn: Callable[[], object]) -> tuple[float, object]:
    """Best wall time over ``reps`` runs (the least disturbed by other load), and the last result."""
    best, result = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result
