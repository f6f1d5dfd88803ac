"""Scale benchmark: where a paper-size run spends its time and memory, against its physical floor.

    python benchmarks/bench_scale.py --root /data/mvtec_like --tasks 15            # the paper-size run
    python benchmarks/bench_scale.py                                                # quick (< 2 min)

Each method runs in its own process (a fresh peak RSS, a fresh feature cache) as a real
``clbench`` run (``Experiment``), sequential over ``--tasks`` categories, with its paper-profile
settings (``clbench/reporting/profiles/clad.yaml``: 224 px WRN50-2 for PaDiM, PatchCore with its
30000 budget and CFA; STFPM at 256 px) and a short schedule for the trainable ones
(``--epochs``). Wall time is split into phases by timing the engine's own functions, each second
counted once, in the innermost phase the main thread is in:

  decode    collating batches: decoding and resizing images not yet in the store (waiting for the
            decode workers included; ``decode_cpu`` is the decode seconds summed over threads)
  backbone  the frozen backbone's forward passes (``FrozenBackbone.forward``)
  fit       the rest of a training step (the method's own learning: covariances, coresets, SGD)
  evaluate  the rest of evaluation (the method's scoring: Mahalanobis maps, nearest neighbours)
  metrics   pixel and image metrics over all test pixels
  write     result tables and checkpoints
  plot      the run's figures
  other     startup, data scan, building the method

The floor: a frozen backbone sees each distinct image once, so the ideal time is
``distinct images / backbone images/s + fit + metrics`` (the issue's definition); ``floor+scoring``
adds the method's own scoring compute (``evaluate``), which no run can skip. ``actual / ideal``
is reported for both. Peak RSS is sampled every 20 ms from /proc (the runner resets the kernel's
high-water mark per step, so the lifetime VmHWM would miss earlier steps).

The data root is any folder in MVTec layout; by default a small synthetic one is generated (the
``mvtec`` profile at ``--count-scale``), and random-init backbones are used (no download here:
the backbone's speed does not depend on its weights).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("decode", "backbone", "fit", "evaluate", "metrics", "write", "plot", "other")

# Paper-profile settings (clad.yaml), minus the replay buffer: the benchmark measures the method.
PROFILES: dict[str, dict[str, Any]] = {
    "padim": {"image_size": 256, "crop_size": 224, "val_fraction": 0.0,
              "method_params": {"backbone": "wide_resnet50_2", "layers": ["layer1", "layer2", "layer3"],
                                "n_features": 350}},
    "patchcore": {"image_size": 256, "crop_size": 224, "val_fraction": 0.0,
                  "method_params": {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"],
                                    "budget": 30000}},
    "cfa": {"image_size": 256, "crop_size": 224, "val_fraction": 0.0,
            "method_params": {"backbone": "wide_resnet50_2", "layers": ["layer1", "layer2", "layer3"],
                              "batch_size": 4}},
    "stfpm": {"image_size": 256, "val_fraction": 0.1,
              "method_params": {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"], "batch_size": 8}},
}
TRAINABLE = {"cfa", "stfpm"}


# --------------------------------------------------------------------------------------------
# the child: one method, one process
# --------------------------------------------------------------------------------------------
class PhaseClock:
    """Exclusive wall time per phase on the main thread: entering a phase pauses the one it is in."""

    def __init__(self) -> None:
        self.seconds = {phase: 0.0 for phase in PHASES}
        self.calls = {phase: 0 for phase in PHASES}
        self.decode_cpu = 0.0
        self.decoded = 0
        self._stack: list[tuple[str, float]] = []
        self._main = threading.main_thread()
        self._lock = threading.Lock()

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            return self._timed(phase, lambda: original(*args, **kwargs))

        setattr(owner, name, timed)

    def wrap_iterator(self, owner: Any, name: str, phase: str) -> None:
        """Time each ``next()`` of the iterators a function returns (a prefetching batch generator:
        the main thread's wait for the next batch)."""
        original = getattr(owner, name)
        clock = self

        class Timed:
            def __init__(self, inner):
                self.inner = iter(inner)

            def __iter__(self):
                return self

            def __next__(self):
                return clock._timed(phase, self.inner.__next__)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            return Timed(original(*args, **kwargs))

        setattr(owner, name, wrapped)

    def _timed(self, phase: str, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is not self._main:
            return fn()
        now = time.perf_counter()
        if self._stack:
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
        self._stack.append((phase, now))
        self.calls[phase] += 1
        try:
            return fn()
        finally:
            end = time.perf_counter()
            _, since = self._stack.pop()
            self.seconds[phase] += end - since
            if self._stack:
                self._stack[-1] = (self._stack[-1][0], end)

    def count_decode(self, owner: Any, name: str) -> None:
        """Decode seconds summed over every thread (the decode pool's work, not its wall time)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.decode_cpu += time.perf_counter() - start
                    self.decoded += 1

        setattr(owner, name, counted)


class RssSampler(threading.Thread):
    """The process's resident memory, sampled: its maximum whatever resets VmHWM."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self._halt = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, self.rss())
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, self.rss())


def instrument(clock: PhaseClock) -> None:
    """Time the engine's functions; nothing here changes what they compute."""
    import clbench.data.dataset as dataset
    import clbench.engine.evaluation as evaluation
    import clbench.engine.runner as runner
    from clbench.engine.rundir import Results, RunFolder
    from clbench.features.backbones import FrozenBackbone

    clock.count_decode(dataset, "load_rgb8")
    # batches are made by collate, or (parallel decoding) by a prefetching generator: time both ways
    for module in (dataset, evaluation):
        if hasattr(module, "collate"):
            clock.wrap(module, "collate", "decode")
        if hasattr(module, "prefetched_batches"):
            clock.wrap_iterator(module, "prefetched_batches", "decode")
    clock.wrap_iterator(dataset.SampleSet, "batches", "decode")
    clock.wrap(FrozenBackbone, "forward", "backbone")
    clock.wrap(runner.Experiment, "_step", "fit")
    clock.wrap(runner, "evaluate_all", "evaluate")
    clock.wrap(evaluation, "pixel_metrics", "metrics")
    clock.wrap(evaluation, "image_metrics", "metrics")
    clock.wrap(Results, "save", "write")
    clock.wrap(RunFolder, "save_checkpoint", "write")
    clock.wrap(runner.Experiment, "_plots", "plot")


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    clock = PhaseClock()
    import torch

    from clbench.engine.config import from_mapping
    from clbench.engine.runner import Experiment

    instrument(clock)
    torch.set_num_threads(args.threads)
    profile = PROFILES[args.child]
    params = dict(profile["method_params"])
    if args.small:  # the quick mode: a small backbone at a small size
        params["backbone"] = "resnet18"
        if args.child == "patchcore":
            params["budget"] = min(params["budget"], 2000)
    if args.child in TRAINABLE:
        params["epochs"] = args.epochs
    config = {k: v for k, v in profile.items() if k != "method_params"}
    if args.small:
        config.update(image_size=args.image_size, crop_size=None)
    config.update(
        method=args.child, strategy="sequential", tasks=args.tasks, data_root=str(args.root), synthetic=False,
        weights="none", device=args.device, seed=0, output_dir=str(args.out), name=args.child,
        method_params=params, plots=not args.no_plots,
    )
    if args.decode_workers is not None:
        config["decode_workers"] = args.decode_workers
    experiment = Experiment(from_mapping(config), overwrite=True, progress=False)
    run_dir = experiment.run()
    wall = time.perf_counter() - start
    peak = sampler.stop()
    clock.seconds["other"] += max(0.0, wall - sum(clock.seconds.values()))
    summary = json.loads((run_dir / "summary.json").read_text())
    forwarded = summary.get("backbone_forward_images", 0)
    distinct = summary.get("distinct_images", 0)
    n_test = sum(len(c.test) for c in experiment.categories)
    n_steps = len(experiment.schedule)
    return {
        "method": args.child, "wall": wall, "seconds": clock.seconds, "decode_cpu": clock.decode_cpu,
        "decoded": clock.decoded, "forwarded": forwarded, "distinct": distinct, "steps": n_steps,
        "evaluated": n_test * n_steps, "peak_rss": peak, "threads": args.threads,
        "run_dir": str(run_dir), "backbone": params["backbone"],
    }


# --------------------------------------------------------------------------------------------
# the parent: one child per method, one table
# --------------------------------------------------------------------------------------------
def floors(r: dict[str, Any]) -> tuple[float, float]:
    s = r["seconds"]
    rate = r["forwarded"] / s["backbone"] if s["backbone"] > 0 else float("inf")
    ideal = r["distinct"] / rate + s["fit"] + s["metrics"]
    return ideal, ideal + s["evaluate"]


def table(results: list[dict[str, Any]]) -> str:
    head = ("method", "wall s") + PHASES + ("img/s decode", "img/s backbone", "img/s score+metrics", "ideal s",
                                            "actual/ideal", "actual/(floor+scoring)", "peak RSS GB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["seconds"]
        ideal, floor = floors(r)
        decode_rate = r["decoded"] / r["decode_cpu"] if r["decode_cpu"] else float("nan")
        bb_rate = r["forwarded"] / s["backbone"] if s["backbone"] else float("nan")
        eval_rate = r["evaluated"] / (s["evaluate"] + s["metrics"]) if s["evaluate"] else float("nan")
        cells = [r["method"], f"{r['wall']:.1f}"] + [f"{s[p]:.1f}" for p in PHASES] + [
            f"{decode_rate:.1f} (per thread)", f"{bb_rate:.1f}", f"{eval_rate:.1f}", f"{ideal:.1f}",
            f"{r['wall'] / ideal:.2f}", f"{r['wall'] / floor:.2f}", f"{r['peak_rss'] / 1e9:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quick_root(count_scale: float, size: int) -> Path:
    """A small mvtec-profile synthetic root, generated once per settings into the temp folder."""
    root = Path(tempfile.gettempdir()) / f"clbench_bench_scale_{count_scale}_{size}"
    if not (root / ".clbench").exists() and not any(root.glob("*/train")):
        subprocess.run([sys.executable, "-m", "clbench", "data", "synth", "--out", str(root), "--profile", "mvtec",
                        "--count-scale", str(count_scale), "--size", str(size)], check=True, cwd=ROOT)
    return root


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="data root in MVTec layout (default: a small synthetic one)")
    parser.add_argument("--methods", default="padim,patchcore,cfa,stfpm")
    parser.add_argument("--tasks", default="3", help="clbench's --tasks: a count, 'all' or a list")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the trainable methods (a short schedule)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "clbench_bench_scale_runs")
    parser.add_argument("--small", action="store_true",
                        help="resnet18 at --image-size (the default without --root: a quick check)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--count-scale", type=float, default=0.02, help="the quick root's scale of MVTec's counts")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--decode-workers", type=int, help="the run's decode_workers (default: clbench's)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    if args.root is None:
        args.root, args.small = quick_root(args.count_scale, 256), True
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--root", str(args.root), "--tasks", args.tasks,
               "--epochs", str(args.epochs), "--threads", str(args.threads), "--device", args.device,
               "--out", str(args.out), "--image-size", str(args.image_size)]
        cmd += ["--small"] * args.small + ["--no-plots"] * args.no_plots
        if args.decode_workers is not None:
            cmd += ["--decode-workers", str(args.decode_workers)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.exit(f"{method}: failed ({done.returncode}):\n{done.stderr[-3000:]}")
        results.append(json.loads(line[-1][len("RESULT "):]))
        print(f"{method}: {results[-1]['wall']:.1f} s", file=sys.stderr, flush=True)
        if args.json:  # after every method: a long benchmark interrupted later keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))
    print(f"root {args.root}, tasks {args.tasks}, {args.threads} threads, device {args.device}"
          f"{', resnet18 at %d px (quick mode)' % args.image_size if args.small else ''}")
    print(table(results))


if __name__ == "__main__":
    main()
