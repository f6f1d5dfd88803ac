"""Sequential fine-tuning: steps one after another, no replay (the lower bound). A step of several
categories (a protocol's) teaches them together."""
from __future__ import annotations

from typing import Any, Sequence

from strategies.base import STRATEGIES, Experience, Strategy


@STRATEGIES.register("sequential")
class Sequential(Strategy):
    def experiences(self, tasks: Sequence[Any]) -> list[Experience]:
        return Experience.stream(tasks)
