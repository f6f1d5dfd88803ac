"""An Avalanche-style strategy on a clbench stream, scored with clbench's metrics (issue 15).

    python benchmarks/avalanche_interop_example.py [--data-root ROOT] [--tasks all] [--size 64]

Without ``--data-root`` a small synthetic root is generated in a temp folder. The "model" is the mean
good image (anomaly map: mean absolute difference over channels), fitted on the current experience
plus a replay buffer kept by Avalanche's own ``ReservoirSamplingBuffer``; after each experience every
test experience is scored (pixel AUROC), giving clbench's accuracy matrix and its ACC / FM.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from clbench.interop.avalanche import as_benchmark, evaluate_experience
from clbench.metrics.forgetting import summarize


def mean_image(dataset) -> torch.Tensor:
    """The mean of an Avalanche dataset's images (uint8 CHW items), as float."""
    return torch.stack([item[0] for item in dataset]).float().mean(0)


def run(root: str, tasks, size: int, buffer_size: int) -> None:
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    start = time.perf_counter()
    benchmark = as_benchmark(root, tasks, image_size=size)
    buffer = ReservoirSamplingBuffer(max_size=buffer_size)
    torch.manual_seed(0)  # the reservoir's draws
    R = np.full((len(benchmark.train_stream), len(benchmark.test_stream)), np.nan)
    for experience in benchmark.train_stream:
        mean = mean_image(experience.dataset.concat(buffer.buffer))
        buffer.update_from_dataset(experience.dataset)

        def predict(images: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
            return (images.float() - mean).abs().mean(1)

        step = experience.current_experience
        for test in benchmark.test_stream:
            R[step, test.current_experience] = evaluate_experience(predict, test)["pixel_auroc"]
        print(f"after {'+'.join(benchmark.schedule[step]):>12}: pixel AUROC per experience "
              + " ".join(f"{v:.3f}" for v in R[step]))
    summary = summarize(R)
    print("final pixel AUROC: " + ", ".join(f"{'+'.join(n)} {v:.3f}" for n, v in zip(benchmark.schedule, R[-1]))
          + f"  | ACC {summary['acc']:.3f}  FM {summary['fm']:.3f}  ({time.perf_counter() - start:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="an MVTec-layout root (default: a synthetic one in a temp folder)")
    parser.add_argument("--tasks", default="all", help="a clbench task spec: all, a count, a preset, mvtec:10-5 ...")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--buffer-size", type=int, default=8)
    args = parser.parse_args()
    if args.data_root:
        run(args.data_root, args.tasks, args.size, args.buffer_size)
        return
    from clbench.data.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, categories=4, size=args.size, seed=0, n_train=16, n_test_good=4, n_test_per_defect=2)
        run(tmp, args.tasks, args.size, args.buffer_size)


if __name__ == "__main__":
    main()
