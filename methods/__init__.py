"""Anomaly-detection methods, registered by name (see ``methods.base``): one module per method
(``padim.py``), or one package for a method made of several files (``efficientad/``, ``draem/``,
``flows/``), whose ``__init__`` imports the module(s) that register."""
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData

# Modules here that are not methods: discovery (``clbench.registry``) does not import them as methods.
HELPER_MODULES = ("base", "training")

__all__ = ["METHODS", "AnomalyMethod", "MethodContext", "Prediction", "TaskData"]
