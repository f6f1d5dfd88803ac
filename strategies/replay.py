"""Replay: a buffer of N training images kept across tasks, mixed into every training batch.

While learning task t, each training batch is the current task's B images plus B images drawn from
the buffer ("B+B" mixing, seed 003; B is the method's batch size). After the task, the buffer is
updated by its storage policy (``balanced``: N // t per learned task; ``reservoir``). A step that
teaches several categories (a protocol's) offers each of them as a task: see ``BalancedBuffer``.
``buffer_size: 0`` is sequential training.
"""
from __future__ import annotations

from strategies.base import STRATEGIES
from strategies.replaying import ReplayBase, ReplayStream, by_category, concat

__all__ = ["Replay", "ReplayStream", "by_category", "concat"]


@STRATEGIES.register("replay")
class Replay(ReplayBase):
    """Replay: a buffer of ``buffer_size`` images mixed into every batch (module docstring)."""
