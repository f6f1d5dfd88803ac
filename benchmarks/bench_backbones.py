"""Feature-extraction throughput of frozen backbones (images/s), as clbench runs them.

    python benchmarks/bench_backbones.py [--sizes 128 224] [--models resnet18 wide_resnet50_2]

Random-init weights (throughput does not depend on the weights); layers 1-3 as PaDiM uses them.
"""
from __future__ import annotations

import argparse
import time

import torch

from clbench.features.backbones import create_feature_model, resolve_weights


def throughput(model_name: str, size: int, batch: int, repeats: int, device: torch.device) -> float:
    model = create_feature_model(model_name, ["layer1", "layer2", "layer3"], resolve_weights(model_name, "none")).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        model(images)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "wide_resnet50_2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} torch threads={torch.get_num_threads()} batch={args.batch}")
    for name in args.models:
        for size in args.sizes:
            rate = throughput(name, size, args.batch, args.repeats, device)
            print(f"{name:18s} {size:4d}px  {rate:8.1f} images/s")


if __name__ == "__main__":
    main()
