"""Bridges to other continual-learning toolkits (``avalanche``: clbench streams as Avalanche benchmarks)."""
