"""Exact Euclidean k-nearest-neighbour search: faiss ``IndexFlatL2``, and a pure-torch reference.

Both return **Euclidean distances (not squared)** as float32 and indices as int64, sorted by
increasing distance, on the device of the queries.

Backend choice (``choose_backend``): a GPU index (``GpuIndexFlatL2``) when the bank lives on CUDA
*and* faiss has GPU support and sees a GPU, the CPU ``IndexFlatL2`` otherwise, or when building the
GPU index fails; ``FlatL2Index.backend`` records which ("faiss-gpu" | "faiss-cpu") and
``backend_reason`` why (a CPU index on a CUDA run is a fallback worth seeing). faiss computes squared L2 by the BLAS expansion
||q||^2 - 2 q.b + ||b||^2 in float32; we clamp at 0 and take the square root. The index holds its
own copy of the bank (faiss owns its storage): it is a derived cache, rebuilt from the bank
tensor, and its bytes are reported by ``FlatL2Index.nbytes``.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch

# faiss's loader logs at INFO which SIMD build it tried (noise in every CLI run): keep warnings only
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402

log = logging.getLogger(__name__)


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"knn: expected a 2-D (n, d) tensor, got shape {tuple(x.shape)}")
    return x.detach().float().contiguous()


@lru_cache(maxsize=None)
def _gpu_resources() -> "faiss.StandardGpuResources":
    """One set of GPU resources (scratch memory, streams) per process, shared by all indexes."""
    import faiss.contrib.torch_utils  # noqa: F401  (lets GPU indexes take CUDA tensors directly)

    return faiss.StandardGpuResources()


GPU_BACKEND, CPU_BACKEND = "faiss-gpu", "faiss-cpu"


def choose_backend(device: torch.device) -> tuple[str, str]:
    """(backend, reason) for a bank on ``device``: the GPU index only for a bank already on CUDA,
    with a faiss that has GPU support and sees a GPU; otherwise the CPU index, and the reason
    names the missing condition."""
    if device.type != "cuda":
        return CPU_BACKEND, f"bank on {device.type}"
    if not all(hasattr(faiss, name) for name in ("StandardGpuResources", "GpuIndexFlatL2", "get_num_gpus")):
        return CPU_BACKEND, "faiss has no GPU support (a faiss-cpu build)"
    gpus = faiss.get_num_gpus()
    if gpus <= 0:
        return CPU_BACKEND, "faiss sees no GPU (faiss.get_num_gpus() == 0)"
    return GPU_BACKEND, f"bank on {device}, faiss sees {gpus} GPU(s)"


def _gpu_index(bank: torch.Tensor, device_index: int) -> "faiss.GpuIndexFlatL2":
    config = faiss.GpuIndexFlatConfig()
    config.device = device_index
    index = faiss.GpuIndexFlatL2(_gpu_resources(), bank.shape[1], config)
    index.add(bank)  # torch_utils: the CUDA tensor in place, no host copy
    return index


@lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    """One warning per reason and process: a CUDA run searching on the CPU is slow, and should say why."""
    log.warning("warning: knn: the bank is on CUDA but the faiss index is on the CPU: %s", reason)


class FlatL2Index:
    """An exact L2 index over a fixed bank (n, d); ``search`` returns (distances, indices).

    ``backend``: "faiss-gpu" or "faiss-cpu"; ``backend_reason``: why (``choose_backend``, or the
    error that made building the GPU index fall back to the CPU one)."""

    def __init__(self, bank: torch.Tensor) -> None:
        bank = _as_float32(bank)
        self.ntotal, self.d = bank.shape
        self.backend, self.backend_reason = choose_backend(bank.device)
        self.gpu_device: int | None = None
        if self.backend == GPU_BACKEND:
            index = bank.device.index
            self.gpu_device = index if index is not None else torch.cuda.current_device()
            try:
                self.index = _gpu_index(bank, self.gpu_device)
            except (RuntimeError, MemoryError) as err:  # faiss raises RuntimeError (e.g. out of GPU memory)
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self.backend, self.backend_reason = CPU_BACKEND, f"GPU index failed: {first_line}"
                self.gpu_device = None
        if self.backend == CPU_BACKEND and bank.is_cuda:
            _warn_fallback(self.backend_reason)
        if self.backend == CPU_BACKEND:
            self.index = faiss.IndexFlatL2(self.d)
            self.index.add(bank.cpu().numpy())

    @property
    def gpu(self) -> bool:
        """The index lives on a GPU (``backend == "faiss-gpu"``)."""
        return self.backend == GPU_BACKEND

    @property
    def nbytes(self) -> int:
        """Bytes of the index's own copy of the bank."""
        return self.ntotal * self.d * 4

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest bank rows of each query: distances (Euclidean) and indices, both (q, k)."""
        queries = _as_float32(queries)
        if queries.shape[1] != self.d:
            raise ValueError(f"knn: queries have {queries.shape[1]} dims, the index {self.d}")
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"knn: k={k} must be in 1..{self.ntotal} (bank size)")
        if self.gpu:
            squared, indices = self.index.search(queries.to(f"cuda:{self.gpu_device}"), k)
        else:
            sq, ind = self.index.search(queries.cpu().numpy(), k)
            squared, indices = torch.from_numpy(sq), torch.from_numpy(ind.astype(np.int64, copy=False))
        distances = squared.clamp_min(0).sqrt()
        return distances.to(queries.device), indices.long().to(queries.device)


def knn_faiss(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One-off exact search with a throw-away ``FlatL2Index`` (build one to search a bank often)."""
    return FlatL2Index(bank).search(queries, k)


def knn_torch(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, *, chunk_bytes: int = 1 << 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``torch.cdist`` + ``topk``, chunked over queries to bound the (q, n) matrix.

    Same contract as ``FlatL2Index.search``: Euclidean distances and int64 indices, (q, k).
    """
    queries, bank = _as_float32(queries), _as_float32(bank).to(queries.device)
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"knn: k={k} must be in 1..{bank.shape[0]} (bank size)")
    rows = max(1, chunk_bytes // (4 * bank.shape[0]))
    distances, indices = [], []
    for begin in range(0, queries.shape[0], rows):
        block = torch.cdist(queries[begin : begin + rows], bank)
        values, index = block.topk(k, dim=1, largest=False, sorted=True)
        distances.append(values)
        indices.append(index)
    if not distances:
        return torch.empty(0, k, device=queries.device), torch.empty(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(distances), torch.cat(indices)


__all__ = ["CPU_BACKEND", "GPU_BACKEND", "FlatL2Index", "choose_backend", "knn_faiss", "knn_torch"]
