"""The engine: one run of a method on a task stream. ``config`` (the run config), ``tasks`` (task
specs and presets), ``runner`` (the experiment: steps, evaluation, checkpoints, resume), ``rundir`` (the run folder: its
file names, readers, atomic writers, accuracy matrix and checkpoint),
``evaluation``, ``memory`` (memory accounting), ``environment`` (env.json), ``atomic`` (atomic file
writes) and ``locks`` (one process per run folder).

Nothing is imported here: ``clbench.engine.config`` stays light for the modules below the engine."""
