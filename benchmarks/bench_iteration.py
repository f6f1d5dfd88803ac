"""EfficientAD and DRAEM: seconds per training iteration, clbench against anomalib 2.7's torch models.

Run:  python benchmarks/bench_iteration.py [--full] [--size PX] [--repeats N] [--threads N]
                                           [--methods efficientad,draem] [--profile]

Default (quick, < 2 min on 2 loaded cores): 128 px, 3 timed iterations per side. ``--full``: 256 px
(EfficientAD's and DRAEM's size) and 7 timed iterations per side.

One iteration is what each implementation's training step does, on the same inputs, with the same
weights (anomalib's random init copied into clbench's networks) and the same intra-op threads:

* efficientad (model size small, batch 1 + 1 penalty image, as the paper and anomalib):
  clbench ``EfficientAD.training_losses`` + the trainer's zero_grad / backward / Adam step / loss
  ``.item()`` calls; anomalib ``EfficientAdModel`` in train mode (its three losses) + Adam as its
  ``configure_optimizers``.
* draem (batch 4, clbench's default; procedural anomaly sources on both sides): clbench
  ``DRAEM.simulate`` (rotation + anomaly simulation) + forward + loss + Adam step; anomalib
  ``PerlinAnomalyGenerator`` + ``DraemModel`` + ``DraemLoss`` + Adam.

Sides run interleaved (A, B, A, B, ...) after one warm-up each, so load from other processes hits
both alike; the table gives the median seconds per side and the ratio clbench / anomalib (< 1:
clbench faster). ``--profile`` prints each side's top operators (self CPU time, calls) for one
iteration (torch.profiler), which is robust to load: compare counts and shapes, not times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
from clbench.data import Batch, normalize  # noqa: E402
from clbench.features.backbones import BackbonePool  # noqa: E402
from methods.base import MethodContext  # noqa: E402

Step = Callable[[], float]


def context(size: int) -> MethodContext:
    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 20, spill_dir=None)
    return MethodContext(pool, torch.device("cpu"), image_size=size, seed=0, progress=False, max_epochs=1)


def random_pixels(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth-ish uint8 images (B, 3, S, S): upsampled noise, so the data is not constant."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, size // 16), max(2, size // 16), generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (255 * (0.8 * fine + 0.2 * torch.rand(n, 3, size, size, generator=g))).round().to(torch.uint8)


def optimiser_step(optimiser: torch.optim.Optimizer, parts: dict[str, torch.Tensor]) -> float:
    """One step on the sum of clbench's named loss parts, reading them back as the trainer logs them."""
    loss = sum(parts.values())
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    for value in parts.values():
        value.item()
    return loss.item()


# -- EfficientAD -----------------------------------------------------------------------------------
def efficientad_steps(size: int) -> tuple[Step, Step]:
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    from methods.efficientad.model import EfficientAD
    from methods.efficientad.networks import adam

    torch.manual_seed(0)
    reference = EfficientAdModel(384, "small", padding=False, pad_maps=True)
    if size != 256:  # anomalib hard-codes the 8x8 bottleneck of 256 px inputs
        reference.ae.encoder.enconv6 = torch.nn.Conv2d(64, 64, kernel_size=size // 32)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_file = Path(tmp) / "pretrained_teacher_small.pth"
        torch.save(reference.teacher.state_dict(), teacher_file)
        ours = EfficientAD(context(size), model_size="small", teacher_weights=str(teacher_file), penalty_images=4)
    ours.student.load_state_dict(reference.student.state_dict())
    ours.autoencoder.load_state_dict(dict(zip(ours.autoencoder.state_dict(), reference.ae.state_dict().values())))
    pixels, penalty_pixels = random_pixels(1, size, 1), random_pixels(1, size, 2)
    penalty = normalize(penalty_pixels)
    image01, penalty01 = pixels.float() / 255, penalty_pixels.float() / 255

    ours_opt = adam(list(ours.student.parameters()) + list(ours.autoencoder.parameters()), 1e-4, 1e-5)  # fit_task's
    ours.student.train()
    ours.autoencoder.train()
    generator = torch.Generator().manual_seed(0)

    def ours_step() -> float:
        return optimiser_step(ours_opt, ours.training_losses(pixels, penalty, generator))

    ref_opt = torch.optim.Adam(list(reference.student.parameters()) + list(reference.ae.parameters()), lr=1e-4, weight_decay=1e-5)
    reference.train()

    def ref_step() -> float:
        loss_st, loss_ae, loss_stae = reference(batch=image01, batch_imagenet=penalty01)
        loss = loss_st + loss_ae + loss_stae
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        [v.item() for v in (loss_st, loss_ae, loss_stae)]
        return loss.item()

    return ours_step, ref_step


# -- DRAEM -----------------------------------------------------------------------------------------
def draem_steps(size: int, batch_size: int = 4) -> tuple[Step, Step]:
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    from anomalib.models.image.draem.loss import DraemLoss
    from anomalib.models.image.draem.torch_model import DraemModel

    from methods.draem.model import DRAEM, fused_adam

    torch.manual_seed(0)
    reference = DraemModel(sspcab=False)
    ours = DRAEM(context(size))
    theirs = list(reference.state_dict().values())
    mine = ours.state_dict()
    if [tuple(v.shape) for v in mine.values()] == [tuple(v.shape) for v in theirs]:  # same layers, same order
        ours.load_state_dict(dict(zip(mine, theirs)))
    pixels = random_pixels(batch_size, size, 3)
    batch = Batch(pixels, [f"b/{i}" for i in range(batch_size)], torch.zeros(batch_size, dtype=torch.int64),
                  torch.zeros(batch_size, size, size, dtype=torch.bool))
    image01 = pixels.float() / 255

    ours_opt = fused_adam(ours.parameters(), lr=1e-4)  # DRAEM.fit_task's optimiser
    ours.train()
    index = iter(range(1 << 30))

    def ours_step() -> float:
        return optimiser_step(ours_opt, ours._training_loss(ours.simulate(batch, 0, 0, next(index))))

    augmenter = PerlinAnomalyGenerator(anomaly_source_path=None, blend_factor=(0.1, 1.0))
    ref_loss = DraemLoss()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-4)
    reference.train()

    def ref_step() -> float:
        augmented, masks = augmenter(image01)
        reconstruction, prediction = reference(augmented)
        loss = ref_loss(image01, reconstruction, masks, prediction)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        return loss.item()

    return ours_step, ref_step


# -- measuring -------------------------------------------------------------------------------------
def interleaved(ours: Step, ref: Step, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and CPU seconds per iteration of each side, A/B interleaved after one warm-up each.

    CPU seconds (``time.process_time``: all of this process's threads) are the load-robust figure
    with ``--threads 1``: time other processes take from the cores is not counted."""
    ours(), ref()
    out: dict[str, tuple[list[float], list[float]]] = {"wall": ([], []), "cpu": ([], [])}
    for _ in range(repeats):
        for side, fn in enumerate((ours, ref)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            out["wall"][side].append(time.perf_counter() - wall)
            out["cpu"][side].append(time.process_time() - cpu)
    return out


def profile(name: str, fn: Step, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    print(f"\n--- {name}: one iteration, top operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


BUILDERS = {"efficientad": efficientad_steps, "draem": draem_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="256 px, 7 timed iterations per side")
    parser.add_argument("--size", type=int, default=None, help="image side (default 128, 256 with --full)")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations per side (default 3, 7 with --full)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both sides")
    parser.add_argument("--methods", default="efficientad,draem")
    parser.add_argument("--profile", action="store_true", help="print each side's op table for one iteration")
    args = parser.parse_args()
    size = args.size or (256 if args.full else 128)
    repeats = args.repeats or (7 if args.full else 3)
    torch.set_num_threads(args.threads)
    print(f"{size} px, {repeats} interleaved iterations per side, {args.threads} threads, torch {torch.__version__}")
    print(f"{'method':<12} {'time':<5} {'clbench s/it':>13} {'anomalib s/it':>14} {'ratio':>6}   per-iteration clbench/anomalib")
    for name in args.methods.split(","):
        ours, ref = BUILDERS[name](size)
        if args.profile:
            profile(f"{name} clbench", ours)
            profile(f"{name} anomalib", ref)
        for kind, (a, b) in interleaved(ours, ref, repeats).items():
            ratio = statistics.median(x / y for x, y in zip(a, b))
            print(f"{name:<12} {kind:<5} {statistics.median(a):>13.3f} {statistics.median(b):>14.3f} {ratio:>6.3f}   "
                  + " ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(a, b)), flush=True)


if __name__ == "__main__":
    main()
