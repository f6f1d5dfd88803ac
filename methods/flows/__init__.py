"""The 2D normalizing-flow methods: FastFlow and CAINNFlow, on one shared skeleton (``common``:
backbone features, LayerNorm, FrEIA flows, loss, map and training). Importing ``fastflow`` or
``cainnflow`` registers that method only (a FastFlow run does not import CAINNFlow); importing the
package imports nothing (``clbench.registry`` finds the registrations in the source)."""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"CAINNFlow": "methods.flows.cainnflow", "FastFlow": "methods.flows.fastflow"}

__all__ = ["CAINNFlow", "FastFlow"]


def __getattr__(name: str) -> Any:
    """``methods.flows.FastFlow`` (``CAINNFlow``) still works, importing its module only when asked."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
