"""The web dashboard: a run or a deployment as operators need to see it (docs/dashboard.md).

* :mod:`.state` -- :class:`~.state.RunState`, what the page shows, fed by
  :class:`~.state.DashboardObserver` from the run's hooks like every other observer;
* :mod:`.canary` and :mod:`.edges` -- two of its pages: a canary rollout as its audit log
  records it, and a hierarchy's edge aggregators from their reports (with
  :class:`~.edges.EdgeLog`, a run directory's ``edges.jsonl``);
* :mod:`.replay` -- :class:`~.replay.RunDirFollower`, the same from a run directory, followed
  while ``shoal run`` writes it (its audit log and edge reports too), and
  :class:`~.replay.EdgeProcesses`, the edge processes of ``shoal launch --edges``;
* :mod:`.control` -- :class:`~.control.ModelControl`, promote and rollback on the real model
  store, behind the operator token;
* :mod:`.server` -- :class:`~.server.Dashboard`, the Starlette app (:mod:`.app`) served by
  uvicorn on a background thread;
* :mod:`.report` -- :func:`~.report.write_report`, one self-contained HTML file of a run
  directory.

Serving needs the ``dashboard`` extra (``starlette``, ``uvicorn``); the state, the replay and
the report need nothing beyond shoal's own dependencies. Nothing below the user-facing edges
imports this package; import from its modules (importing the package itself loads nothing).
"""
