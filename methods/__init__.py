"""Anomaly-detection methods, registered by name (see ``methods.base``): one module per method
(``padim.py``), or one package for a method made of several files (``efficientad/``, ``draem/``,
``flows/``). ``clbench.registry`` finds each ``@METHODS.register("name")`` in the source, so listing
the methods imports none of them, and a run imports only the module of its own method."""
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData

__all__ = ["METHODS", "AnomalyMethod", "MethodContext", "Prediction", "TaskData"]
