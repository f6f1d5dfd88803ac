"""Anomaly-detection methods, one module each, registered by name (see ``methods.base``)."""
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData

__all__ = ["METHODS", "AnomalyMethod", "MethodContext", "Prediction", "TaskData"]
