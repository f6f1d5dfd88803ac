"""Strategies: how a method sees the task stream (sequential, joint, replay), registered by name."""
from strategies.base import STRATEGIES, Experience, Strategy

# Modules here that are not strategies: discovery (``clbench.registry``) does not import them as strategies.
HELPER_MODULES = ("base", "buffers")

__all__ = ["STRATEGIES", "Experience", "Strategy"]
