"""A sweep's progress as it runs: one line per finished cell with its headline ACC/FM and the ETA
of the whole sweep, and, where stderr is a terminal, a live bar above those lines.

Lines are the record (they read the same in a log file); the bar is only a convenience. Import-light
(no torch, no pandas): ``clbench status`` and the sweep's driver both use it."""
from __future__ import annotations

import math
import numbers
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from clbench.engine.rundir import RunFolder
from clbench.sweep.spec import CellResult


HEADLINE = "pixel_auroc"  # the metric the report leads with (``clbench report --metric``)
TIMED = ("ran", "resumed")  # results whose seconds are a cell's real work; skipped/busy/failed are not


def headline(summary: Mapping[str, Any], metric: str = HEADLINE) -> str:
    """``pixel_auroc ACC 0.467 FM 0.306`` from a run's ``summary.json`` mapping; '' if the summary
    lacks the metric (a run of another clbench, a damaged file). A NaN written as null is 'n/a'."""
    metrics = summary.get("metrics") if isinstance(summary, Mapping) else None
    stats = metrics.get(metric) if isinstance(metrics, Mapping) else None
    if not isinstance(stats, Mapping):
        return ""

    def show(value: Any) -> str:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return f"{value:.3f}" if ok else "n/a"

    return f"{metric} ACC {show(stats.get('acc'))} FM {show(stats.get('fm'))}"


def run_headline(run_dir: str | Path, metric: str = HEADLINE) -> str:
    """``headline`` of a run folder's ``summary.json`` ('' if missing or unreadable)."""
    return headline(RunFolder(run_dir).summary(), metric)


def eta_seconds(cell_seconds: Sequence[float], remaining: int, workers: int) -> float | None:
    """Seconds until the sweep's remaining cells are done, from the cells finished so far.

    Estimate: mean finished-cell time x remaining cells / cells running at a time, where at most
    ``workers`` cells run at once and never more than remain (``min(workers, remaining)``).
    Only cells that actually ran count (``TIMED``): skipped cells took no time and would make the
    estimate too short; failed ones usually stop early. None while no cell has finished."""
    if remaining <= 0:
        return 0.0
    times = [float(s) for s in cell_seconds if math.isfinite(s) and s >= 0]
    if not times:
        return None
    return sum(times) / len(times) * remaining / max(1, min(workers, remaining))


def duration(seconds: float | None) -> str:
    """``45s``, ``12m30s``, ``2h05m``; 'unknown' for None."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Progress:
    """Counts the cells of one sweep run as they finish and writes their lines.

    ``workers``: a callable giving the cells the executor runs at a time, asked at each line (Ray
    decides it only once it has seen the cluster). The bar (tqdm, stderr) is drawn only when
    ``bar`` is true; lines then go through ``tqdm.write`` so they do not tear it."""

    def __init__(self, total: int, workers: Callable[[], int], echo: Callable[[str], None], *, bar: bool = False) -> None:
        self.total, self.workers, self.echo = total, workers, echo
        self.done = 0
        self.times: list[float] = []
        self.started = time.perf_counter()
        self._bar = None
        if bar and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="sweep", unit="cell", file=sys.stderr, dynamic_ncols=True)

    @staticmethod
    def wants_bar(echo: Callable[[str], None]) -> bool:
        """A live bar only for the default printer, on a terminal (never in a log file)."""
        return echo is print and sys.stderr.isatty() and sys.stdout.isatty()

    def eta(self) -> float | None:
        return eta_seconds(self.times, self.total - self.done, self.workers())

    def finished(self, result: CellResult, text: str, run_dir: str | Path | None = None) -> None:
        """Record ``result`` and write ``text`` (the cell's line) with its ACC/FM and the ETA."""
        self.done += 1
        if result.status in TIMED:
            self.times.append(result.seconds)
        score = run_headline(run_dir) if run_dir is not None and result.complete else ""
        left = self.total - self.done
        tail = f"{self.done}/{self.total} done" + (f", ETA {duration(self.eta())}" if left else
                                                    f" in {duration(time.perf_counter() - self.started)}")
        line = text + (f"  {score}" if score else "") + f"  | {tail}"
        if self._bar is not None:
            self._bar.write(line)
            self._bar.set_postfix_str(f"ETA {duration(self.eta())}" if left else "", refresh=False)
            self._bar.update(1)
        else:
            self.echo(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
