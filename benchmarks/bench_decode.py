"""Images/s of decoding large originals to the run's resolution: serial vs the store's decode threads.

    python benchmarks/bench_decode.py                       # 48 images of 1024 px -> 256 px, 3 repeats
    python benchmarks/bench_decode.py --consume-ms 600      # a consumer (the backbone) works on each batch
    python benchmarks/bench_decode.py --n 200 --size 1024 --repeats 5 --root /tmp/decode-images

Each mode decodes the same images into a fresh ``ImageStore`` (so nothing is cached), batch by batch
as a run does. Modes: ``serial`` (0 workers), ``wN`` (N threads decode each batch: ``collate``) and
``wN+pf`` (``prefetched_batches``: batch i+1 is queued before batch i is handed out). Modes are
interleaved (A, B, C, A, B, C, ...) so a loaded machine disturbs them alike; the table gives the
median seconds, images/s, the paired speed-up over serial and the gain of prefetch. ``--consume-ms``
adds a CPU workload per batch (matrix products on one thread, standing in for the backbone), which
prefetch overlaps with the next batch's decode.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clbench.data import ImageStore, Sample, collate
from clbench.data.dataset import prefetched_batches


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Sample]:
    """``n`` PNGs of ``size`` px: smooth shading plus mild noise, so they compress like photos, not like noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    samples = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        if not path.exists():
            base = np.stack([120 + 80 * np.sin(6 * x + i), 100 + 60 * np.cos(5 * y - i), 90 + 50 * x * y], axis=2)
            noisy = base + rng.normal(0, 4, base.shape)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, compress_level=1)  # quick to write
        samples.append(Sample(f"bench/train/good/{i:03d}", path, None, 0, "good"))
    return samples


def consume(batch_pixels: torch.Tensor, ms: float) -> None:
    """About ``ms`` ms of CPU work (matrix products) standing in for the backbone's forward pass."""
    if ms <= 0:
        return
    end = time.perf_counter() + ms / 1000
    a = batch_pixels[:, :, :64, :64].float().reshape(-1, 64)
    while time.perf_counter() < end:
        a = torch.tanh(a @ torch.ones(64, 64) / 64)


def run_mode(samples: list[Sample], out_size: int, batch: int, workers: int, prefetch: bool, consume_ms: float) -> float:
    store = ImageStore(out_size, decode_workers=workers)
    chunks = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    start = time.perf_counter()
    batches = prefetched_batches(chunks, store) if prefetch else (collate(c, store) for c in chunks)
    for b in batches:
        consume(b.pixels, consume_ms)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="images (default 48)")
    parser.add_argument("--size", type=int, default=1024, help="original size in px (default 1024)")
    parser.add_argument("--out-size", type=int, default=256, help="decoded size (default 256)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--workers", default="2,4", help="worker counts to compare with serial (default 2,4)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--consume-ms", type=float, default=0.0, help="CPU work per batch, ms (default 0: decode only)")
    parser.add_argument("--root", type=Path, help="folder for the images (kept; default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.root or Path(tmp)
        start = time.perf_counter()
        samples = write_images(folder, args.n, args.size)
        print(f"{args.n} images of {args.size} px in {folder} ({time.perf_counter() - start:.1f} s to write); "
              f"decoded to {args.out_size} px, batches of {args.batch}, consumer {args.consume_ms:g} ms/batch")
        modes = [("serial", 0, False)]
        for w in (int(v) for v in args.workers.split(",") if v):
            modes += [(f"w{w}", w, False), (f"w{w}+pf", w, True)]
        times: dict[str, list[float]] = {name: [] for name, _, _ in modes}
        for _ in range(args.repeats):
            for name, workers, prefetch in modes:
                times[name].append(run_mode(samples, args.out_size, args.batch, workers, prefetch, args.consume_ms))
    # "paired": the median over repeats of serial / mode within one repeat (robust to drifting load)
    print(f"{'mode':<10}{'median s':>10}{'images/s':>10}{'paired vs serial':>18}  runs (s)")
    for name, _, _ in modes:
        med = statistics.median(times[name])
        paired = statistics.median(s / t for s, t in zip(times["serial"], times[name]))
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<10}{med:>10.2f}{args.n / med:>10.1f}{paired:>17.2f}x  {runs}")
    for name, _, prefetch in modes:
        if prefetch:
            gain = statistics.median(a / b for a, b in zip(times[name[:-3]], times[name]))
            print(f"prefetch gain {name[:-3]} -> {name}: {gain:.2f}x (paired median)")


if __name__ == "__main__":
    main()
