"""Strategies: how a method sees the task stream (sequential, joint, and later replay)."""
from strategies.base import STRATEGIES, Experience, Strategy

__all__ = ["STRATEGIES", "Experience", "Strategy"]
