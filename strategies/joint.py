"""Joint training: all tasks' data at once in a single step (the upper bound)."""
from __future__ import annotations

from strategies.base import STRATEGIES, Experience, Strategy


@STRATEGIES.register("joint")
class Joint(Strategy):
    def experiences(self, tasks: list[str]) -> list[Experience]:
        return [Experience(0, "joint", tuple(tasks))]
