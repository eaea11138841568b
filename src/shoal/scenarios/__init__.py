"""Lifecycle scenarios assembled from whole runs: the canary, drift and personalization
experiments of ``docs/lifecycle.md`` and ``docs/personalization.md``. They train with
:class:`~shoal.experiment.Experiment` and the simulator, so they sit beside it."""
