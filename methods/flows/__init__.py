"""The 2D normalizing-flow methods: FastFlow and CAINNFlow, on one shared skeleton (``common``:
backbone features, LayerNorm, FrEIA flows, loss, map and training). Importing the package registers both."""
from methods.flows.cainnflow import CAINNFlow
from methods.flows.fastflow import FastFlow

__all__ = ["CAINNFlow", "FastFlow"]
