"""Normalizing-flow methods: parameter counts and training throughput (images/s).

Run:  python benchmarks/bench_flows.py [--image-size 64] [--batch 32] [--iters 3] [--threads N]
                                       [--counts-size 256] [--skip-counts] [--skip-speed]

Parameter counts (architecture only, at ``--counts-size``, FastFlow's 256 px by default): trainable
flow weights, FrEIA's fixed permutation matrices (frozen parameters), and the learnable LayerNorm
affine (default on); next to the figures the papers report (FastFlow's count the flows only).

Throughput: one optimisation step (LayerNorm + flow forward, FastFlow's NLL, backward, Adam) on
ResNet18 layer1-3 shaped features (explicitly: the default backbone is WRN50) at ``--image-size``,
batch ``--batch`` and twice that (the "B+B" replay batch). Features are random tensors of the right shapes: in a run each image goes through the frozen
backbone once (shared cache), so after the first epoch a training step is exactly this.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clbench.features.backbones import feature_info  # noqa: E402
from methods.flows.cainnflow import VARIANTS, CAINNFlow  # noqa: E402
from methods.flows.fastflow import FastFlow  # noqa: E402
from methods.flows.common import feature_dims, flow_loss  # noqa: E402

# (label, class, params, what the paper reports for the flow's parameters)
R18 = {"backbone": "resnet18"}
COUNT_CONFIGS = [
    ("FastFlow wide_resnet50_2 (default)", FastFlow, {}, "41.3M (FastFlow paper; seeds: none)"),
    ("FastFlow resnet18 (3x3/1x1)", FastFlow, R18, "4.9M for R18 (FastFlow paper; seeds: none)"),
    ("FastFlow resnet18 (3x3 only)", FastFlow, {**R18, "conv3x3_only": True}, "4.9M for R18 (FastFlow paper; seeds: none)"),
    ("CAINNFlow CAC wide_resnet50_2 (default)", CAINNFlow, {}, "none (seed 000)"),
    *[(f"CAINNFlow {v} resnet18 step2", CAINNFlow, {**R18, "variant": v}, "none (seed 000: 'fewer parameters')") for v in VARIANTS],
]
SPEED_CONFIGS = [("FastFlow", FastFlow, R18), ("FastFlow 3x3", FastFlow, {**R18, "conv3x3_only": True})] + [
    (f"CAINNFlow {v}", CAINNFlow, {**R18, "variant": v}) for v in VARIANTS
]


def millions(n: int) -> str:
    return f"{n / 1e6:.3f}M"


def throughput(cls, params: dict, image_size: int, batch: int, iters: int) -> float:
    p = cls.resolve_params(params)
    channels, reductions = feature_info(p["backbone"], p["layers"])
    dims = feature_dims(channels, reductions, image_size)
    flows, norms = cls.build_flows(p, dims), cls.build_norms(p, dims)
    trainable = [q for q in list(flows.parameters()) + list(norms.parameters()) if q.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=p["lr"], betas=tuple(p["adam_betas"]), weight_decay=p["weight_decay"])
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(batch, *d, generator=generator) for d in dims]

    def step() -> None:
        zs, jacs = zip(*(flow(norm(f)) for f, norm, flow in zip(features, norms, flows)))
        loss = flow_loss(zs, jacs)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    step()  # warm-up (allocator, oneDNN primitives)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--counts-size", type=int, default=256)
    parser.add_argument("--skip-counts", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.skip_counts:
        print(f"parameters at {args.counts_size}px (flows only; backbone excluded)")
        print(f"  {'configuration':40s} {'flows':>10s} {'LN affine':>10s} {'trainable':>10s} {'perm.(frozen)':>14s}  paper")
        for label, cls, params, paper in COUNT_CONFIGS:
            counts = cls.parameter_counts(params, args.counts_size)
            trainable = counts["flow_trainable"] + counts["layernorm"]
            print(f"  {label:40s} {millions(counts['flow_trainable']):>10s} {millions(counts['layernorm']):>10s}"
                  f" {millions(trainable):>10s} {millions(counts['flow_permutations']):>14s}  {paper}")
        print()

    if not args.skip_speed:
        print(f"training throughput, {args.image_size}px, resnet18 layer1-3 features, {torch.get_num_threads()} thread(s), "
              f"mean of {args.iters} steps after a warm-up")
        for label, cls, params in SPEED_CONFIGS:
            rates = [throughput(cls, params, args.image_size, b, args.iters) for b in (args.batch, 2 * args.batch)]
            print(f"  {label:16s} batch {args.batch}: {rates[0]:8.1f} img/s   batch {2 * args.batch} (B+B replay): {rates[1]:8.1f} img/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
