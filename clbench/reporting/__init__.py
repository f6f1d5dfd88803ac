"""Reporting: a run's plots (``plots``), a sweep's report (``report``, built from ``cells``,
``tables``, ``sweep_plots`` and ``paper``), and paper profiles (``profile``, with the shipped
``profiles/*.yaml``: ``clbench reproduce`` and the published figures the report compares with)."""
