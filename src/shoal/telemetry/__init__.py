"""The user-facing edges of a run: observers that show, write and export what happens.

* :class:`ProgressBar` (:mod:`.progress`) -- the bar every training command shows;
* :class:`RunDirWriter` (:mod:`.rundir`) -- the run directory;
* :class:`LogObserver`, :class:`JsonFormatter`, :func:`configure_json_logging`
  (:mod:`.logs`) -- structured logs;
* :class:`PrometheusObserver` (:mod:`.prometheus`, needs ``prometheus_client``) -- metrics.

Each is a :class:`~shoal.observers.Observer` handed to the run (``Experiment.run(observers=
...)``); nothing below this package imports it. Names are imported lazily, so reading logs
does not import tqdm, matplotlib or prometheus_client.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "shoal.telemetry.logs": ("JsonFormatter", "LogObserver", "configure_json_logging"),
    "shoal.telemetry.progress": ("ProgressBar",),
    "shoal.telemetry.prometheus": ("PrometheusObserver",),
    "shoal.telemetry.rundir": ("RunDirWriter", "make_run_dir"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'shoal.telemetry' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
