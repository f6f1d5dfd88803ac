"""Strategies: how a method sees the task stream (sequential, joint, replay), registered by name."""
from strategies.base import STRATEGIES, Experience, Strategy

__all__ = ["STRATEGIES", "Experience", "Strategy"]
