"""Feature-cache bytes per image: every layer in float32 (before issue 14) vs what each method caches
now (PaDiM: its seeded channel subset; PatchCore: layer2-3), in float32 and float16.

From the architecture alone (``feature_info``, meta device: no weights, under a second); the
numbers are what ``FrozenBackbone.cache_bytes_per_image`` reports and tests/test_feature_cache.py
checks against a real cache.

    python benchmarks/bench_cache_bytes.py [--backbone wide_resnet50_2] [--size 224] [--images 5354] [--seed 0]
"""
from __future__ import annotations

import argparse

import torch

from clbench.features.backbones import cached_bytes_per_image, feature_info
from methods.padim import default_n_features, split_channels

ALL_LAYERS = ["layer1", "layer2", "layer3"]


def padim_selection(backbone: str, seed: int) -> list[int]:
    """Channels PaDiM keeps per layer (its default n_features, drawn as PaDiM draws them)."""
    channels, _ = feature_info(backbone, ALL_LAYERS)
    n = default_n_features(backbone, sum(channels))
    index = torch.randperm(sum(channels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return [len(kept) for kept in split_channels(index, channels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=5354, help="images a run caches (MVTec AD: 3629 train + 1725 test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    channels, reductions = feature_info(args.backbone, ALL_LAYERS)
    kept = padim_selection(args.backbone, args.seed)
    rows = [("all layers 1-3 (before)", channels, reductions),
            (f"PaDiM: {sum(kept)} of {sum(channels)} channels {kept}", kept, reductions),
            ("PatchCore: layer2-3", channels[1:], reductions[1:])]
    print(f"{args.backbone} at {args.size} px, {args.images} images")
    print(f"{'cached':48s} {'fp32 MB/img':>11s} {'fp16 MB/img':>11s} {'fp32 GB/run':>11s} {'fp16 GB/run':>11s}")
    for name, c, r in rows:
        b32, b16 = (cached_bytes_per_image(c, r, args.size, dtype) for dtype in ("float32", "float16"))
        print(f"{name:48s} {b32 / 1e6:11.3f} {b16 / 1e6:11.3f} {b32 * args.images / 1e9:11.2f} {b16 * args.images / 1e9:11.2f}")


if __name__ == "__main__":
    main()
