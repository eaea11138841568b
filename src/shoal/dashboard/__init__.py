"""The web dashboard: a run or a deployment as operators need to see it (docs/dashboard.md).

* :class:`RunState`, :class:`DashboardObserver` (:mod:`.state`) -- what the page shows, fed
  by the run's hooks like every other observer;
* :class:`RunDirFollower` (:mod:`.replay`) -- the same from a run directory, followed while
  ``shoal run`` writes it;
* :class:`ModelControl` (:mod:`.control`) -- promote and rollback on the real model store,
  behind the operator token;
* :class:`Dashboard` (:mod:`.server`) -- the Starlette app (:mod:`.app`) served by uvicorn on
  a background thread;
* :func:`write_report` (:mod:`.report`) -- one self-contained HTML file of a run directory.

Needs the ``dashboard`` extra (``starlette``, ``uvicorn``) to serve; the state, the replay
and the report need nothing beyond shoal's own dependencies. Nothing below the user-facing
edges imports this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "shoal.dashboard.state": ("DashboardObserver", "RunInfo", "RunState"),
    "shoal.dashboard.replay": ("RunDirFollower",),
    "shoal.dashboard.control": ("ModelControl", "check_token", "load_or_create_token"),
    "shoal.dashboard.server": ("Dashboard",),
    "shoal.dashboard.report": ("write_report",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'shoal.dashboard' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
