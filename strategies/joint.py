"""Joint training: all tasks' data at once in a single step (the upper bound), whatever the schedule."""
from __future__ import annotations

from typing import Any, Sequence

from clbench.engine.tasks import categories_of
from strategies.base import STRATEGIES, Experience, Strategy


@STRATEGIES.register("joint")
class Joint(Strategy):
    def experiences(self, tasks: Sequence[Any]) -> list[Experience]:
        return [Experience(0, "joint", tuple(categories_of(tasks)))]
