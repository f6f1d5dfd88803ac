"""The paper's table of a paper-profile sweep (``clbench reproduce``): one function builds it
(``paper_table``), markdown, HTML and the console only render it."""
from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from clbench.reporting.cells import CellInfo, _cell_values
from clbench.reporting.tables import markdown_table


if TYPE_CHECKING:
    import pandas as pd


# --------------------------------------------------------------------------------------------
# the paper's table (paper-profile sweeps)
# --------------------------------------------------------------------------------------------
PROFILE_VALUE = re.compile(r" \(profile: .*\)$")  # "--set k=v (profile: old)": the old value differs per method
F1 = "pixel_f1_max"  # clbench's pixel F1 (best threshold over all pixels of a task's test set)
# (row key, label, digits of clbench's value and of the difference, digits of the published figure)
PAPER_ROWS: tuple[tuple[str, str, int, int], ...] = (
    ("pixel_auroc", "pixel AUROC", 3, 2),
    ("image_auroc", "image AUROC", 3, 2),
    ("pixel_aupro", "AUPRO", 3, 2),
    ("pixel_f1", "pixel F1", 3, 2),
    ("forgetting_pct", "avg forgetting (%)", 2, 2),
    ("fm_pixel_f1", "FM of pixel F1 x100 (clbench)", 2, 2),
    ("memory_mb", "extra memory (MB)", 1, 0),
)
DISPLAY = {"draem": "DRAEM", "patchcore": "PatchCore", "padim": "PaDiM", "cfa": "CFA", "stfpm": "STFPM",
           "efficientad": "EfficientAD", "fastflow": "FastFlow", "cainnflow": "CAINNFlow"}
FORGETTING_NOTE = (
    "avg forgetting (%) is the paper's: the relative drop of pixel F1 from its best value at any earlier step "
    "(including steps before the task was learned), each task's term clipped at 0 by its code, so >= 0 "
    "(clad src/utilities/utility_ad.py; the published CFA -4.70 cannot come from that code as written); "
    "clbench's FM (Chaudhry et al. 2018) is the absolute drop from a task's best value after it was learned "
    "to its final value, may be negative, shown x100 beside it.")
MEMORY_NOTE = ("extra memory = method state + replay buffer at the final step (memory.csv), MB = 10^6 bytes "
               "(seed 003: 30000 x 1536 x 4 B = 184.3 MB).")


@dataclass
class PaperEntry:
    value: float  # clbench, mean over seeds (NaN: not available)
    published: float | None
    n_seeds: int

    @property
    def difference(self) -> float:
        if self.published is None or not math.isfinite(self.value):
            return float("nan")
        return self.value - self.published


@dataclass
class PaperTable:
    profile: str
    title: str
    source: str
    methods: list[str]
    rows: list[tuple[str, str, int, int]]
    entries: dict[tuple[str, str], PaperEntry]
    not_in_paper: list[str]
    run_differences: list[str]  # differences of this sweep's runs beyond the profile's own (command line)

    def text(self, row: str, method: str) -> str:
        """One entry as rendered: ``clbench (published, difference)``."""
        digits, pub_digits = next((d, p) for key, _, d, p in self.rows if key == row)
        entry = self.entries[(row, method)]
        published = None if entry.published is None else f"{entry.published:.{pub_digits}f}"
        if not math.isfinite(entry.value):
            return "n/a" + (f" ({published})" if published is not None else "")
        value = f"{entry.value:.{digits}f}"
        if published is None:
            return value
        return f"{value} ({published}, {entry.difference:+.{digits}f})"

    def headers(self) -> list[str]:
        return [""] + [DISPLAY.get(m, m) + ("*" if m in self.not_in_paper else "") for m in self.methods]

    def body(self) -> list[list[str]]:
        return [[label] + [self.text(key, m) for m in self.methods] for key, label, _, _ in self.rows]

    def notes(self) -> list[str]:
        seeds = sorted({self.entries[(self.rows[0][0], m)].n_seeds for m in self.methods})
        notes = [f"each entry: clbench, mean over {'/'.join(map(str, seeds))} seed(s) (published, clbench - published); "
                 f"published: {self.source or 'the paper'}; final ACC of each metric; pixel F1 = clbench's {F1}.",
                 FORGETTING_NOTE, MEMORY_NOTE]
        if any(m in self.not_in_paper for m in self.methods):
            notes.append("* not in the paper (no published figures).")
        if self.run_differences:
            notes.append("these runs also differ from the paper in: " + "; ".join(self.run_differences))
        notes.append("the profile's own differences from the paper's code are in each run's env.json (paper_profile).")
        return notes

    def frame(self) -> "pd.DataFrame":
        import pandas as pd

        rows = [dict(row=key, label=label, method=m, clbench=self.entries[(key, m)].value,
                     published=self.entries[(key, m)].published, difference=self.entries[(key, m)].difference,
                     n_seeds=self.entries[(key, m)].n_seeds)
                for key, label, _, _ in self.rows for m in self.methods]
        return pd.DataFrame(rows)


def _stat(metrics: dict[str, Any], metric: str, key: str, scale: float = 1.0) -> float:
    value = (metrics.get(metric) or {}).get(key)
    return float(value) * scale if isinstance(value, numbers.Real) and not isinstance(value, bool) else float("nan")


def paper_values(cell: CellInfo) -> dict[str, float]:
    """The paper table's values of one complete cell (NaN for what its run does not have)."""
    metrics = (cell.summary or {}).get("metrics") or {}
    return {
        "pixel_auroc": _stat(metrics, "pixel_auroc", "acc"),
        "image_auroc": _stat(metrics, "image_auroc", "acc"),
        "pixel_aupro": _stat(metrics, "pixel_aupro", "acc"),
        "pixel_f1": _stat(metrics, F1, "acc"),
        "forgetting_pct": _stat(metrics, F1, "relative_forgetting", 100.0),
        "fm_pixel_f1": _stat(metrics, F1, "fm", 100.0),
        "memory_mb": _cell_values(cell)["memory_mb"],
    }


def paper_table(cells: Sequence[CellInfo]) -> PaperTable | None:
    """The paper's table for the cells of a paper-profile sweep (None if no cell has a profile)."""
    import numpy as np

    names = [c.paper_profile.get("name") for c in cells if c.paper_profile]
    if not names:
        return None
    name = max(set(names), key=names.count)
    members = [c for c in cells if c.paper_profile and c.paper_profile.get("name") == name]
    title, source, published, order, not_in_paper, own = "", "", {}, [], [], set()
    try:
        from clbench.reporting.profile import load_profile

        profile = load_profile(str(name))
        title, published = profile.title, dict(profile.published)
        source = str(published.pop("source", ""))
        order, not_in_paper = profile.methods, profile.not_in_paper
        own = {d for m in order for key in ("all", m, "replay", "sequential", "joint") for d in profile.differences.get(key, [])}
    except Exception as err:  # noqa: BLE001 - a report of old or moved profiles still renders
        warnings.warn(f"paper profile '{name}' not loadable ({err}): no published figures", stacklevel=2)
    first_row = next(iter(published.values()), {}) if published else {}
    present = list(dict.fromkeys(c.params["method"] for c in members))
    methods = [m for m in list(first_row) + order if m in present]
    methods = list(dict.fromkeys(methods + present))
    entries: dict[tuple[str, str], PaperEntry] = {}
    values = {m: [paper_values(c) for c in members if c.complete and c.params["method"] == m] for m in methods}
    for key, _, _, _ in PAPER_ROWS:
        for m in methods:
            column = np.array([v[key] for v in values[m]], dtype=float)
            mean = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
            pub = (published.get(key) or {}).get(m) if key in published else None
            entries[(key, m)] = PaperEntry(mean, None if pub is None else float(pub), len(values[m]))
    run_differences = list(dict.fromkeys(PROFILE_VALUE.sub("", d) for c in members
                                         for d in c.paper_profile.get("differences", []) if d not in own))
    flagged = {c.params["method"] for c in members if c.paper_profile.get("not_in_paper")}
    return PaperTable(str(name), title, source, methods, list(PAPER_ROWS), entries,
                      [m for m in methods if m in not_in_paper or m in flagged], run_differences)


def render_paper_markdown(table: PaperTable) -> str:
    lines = [f"## The paper's table: {table.profile}" + (f" ({table.title})" if table.title else ""), ""]
    lines.append(markdown_table(table.headers(), table.body(), [False] + [True] * len(table.methods)))
    lines.append("")
    lines += [f"- {note}" for note in table.notes()]
    return "\n".join(lines) + "\n"
