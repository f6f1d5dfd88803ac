"""Exact Euclidean k-nearest-neighbour search: faiss ``IndexFlatL2``, and a pure-torch reference.

Both return **Euclidean distances (not squared)** as float32 and indices as int64, sorted by
increasing distance, on the device of the queries.

Backend choice: a GPU index (``GpuIndexFlatL2``) when faiss sees a GPU *and* the bank lives on
CUDA, the CPU ``IndexFlatL2`` otherwise. faiss computes squared L2 by the BLAS expansion
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


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"knn: expected a 2-D (n, d) tensor, got shape {tuple(x.shape)}")
    return x.detach().float().contiguous()


@lru_cache(maxsize=None)
def _gpu_resources() -> "faiss.StandardGpuResources":
    """One set of GPU resources (scratch memory, streams) per process, shared by all indexes."""
    import faiss.contrib.torch_utils  # noqa: F401  (lets GPU indexes take CUDA tensors directly)

    return faiss.StandardGpuResources()


def use_gpu(bank: torch.Tensor) -> bool:
    """A GPU index only when faiss has GPUs and the bank already lives on CUDA."""
    return bank.is_cuda and faiss.get_num_gpus() > 0


class FlatL2Index:
    """An exact L2 index over a fixed bank (n, d); ``search`` returns (distances, indices)."""

    def __init__(self, bank: torch.Tensor) -> None:
        bank = _as_float32(bank)
        self.ntotal, self.d = bank.shape
        self.gpu = use_gpu(bank)
        if self.gpu:
            config = faiss.GpuIndexFlatConfig()
            config.device = bank.device.index or 0
            self.index = faiss.GpuIndexFlatL2(_gpu_resources(), self.d, config)
            self.index.add(bank)  # torch_utils: CUDA tensor in place, no host copy
        else:
            self.index = faiss.IndexFlatL2(self.d)
            self.index.add(bank.cpu().numpy())

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
            squared, indices = self.index.search(queries.to(f"cuda:{self.index.getDevice()}"), k)
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


__all__ = ["FlatL2Index", "knn_faiss", "knn_torch", "use_gpu"]
