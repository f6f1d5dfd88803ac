"""clbench: a continual-learning benchmark for pixel-level industrial anomaly detection.

Packages: ``data`` (datasets, the synthetic one), ``features`` (what methods share), ``metrics``,
``engine`` (one run of a method from ``methods`` under a strategy from ``strategies``), ``sweep``
(many runs), ``reporting`` (run plots, the sweep report, paper profiles); ``cli`` and ``registry``
(name -> class, for methods and strategies) at the top."""

__version__ = "0.1.0"
