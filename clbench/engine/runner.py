"""Run one experiment: a method learns the task stream step by step; after each step it is
evaluated on every task, memory is measured, results are written atomically and a checkpoint
is saved, so a killed run resumes from its last completed step with identical results.

The run folder (its files: ``clbench.engine.rundir``): everything is validated (config, method and
strategy constructed) before it is created; one process at a time writes it
(``clbench.engine.locks``); the run marker is written into it first and is what ``--overwrite``
requires before deleting anything; the dataset's fingerprint and the checkpoint's own copy of the
results let a resume refuse, with one line, a changed dataset or damaged result files instead of
mixing them in."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from clbench.engine import memory, seeding
from clbench.features.backbones import WEIGHT_CHOICES, BackbonePool, random_init_message, resolve_weights
from clbench.engine.config import ConfigError, RunConfig, check_run_name
from clbench.data import Category, ImageStore, SampleSet, list_categories, load_category
from clbench.data.dataset import default_decode_workers
from clbench.data.root import ensure_dataset
from clbench.engine.environment import environment_info
from clbench.engine.evaluation import TASK_ID_METRIC, evaluate_all, task_id_summary, task_indices
from clbench.metrics.forgetting import summarize, summarize_joint, undefined_tasks
from clbench.engine.locks import check_unlocked, run_lock
from clbench.engine.probes import ProbeSet
from clbench.engine.rundir import MARKER as RUN_MARKER, WRITTEN_FOLDERS, Results, RunFolder, accuracy_matrix
from clbench.engine.rundir import first_line as _first_line, load_problem
from clbench.engine.tasks import categories_of, resolve_schedule, schedule_value
from clbench.engine.validation import validate_run
from methods.base import AnomalyMethod, MethodContext
from strategies.base import Experience, Strategy

log = logging.getLogger("clbench")

WEIGHT_WORDS = tuple(WEIGHT_CHOICES)
SUMMARY_STATS = ("acc", "bwt", "fm", "relative_forgetting")
# Keys that may differ between a run and its resume (where and how fast, not what is computed).
# ``synthetic`` only says whether data may be generated (runs before auto|true|false saved true);
# the dataset fingerprint checked at resume is what keeps a resume on the run's data.
RESUME_FREE_KEYS = ("device", "feature_cache_gb", "image_cache_gb", "output_dir", "eval_batch_size", "name", "synthetic", "plots",
                    "decode_workers", "checkpoint_every", "probe_maps", "trackers", "tracking_uri")


def resolve_device(name: str) -> torch.device:
    """The torch device for a checked ``device:`` (auto | cpu | cuda | cuda:N: ``RunConfig``'s
    constraint); one line if the CUDA device it names is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def check_pretrained(method_cls: type[AnomalyMethod], params: dict[str, Any], weights: str) -> None:
    """``require_pretrained``: refuse (one line) a method backbone whose weights resolve to random init.

    The backbones are those the method names in ``pretrained_backbones(params)``. Decided from the
    file system (``resolve_weights``)."""
    for name in method_cls.pretrained_backbones(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's random-init warning: the error below says it
            info = resolve_weights(name, weights)
        if not info.pretrained:
            raise ConfigError(random_init_message(name, info))


def default_run_name(method: str, strategy: str, backbone: str | None, seed: int) -> str:
    """``<method>-<strategy>-<backbone>-seed<seed>`` as one folder name (a backbone such as
    ``hf-hub:org/model`` keeps its '/' out of the path)."""
    name = f"{method}-{strategy}-{backbone or 'none'}-seed{seed}"
    return re.sub(r"[/\\\x00-\x1f\x7f]", "_", name)


def check_output_dir(output_dir: str) -> Path:
    """``output_dir`` must be (or be creatable as) a writable folder: checked before anything is
    created, so a wrong ``--output`` is one line, not a traceback half-way through a run."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a folder")
    existing = out
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"output_dir: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir: cannot create {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: cannot write in {existing} (permission denied)")
    return out


def dataset_fingerprint(root: Path, categories: list[Category]) -> dict[str, Any]:
    """What a run's data was: per category, every image and mask file it uses (path relative to
    the root, size, modification time). A resume compares it, so a run never mixes two datasets."""
    root = Path(root)
    fingerprint: dict[str, Any] = {"root": str(root.resolve()), "categories": {}}
    for category in categories:
        files: dict[str, list[int]] = {}
        for sample in category.train + category.val + category.test:
            for path in (sample.image, sample.mask):
                if path is not None:
                    stat = os.stat(path)
                    files[os.path.relpath(path, root)] = [stat.st_size, stat.st_mtime_ns]
        fingerprint["categories"][category.name] = dict(sorted(files.items()))
    return fingerprint


def fingerprint_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first file that differs between two fingerprints, in words (None if they agree)."""
    old_categories, new_categories = old.get("categories") or {}, new.get("categories") or {}
    for name in sorted(set(old_categories) | set(new_categories)):
        before, after = old_categories.get(name), new_categories.get(name)
        if before is None or after is None:
            return f"category '{name}' {'added' if before is None else 'removed'}"
        for rel in sorted(set(before) | set(after)):
            was, now = before.get(rel), after.get(rel)
            if was is None:
                return f"{rel} added"
            if now is None:
                return f"{rel} removed"
            if list(was) != list(now):
                return f"{rel} changed (size {was[0]} -> {now[0]} bytes)" if was[0] != now[0] else f"{rel} modified"
    return None


class Experiment:
    """One run: config -> data, method, strategy -> steps -> results in ``run_dir``.

    Everything that can be checked is checked before the run folder is touched: every value of the
    config and of the method's and strategy's parameters here, first (``validate_run``), then what
    needs the built method (``run`` builds it before it creates the folder). A fresh run folder
    this invocation created is removed again if the run fails before its first checkpoint, so a
    corrected command never meets a stale ``config.yaml``."""

    def __init__(self, config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> None:
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        run = validate_run(config)  # every value, method and strategy parameter: before anything is read
        self.method_cls, self.strategy_cls = run.method_cls, run.strategy_cls
        self.method_params, self.strategy_params = run.method_params, run.strategy_params
        self.device = resolve_device(config.device)
        name = config.name or default_run_name(config.method, config.strategy, self.method_params.get("backbone"), config.seed)
        check_run_name(name, "name: the run name")
        self.output_dir = check_output_dir(config.output_dir)
        self.run_dir = self.output_dir / name
        self.folder = RunFolder(self.run_dir)
        if config.require_pretrained:
            check_pretrained(self.method_cls, self.method_params, config.weights)
        root = ensure_dataset(config)
        self.data_root = Path(root)
        # the steps, each the categories it teaches (one per step unless a protocol or a list of lists says more)
        self.schedule = resolve_schedule(config.tasks, list_categories(root), config.task_order, config.seed)
        self.tasks = categories_of(self.schedule)
        self.categories: list[Category] = [
            load_category(root, name, config.val_fraction, config.seed) for name in self.tasks
        ]
        self.resolved = config.to_dict() | {
            "tasks": schedule_value(self.schedule),
            "method_params": self.method_params,
            "backbone": self.method_params.get("backbone"),
            "strategy_params": self.strategy_params,
            "name": name,
        }
        self._checkpointed = False  # a checkpoint was written in this invocation
        self._trackers = None  # clbench.tracking.TrackerSet while the loop runs, if the config names trackers
        self._started = False  # this invocation started the folder afresh (new or overwritten)

    # -- the run folder ------------------------------------------------------------------------
    def _plan(self) -> str:
        """What to do with the run folder: 'fresh', 'resume' or 'overwrite'. Refuses (one line)
        what may not be touched; creates nothing."""
        folder = self.run_dir
        if folder.is_symlink() and (self.overwrite or not folder.is_dir()):  # deleting or creating through a link
            raise ConfigError(f"{folder}: is a symbolic link; clbench deletes or creates only real run folders inside "
                              f"{self.output_dir}: remove the link yourself or choose another --name")
        if not folder.exists():
            return "fresh"
        if not folder.is_dir():
            raise ConfigError(f"{folder}: exists and is not a folder; choose another --name or --output")
        check_unlocked(folder)
        if self.folder.is_started():
            if self.overwrite:
                self._check_deletable(folder)
                return "overwrite"
            if not self.resume:
                raise FileExistsError(f"{folder}: run folder exists; pass --resume to continue it or --overwrite to start again")
            return "resume"
        foreign = self.folder.foreign_entries()
        if foreign:
            raise ConfigError(f"{folder}: exists and is not a clbench run folder (it holds '{foreign[0]}'); "
                              "choose another --name or --output")
        return "fresh"

    def _check_deletable(self, folder: Path) -> None:
        """``--overwrite`` deletes a folder only if clbench made it: a real folder directly inside
        the output folder, holding both the run marker and ``config.yaml``."""
        inside = folder.resolve().parent == self.output_dir.resolve() and not folder.is_symlink()
        if not inside or not self.folder.has_marker():
            raise ConfigError(f"{folder}: not recognisably a clbench run folder (no {RUN_MARKER}); --overwrite "
                              "deletes only folders clbench created: delete it yourself or choose another --name")

    def _open_run_dir(self, results: Results) -> dict[str, Any] | None:
        """Under the folder's lock: start, clear or reopen it; returns the checkpoint to resume from
        (its results already restored into ``results`` and checked against the files)."""
        plan = self._plan()  # again, now that no other process can change the folder
        for name in WRITTEN_FOLDERS if plan == "resume" else ():  # a link: writes and clean-up outside the folder
            if (self.run_dir / name).is_symlink():
                raise ConfigError(f"{self.run_dir / name}: is a symbolic link; clbench writes only inside its run "
                                  "folder: remove the link, or pass --overwrite to start again")
        removed = self.folder.remove_leftovers()
        if removed:
            log.info("removed %d temporary file(s) left by a killed write in %s", len(removed), self.run_dir)
        if plan == "resume":
            return self._reopen(results)
        self._started = True  # from here on the folder holds only what this run writes
        if plan == "overwrite":
            self.folder.clear()
        self._start_fresh()
        return None

    def _start_fresh(self) -> None:
        """The marker first (it is what makes the folder recognisably clbench's), then the config
        and the dataset's fingerprint."""
        self.folder.write_marker(self.resolved["name"])
        self.folder.write_config(self.resolved)
        self.folder.write_fingerprint(dataset_fingerprint(self.data_root, self.categories))

    def _reopen(self, results: Results) -> dict[str, Any] | None:
        """A resume: the saved config must match, and the checkpoint, the dataset and the result
        files must be what the completed steps left; anything else is refused with one line (and
        nothing is written before every check has passed)."""
        self._check_saved_config()
        folder = self.folder
        legacy = not folder.has_marker()  # made before run folders were marked
        checkpoint = folder.checkpoint_path
        current = dataset_fingerprint(self.data_root, self.categories)
        state = None
        if checkpoint.is_file():
            self._check_dataset(current, legacy)
            state = folder.load_checkpoint(self.device, self._n_steps)
            if "results" in state:
                results.restore(state["results"])
            else:  # written before checkpoints carried their rows
                results.load_csv(state["step"], self.tasks)
        elif folder.summary_path.is_file():
            raise ConfigError(f"{checkpoint}: missing, but the run has a {folder.summary_path.name}; "
                              "pass --overwrite to start again")
        if legacy:  # its config matched: it is a clbench run
            folder.write_marker(self.resolved["name"], created=False)
        if state is None or not folder.fingerprint_path.is_file():  # nothing completed yet, or a legacy run
            folder.write_fingerprint(current)
        return state

    def _check_saved_config(self) -> None:
        config_path = self.folder.config_path
        try:
            saved = self.folder.checked_config()
        except ConfigError as err:
            raise ConfigError(f"{err}; pass --overwrite to start again") from None
        defaults = RunConfig().to_dict()  # a key added since the run started counts as its default
        for key, value in self.resolved.items():
            if key not in RESUME_FREE_KEYS and saved.get(key, defaults.get(key)) != value:
                raise ConfigError(
                    f"{config_path}: cannot resume, '{key}' was {saved.get(key, defaults.get(key))!r} and is now {value!r}"
                )

    def _check_dataset(self, current: dict[str, Any], legacy: bool) -> None:
        """The dataset must be the one the run started on (its fingerprint, file by file)."""
        saved = self.folder.saved_fingerprint()
        if saved is None:
            if not legacy:
                raise ConfigError(f"{self.folder.fingerprint_path}: missing, so the dataset cannot be checked for "
                                  "changes; pass --overwrite to start again")
            log.warning("warning: %s has no dataset fingerprint (made by an older clbench); resuming unchecked", self.run_dir)
            return
        difference = fingerprint_difference(saved, current)
        if difference is not None:
            raise ConfigError(f"{self.data_root}: the dataset changed since the run started: {difference}; resuming "
                              "would mix results of two datasets: restore it, or pass --overwrite to start again")

    def _build(self) -> tuple[AnomalyMethod, Strategy, ImageStore, BackbonePool]:
        """Construct the method and strategy (their own checks run here, before any folder exists)."""
        torch.manual_seed(self.config.seed)
        pool = BackbonePool(
            self.config.weights,
            self.device,
            self.config.seed,
            cache_bytes=int(self.config.feature_cache_gb * (1 << 30)),
            spill_dir=self.folder.feature_cache_dir,
            require_pretrained=self.config.require_pretrained,
            cache_dtype=self.config.feature_cache_dtype,
        )
        context = MethodContext(
            pool, self.device, self.config.eval_size, self.config.seed, self.progress,
            epochs_scale=self.config.epochs_scale, max_epochs=self.config.max_epochs,
            require_pretrained=self.config.require_pretrained, amp=self.config.amp,
        )
        with self._weights_file_errors():
            method = self.method_cls(context, **self.method_params).to(self.device)
        strategy = self.strategy_cls(seed=self.config.seed, **self.strategy_params)
        strategy.check_method(method)
        strategy.progress = self.progress
        workers = self.config.decode_workers
        store = ImageStore(self.config.image_size, self.config.crop_size,
                           default_decode_workers(self.device.type) if workers is None else workers,
                           cache_bytes=int(self.config.image_cache_gb * (1 << 30)))
        return method, strategy, store, pool

    @contextlib.contextmanager
    def _weights_file_errors(self) -> Iterator[None]:
        """One line for a weights file timm cannot load into the method's backbone (the parameters'
        values were checked before: ``validate_run``); any other error (a bug) goes through unchanged."""
        try:
            yield
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
            weights = Path(self.config.weights).expanduser()
            if self.config.weights in WEIGHT_WORDS or not weights.is_file():
                raise
            raise ConfigError(f"weights: {weights}: not a weights file for this backbone ({load_problem(err)})") from err

    def _samples(self, names: tuple[str, ...], store: ImageStore, split: str) -> SampleSet:
        by_name = {c.name: c for c in self.categories}
        samples: tuple = ()
        for name in names:
            samples += getattr(by_name[name], split)
        return SampleSet(samples, store)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        self._plan()  # refuse early what may not be touched, before the (possibly slow) build
        method, strategy, store, pool = self._build()
        experiences = strategy.experiences(self.schedule)
        self._n_steps = len(experiences)
        self._task_index = task_indices([e.task_names for e in experiences])  # category -> its teaching step
        created = not self.run_dir.exists()
        with run_lock(self.run_dir):
            try:
                results = Results(self.folder)
                state = self._open_run_dir(results)
                self._run(state, experiences, method, strategy, store, pool, results)
            except BaseException:
                self._discard_unfinished(created)
                raise
        return self.run_dir

    def _discard_unfinished(self, created: bool) -> None:
        """After a failure before the first checkpoint of a run started here: remove what it wrote
        (the folder itself if this invocation created it), so the corrected command starts cleanly.
        A resumed folder, or one with a completed step, is left as it is."""
        if self._checkpointed or not self._started:  # not started here: another run's, or a resumed one
            return
        if created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:  # it held only clbench's lock and leftovers before: everything in it is this run's
            self.folder.clear()

    def _run(self, state: dict[str, Any] | None, experiences: list[Experience], method, strategy, store, pool,
             results: Results) -> None:
        completed = -1
        if state is not None:
            completed = int(state["step"])
            self._restore(state, method, strategy)
            log.info("resuming %s after step %d", self.run_dir, completed)
            del state
        self.folder.write_env(environment_info(self.config, self.device, pool, self.categories))
        probes = (ProbeSet.open(self.run_dir, self.categories, store, self.config.probe_maps, self.config.seed)
                  if self.config.probe_maps else None)
        self._trackers = self._open_trackers()
        try:
            if self._trackers is not None:
                self._trackers.sync(completed)  # steps checkpointed before a kill but not yet logged
            for experience in experiences:
                if experience.step <= completed:
                    continue
                self._step(experience, method, strategy, store, pool, results, probes)
            summary = self.summary(results, experiences, pool)
            summary["disk_bytes"] = self.folder.disk_bytes()
            self.folder.write_summary(summary)
            self.folder.remove_feature_cache()
            if self.config.plots:
                self._plots()
            if self._trackers is not None:
                self._trackers.finish()
        finally:
            if self._trackers is not None:
                self._trackers.close()
        warn_undefined(summary)

    def _open_trackers(self):
        """The run's trackers (clbench.tracking), or None; MLflow's default store: mlruns/ in the output directory."""
        if not self.config.trackers:
            return None
        from clbench.tracking import TrackerSet

        uri = self.config.tracking_uri or (Path(self.config.output_dir).resolve() / "mlruns").as_uri()
        return TrackerSet(self.folder, self.config.trackers, self._task_index, tracking_uri=uri)

    def _restore(self, state: dict[str, Any], method: AnomalyMethod, strategy: Strategy) -> None:
        """Load a checked checkpoint into the method and the strategy."""
        try:
            method.load_method_state(state["method"])
            method.load_training_state(state.get("training", {}))
            strategy.load_state_dict(state["strategy"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise ConfigError(f"{self.folder.checkpoint_path}: does not fit this run's method or strategy "
                              f"({_first_line(err)}); pass --overwrite to start again") from None

    def _step(self, experience: Experience, method, strategy, store, pool, results: Results,
              probes: ProbeSet | None = None) -> None:
        step, label = experience.step, experience.label
        memory.reset_peaks(self.device)
        forwarded = sum(b.images_forwarded for b in pool.backbones)
        forward_seconds = sum(b.forward_seconds for b in pool.backbones)
        current = self._samples(experience.task_names, store, "train")
        val = self._samples(experience.task_names, store, "val")
        torch.manual_seed(seeding.step_seed(self.config.seed, step))
        method.train()
        start = time.perf_counter()
        strategy.train(method, experience, current, val)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        taught = {name: index for name, index in self._task_index.items() if index <= step}
        kept: dict[str, np.ndarray] = {}
        evaluation = evaluate_all(method, self.categories, store, self.config.eval_batch_size, self.progress,
                                  taught=taught, oracle=self.config.evaluation == "oracle",
                                  keep_maps=set(probes.keys) if probes else (), kept=kept)
        eval_seconds = time.perf_counter() - start
        if probes is not None:
            probes.write_step(step, kept)

        results.add_metrics(step, label, evaluation)
        results.add_training(step, label, method.fit_info, method.epoch_log)
        components = method.memory_components() | strategy.memory_components() | memory.peak_components(self.device)
        results.add_memory(step, label, components)
        n_test = sum(len(c.test) for c in self.categories)
        forwarded = sum(b.images_forwarded for b in pool.backbones) - forwarded
        forward_seconds = sum(b.forward_seconds for b in pool.backbones) - forward_seconds
        for phase, seconds, images in (
            ("train", train_seconds, len(current)),
            ("evaluate", eval_seconds, n_test),
            ("backbone_forward", forward_seconds, forwarded),
        ):
            results.add_timing(step, phase, seconds, images)
        results.save()
        if (step + 1) % self.config.checkpoint_every == 0 or step == self._n_steps - 1:
            self._checkpoint(step, method, strategy, results)
        pixel = {task: round(v["pixel_auroc"], 3) for task, v in evaluation.items()}
        log.info("step %d (%s): train %.1fs, eval %.1fs, pixel AUROC %s", step, label, train_seconds, eval_seconds, pixel)

    def _checkpoint(self, step: int, method: AnomalyMethod, strategy: Strategy, results: Results) -> None:
        """The state after ``step``, with the results' rows (a resume restores and checks them)."""
        state = {"step": step, "method": method.state_dict(), "training": method.training_state(),
                 "strategy": strategy.state_dict(), "results": results.rows()}
        self.folder.save_checkpoint(state)
        self._checkpointed = True
        if self._trackers is not None:
            self._trackers.sync(step)  # a step is logged once it can no longer be redone

    # -- summary -------------------------------------------------------------------------------
    def summary(self, results: Results, experiences: list[Experience], pool: BackbonePool) -> dict[str, Any]:
        metrics = sorted({row["metric"] for row in results.metrics})
        joint = len(experiences) == 1 and len(self.tasks) > 1
        steps = {int(row["step"]) for row in results.metrics}
        if steps != set(range(len(experiences))):  # never a "complete" summary over missing steps
            raise ConfigError(f"{self.folder.csv_path('metrics')}: results for steps {sorted(steps)} of "
                              f"0..{len(experiences) - 1}; summary.json not written")
        summary: dict[str, Any] = {"complete": True, "steps": len(experiences), "tasks": self.tasks, "metrics": {}}
        summary["schedule"] = [{"step": e.step, "label": e.label, "tasks": list(e.task_names)} for e in experiences]
        taught = self._task_index  # category -> its teaching step (set in run)
        taught_at = [taught[name] for name in self.tasks]  # each category's teaching step: schedule-aware BWT/FM
        for metric in metrics:
            R = accuracy_matrix(results.frame("metrics"), metric, self.tasks).to_numpy(dtype=float)
            if metric == TASK_ID_METRIC:  # NaN before a task is taught: no answer, not an undefined value
                summary["metrics"][metric] = task_id_summary(R, self.tasks, taught)
                continue
            stats = summarize_joint(R[-1]) if joint else summarize(R, taught_at)
            stats["final"] = dict(zip(self.tasks, R[-1].tolist()))
            undefined = [self.tasks[j] for j in undefined_tasks(R)]
            if undefined:  # the stats above are NaN (null in JSON), never a mean over fewer tasks
                stats["undefined_tasks"] = undefined
            summary["metrics"][metric] = stats
        distinct = {s.key for c in self.categories for s in c.train + c.val + c.test}
        summary["distinct_images"] = len(distinct)
        summary["backbone_forward_images"] = int(
            sum(r["images"] for r in results.timings if r["phase"] == "backbone_forward")
        )
        return summary

    def _plots(self) -> None:
        from clbench.reporting.plots import plot_run

        plot_run(self.run_dir, metrics=("pixel_auroc", "image_auroc"))


def warn_undefined(summary: Mapping[str, Any]) -> None:
    """One warning line per metric that is undefined (NaN) for some task: its summary values are
    null rather than a mean over fewer tasks than the run has."""
    for metric, stats in (summary.get("metrics") or {}).items():
        undefined = stats.get("undefined_tasks") or []
        if undefined:
            null = [key for key in SUMMARY_STATS if not isinstance(stats.get(key), float) or math.isnan(stats[key])]
            log.warning("warning: %s is undefined (NaN) for task(s) %s; in summary.json its %s %s null", metric,
                        ", ".join(repr(t) for t in undefined), ", ".join(null), "is" if len(null) == 1 else "are")


def run_experiment(config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    return Experiment(config, resume=resume, overwrite=overwrite, progress=progress).run()
