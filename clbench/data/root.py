"""A run's data root: checked against the task spec before anything is written or trained, and
the built-in synthetic dataset generated there only where the user asked for it.

``synthetic`` (a run-config key):

- ``auto`` (the default): generate only at the default root ``data/synthetic`` (the quickstart's),
  so a mistyped ``--data-root`` is an error naming it, never a run on generated data;
- ``true``: generate at ``data_root`` if it is missing, empty or a clbench synthetic dataset;
- ``false``: never generate.

Generation only ever writes into a folder clbench owns (``clbench.data.synth.synthesize``: missing,
empty, or marked with ``.clbench-synthetic.json``); a folder of the user's is used as it is. Only
the categories the task spec needs and that are missing are generated, so a marked read-only
root that has them is only read.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from clbench.engine.config import RunConfig
from clbench.data import DatasetError, RootScan, scan_root
from clbench.engine.tasks import PRESETS, is_counted, normalize_spec, resolve_tasks

log = logging.getLogger("clbench")

DEFAULT_ROOT = RunConfig.data_root  # "data/synthetic": where `auto` may generate


def ensure_dataset(config: RunConfig) -> Path:
    """The data root, with the synthetic categories the run needs generated if it may; raises a
    one-line DatasetError/ValueError naming the root when the root or the task spec is wrong."""
    root = Path(config.data_root)
    if may_generate(config):
        _generate_missing(root, config)
    scan = _scan(root, config)
    resolve_tasks(config.tasks, scan.categories, config.task_order, config.seed, root=root, incomplete=scan.incomplete)
    if scan.incomplete and is_counted(config.tasks):
        log.warning("warning: %s: folders without train/good are not categories, left out of tasks=%s: %s",
                    root, config.tasks, ", ".join(scan.incomplete))
    return root


def may_generate(config: RunConfig) -> bool:
    """``synthetic: true``, or ``auto`` at the default root (however it is spelled: ./data/synthetic)."""
    if config.synthetic == "auto":
        return os.path.abspath(config.data_root) == os.path.abspath(DEFAULT_ROOT)
    return config.synthetic is True


def _scan(root: Path, config: RunConfig) -> RootScan:
    """The root's categories; a missing root says why nothing was generated there."""
    if not root.exists() and not root.is_symlink():
        why = ("synthetic: false" if config.synthetic is False else
               f"the built-in synthetic dataset is generated only at {DEFAULT_ROOT} or with synthetic: true")
        raise DatasetError(f"data_root: {root} not found (a dataset folder in MVTec AD layout; {why})")
    scan = scan_root(root)
    if not scan.categories and (root / "train" / "good").is_dir():
        raise DatasetError(f"data_root: {root} is one category (it has train/good): give its parent folder "
                           f"as data_root and '{root.resolve().name}' in tasks")
    return scan


def _generate_missing(root: Path, config: RunConfig) -> None:
    """Generate what the task spec needs and the root lacks, after checking the spec will resolve."""
    from clbench.data import synth

    state = synth.folder_state(root)
    if state in ("foreign", "file"):
        if config.synthetic is True:
            log.info("%s: not a clbench synthetic dataset (no %s): used as it is, nothing generated", root, synth.MARKER)
        return
    present = scan_root(root).categories if state == "marked" else ()
    needed = needed_categories(config.tasks, present, config.synthetic_categories)
    if not needed:
        return
    resolve_tasks(config.tasks, [*present, *needed], config.task_order, config.seed, root=root)  # before writing
    log.info("generating %d synthetic categories at %s: %s", len(needed), root, ", ".join(needed))
    synth.synthesize(root, needed, size=config.image_size, seed=0)


def needed_categories(spec: object, present: tuple[str, ...] | list[str], limit: int) -> list[str]:
    """Synthetic categories a task spec needs that ``present`` lacks: named ones (lists, presets)
    that are synthetic names; for a count N, enough of the first ``limit`` (sorted) to reach N;
    for ``all``, every one of the first ``limit``."""
    from clbench.data.synth import CATEGORY_NAMES

    spec = normalize_spec(spec)  # type: ignore[arg-type]
    universe = [n for n in sorted(CATEGORY_NAMES[:limit]) if n not in present]
    if isinstance(spec, int):
        return universe[: max(0, spec - len(present))]
    if spec == "all":
        return universe
    names = list(PRESETS[spec]) if isinstance(spec, str) else spec
    return [n for n in dict.fromkeys(names) if n in CATEGORY_NAMES and n not in present]
