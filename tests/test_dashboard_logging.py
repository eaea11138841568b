"""Starting the dashboard leaves the process's logging alone. uvicorn's default start-up
reconfigures logging with ``dictConfig``, which flushes and closes every handler already
installed in the process; absl's handler (dp-accounting logs through absl) closes its stream
when closed -- in a test run, the captured stderr of the session, so pytest itself failed
after the next ``shoal launch``."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
absl_logging = pytest.importorskip("absl.logging")

from shoal.dashboard.server import Dashboard  # noqa: E402
from shoal.dashboard.state import RunInfo, RunState  # noqa: E402


def test_starting_the_dashboard_closes_no_existing_log_handler():
    handler = absl_logging.get_absl_handler().python_handler
    before, stream = handler.stream, io.StringIO()
    handler.stream = stream
    dash = Dashboard(RunState(RunInfo(name="x", mode="replay")), "t" * 40)
    try:
        dash.start("127.0.0.1", 0)
        assert not stream.closed
    finally:
        dash.stop()
        handler.stream = before
