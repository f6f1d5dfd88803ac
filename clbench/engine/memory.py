"""Memory accounting: bytes measured from actual tensors, and the process's peak memory per step."""
from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of resident memory, so a peak is per step.

    Writing "5" to /proc/self/clear_refs resets VmHWM (Linux >= 4.0). Returns False where this
    is not possible; the peak is then the process's lifetime peak (still an upper bound).
    """
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM), else the lifetime peak."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peaks(device: torch.device) -> None:
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_components(device: torch.device) -> dict[str, int]:
    peaks = {"peak_rss": peak_rss_bytes()}
    peaks["peak_cuda"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    return peaks


def format_bytes(n: float) -> str:
    """Decimal megabytes, as the benchmark paper reports them (1 MB = 10^6 bytes)."""
    return f"{n / 1e6:.1f} MB"
