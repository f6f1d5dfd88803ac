"""Sequential fine-tuning: tasks one after another, no replay (the lower bound)."""
from __future__ import annotations

from strategies.base import STRATEGIES, Experience, Strategy


@STRATEGIES.register("sequential")
class Sequential(Strategy):
    def experiences(self, tasks: list[str]) -> list[Experience]:
        return [Experience(step, name, (name,)) for step, name in enumerate(tasks)]
