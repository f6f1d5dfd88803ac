"""DRAEM as a package: ``model`` (the method, registered as ``draem``), ``networks`` (reconstructive and
discriminative networks), ``losses`` (SSIM, focal) and ``simulator`` (Perlin-mask anomaly simulation).
Importing ``model`` registers the method; importing the package imports nothing (``clbench.registry``
finds the registration in the source)."""
from __future__ import annotations

from typing import Any

__all__ = ["DRAEM"]


def __getattr__(name: str) -> Any:
    """``methods.draem.DRAEM`` still works, importing ``model`` only when asked."""
    if name == "DRAEM":
        from methods.draem.model import DRAEM

        return DRAEM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
