"""Metrics: ``anomaly`` (pixel/image AUROC, AUPRO, AP, F1-max, exact over every threshold) and
``forgetting`` (ACC, BWT, FM and the benchmark paper's relative forgetting from an accuracy matrix)."""
