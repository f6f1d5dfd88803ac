"""clbench: a continual-learning benchmark for pixel-level industrial anomaly detection."""

__version__ = "0.1.0"
