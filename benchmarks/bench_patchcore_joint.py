"""Peak RSS and seconds of one joint PatchCore step (all categories at once), streamed or not.

Run:  python benchmarks/bench_patchcore_joint.py [--root DIR] [--categories N] [--image-size 224]
      [--backbone wide_resnet50_2] [--budget 30000] [--mode streamed|all-at-once] [--stream-bytes B]

``streamed`` is PatchCore as it is (its ``stream_bytes`` cap: a composable coreset past it, see
methods/patchcore.py); ``all-at-once`` sets the cap above any step, which is exactly the code before
streaming (every patch of the step concatenated, then one coreset). Peak RSS is the process's
high-water mark from just before the fit (``reset_peak_rss``) to its end: decoding, backbone
forwards, the patches and the coresets. Run each mode in its own process (the high-water mark is
per process), interleaved, e.g.::

    for i in 1 2; do for m in all-at-once streamed; do
      python benchmarks/bench_patchcore_joint.py --root /data/mvtec --categories 15 --mode $m; done; done

Without ``--root`` it generates a tiny synthetic root itself (4 categories of 24 training images at
64 px) and runs resnet18 (random init) at 64 px with a 1000-patch budget and a 1 MiB cap, so that
the streamed path is exercised; that takes well under 2 minutes.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clbench.data import ImageStore, SampleSet, list_categories, load_category  # noqa: E402
from clbench.data.synth import synthesize  # noqa: E402
from clbench.engine.memory import format_bytes, peak_rss_bytes, reset_peak_rss  # noqa: E402
from clbench.features.backbones import BackbonePool  # noqa: E402
from methods.base import MethodContext, TaskData  # noqa: E402
from methods.patchcore import PatchCore  # noqa: E402

ALL_AT_ONCE = 1 << 62  # a cap no step reaches: today's all-at-once path


def joint_fit(root: Path, categories: int, image_size: int, backbone: str, budget: int, stream_bytes: int) -> dict:
    names = list_categories(root)[:categories]
    store = ImageStore(image_size)
    samples: tuple = ()
    for name in names:
        samples += load_category(root, name).train
    # every feature spilled to disk (a run keeps up to feature_cache_gb of them in RAM on top): the peak
    # measured is the fit's own, not the cache's (cache_bytes=0 without a spill folder keeps them all in RAM)
    spill = Path(tempfile.mkdtemp(prefix="clbench_joint_cache_"))
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=0, spill_dir=spill)
    context = MethodContext(pool, torch.device("cpu"), image_size=image_size, seed=0, progress=False)
    model = PatchCore(context, backbone=backbone, budget=budget, stream_bytes=stream_bytes)
    data = TaskData(0, tuple(names), SampleSet(samples, store), val=None, seed=0)
    exact_peak = reset_peak_rss()
    before = current_rss_bytes()
    start = time.perf_counter()
    model.fit_task(data)
    seconds = time.perf_counter() - start
    shutil.rmtree(spill, ignore_errors=True)
    return {"categories": len(names), "images": len(samples), "bank": int(model.memory_bank.shape[0]),
            "seconds": seconds, "peak_rss": peak_rss_bytes(), "before": before, "exact_peak": exact_peak}


def current_rss_bytes() -> int:
    """Resident memory now (VmRSS; 0 where /proc is missing): the fit's own share is peak - this."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="MVTec-layout data root (default: a tiny synthetic one)")
    parser.add_argument("--categories", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--budget", type=int, default=30000)
    parser.add_argument("--mode", choices=("streamed", "all-at-once"), default="streamed")
    parser.add_argument("--stream-bytes", type=int, help="PatchCore's stream_bytes (default: the method's)")
    args = parser.parse_args(argv)
    stream_bytes = args.stream_bytes or PatchCore.hyperparameters["stream_bytes"]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:  # tiny default: < 2 min on a loaded CPU
            root = Path(tmp) / "synth"
            synthesize(root, categories=4, size=64, n_train=24, n_test_good=1, n_test_per_defect=1, workers=1)
            args.categories, args.image_size, args.backbone, args.budget = 4, 64, "resnet18", 1000
            stream_bytes = args.stream_bytes or 1 << 20
        if args.mode == "all-at-once":
            stream_bytes = ALL_AT_ONCE
        r = joint_fit(root, args.categories, args.image_size, args.backbone, args.budget, stream_bytes)
    cap = "-" if args.mode == "all-at-once" else format_bytes(stream_bytes)
    peak = format_bytes(r["peak_rss"]) + ("" if r["exact_peak"] else " (lifetime peak)")
    print("| mode | categories | images | size | backbone | budget | cap | bank | seconds | peak RSS "
          "| peak - RSS before fit |")
    print(f"| {args.mode} | {r['categories']} | {r['images']} | {args.image_size} | {args.backbone} | {args.budget} "
          f"| {cap} | {r['bank']} | {r['seconds']:.1f} | {peak} | {format_bytes(r['peak_rss'] - r['before'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
