"""The dashboard as a running thing: :class:`Dashboard` serves the app with uvicorn on a
background thread, next to the run it shows.

It holds the run's :class:`~shoal.dashboard.state.RunState` (fed by :attr:`Dashboard.observer`
or by a run directory), the registry it browses (a read connection of its own to the
aggregator's SQLite file) and, once the aggregator hands it over, the model store's
:class:`~shoal.dashboard.control.ModelControl`.
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
import threading
import time
from pathlib import Path
from typing import Any

from shoal.dashboard.control import ModelControl
from shoal.dashboard.state import DashboardObserver, RunState
from shoal.errors import ConfigError
from shoal.store import ModelStore

__all__ = ["Dashboard"]

_LOOPBACK = {"127.0.0.1": ("127.0.0.1", "localhost"), "localhost": ("127.0.0.1", "localhost"),
             "::1": ("[::1]",)}


class Dashboard:
    """The web dashboard of one run.

    Args:
        state: what it shows.
        token: the operator token promote and rollback need.
        registry_path: the aggregator's SQLite registry to browse (``None``: no browser).
        push_interval_s: the longest an open page waits for news.
        span: wraps each promote and rollback (a tracer's ``span``), or ``None``.
    """

    def __init__(self, state: RunState, token: str, *, registry_path: str | Path | None = None,
                 push_interval_s: float = 1.0, span: Any = None) -> None:
        self.state = state
        self.token = token
        self.registry_path = Path(registry_path) if registry_path is not None else None
        self.push_interval_s = push_interval_s
        self.control: ModelControl | None = None
        self.observer = DashboardObserver(state)
        self.allowed_hosts: frozenset[str] | None = frozenset()
        self.closing = False
        self.streams = 0  # open event streams
        self.pushed = 0  # the newest state.changes an event stream has sent
        self.url = ""
        self._span = span
        self._registry: Any = None
        self._registry_lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- what it controls -------------------------------------------------------------------

    def attach_store(self, store: ModelStore, lock: threading.Lock | None = None) -> None:
        """Let the versions page list ``store`` and move its production pointer, holding
        ``lock`` (the one the aggregator holds when it commits) around every write."""
        self.control = ModelControl(store, lock, span=self._span)

    def learn_num_params(self) -> None:
        """Fill in the model's size (for the compression ratio) from the store, once it has
        a version, when the run did not say it."""
        if self.state.info.num_params or self.control is None:
            return
        n = self.control.num_params()
        if n:
            self.state.set_info(dataclasses.replace(self.state.info, num_params=n))

    def devices_page(self, offset: int, limit: int) -> dict[str, Any]:
        """Devices ``offset .. offset + limit`` of the registry (id order), with counts."""
        from shoal.registry import SQLiteRegistry

        with self._registry_lock:
            if self._registry is None:
                self._registry = SQLiteRegistry(self.registry_path)  # type: ignore[arg-type]
            reg = self._registry
            now = time.time()
            window = max(3 * self.state.info.checkin_interval_s, 10.0)
            rows = list(itertools.islice(reg.scan(), offset, offset + limit))
            out = []
            for d in rows:
                recent = reg.outcomes(d.device_id)[-5:]
                out.append({"id": d.device_id, "attributes": dict(d.attributes),
                            "windows": [list(w) for w in d.windows],
                            "enrolled_at": d.enrolled_at, "last_seen": d.last_seen,
                            "participation": d.participation,
                            "online": d.last_seen >= now - window,
                            "outcomes": [{"round": o.round, "outcome": o.outcome}
                                         for o in recent]})
            return {"available": True, "offset": offset, "total": reg.count(),
                    "online": reg.count(seen_since=now - window), "online_window_s": window,
                    "devices": out}

    # -- serving ----------------------------------------------------------------------------

    def start(self, host: str, port: int, *, allow_remote: bool = False) -> str:
        """Serve on ``host:port`` (0 = any free port) until :meth:`stop`; returns the URL.

        Raises:
            ConfigError: (key ``dashboard.address``) a non-loopback host without
                ``allow_remote``, or the address cannot be bound.
        """
        import uvicorn

        from shoal.dashboard.app import build_app

        if host not in _LOOPBACK and not allow_remote:
            raise ConfigError(f"the dashboard listens on loopback only (got {host!r}); set "
                              "dashboard.allow_remote = true behind a TLS proxy",
                              key="dashboard.address")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot serve the dashboard on {host}:{port}: "
                              f"{exc.strerror or exc}", key="dashboard.address") from None
        bound = sock.getsockname()[1]
        self.allowed_hosts = (frozenset(f"{h}:{bound}" for h in _LOOPBACK[host])
                              if host in _LOOPBACK else None)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/"
        # log_config=None: uvicorn's default dictConfig would close every log handler
        # already in the process (a library's handler closes its stream then)
        config = uvicorn.Config(build_app(self), log_config=None, log_level="warning",
                                access_log=False,
                                lifespan="off", http="h11", ws="none", loop="asyncio",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        server = self._server

        def serve() -> None:
            _name_os_thread(b"shoal-dashboard")  # its worker threads inherit the name
            server.run(sockets=[sock])

        self._thread = threading.Thread(target=serve, name="shoal-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the dashboard did not start on {host}:{bound}",
                                  key="dashboard.address")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        """Stop serving, once an open page has had the last change (how the run ended: at
        most two push intervals); open event streams end within one push interval."""
        deadline = time.monotonic() + 2 * self.push_interval_s + 0.2
        while (self.streams and self.pushed < self.state.changes
               and time.monotonic() < deadline):
            time.sleep(0.02)
        self.closing = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._registry_lock:
            if self._registry is not None:
                self._registry.close()
                self._registry = None


def _name_os_thread(name: bytes) -> None:
    """Give the calling thread an OS-level name (Linux ``prctl(PR_SET_NAME)``), so ``top -H``
    and ``/proc/<pid>/task/*/comm`` tell the dashboard's CPU apart (bench_load.py reads it).
    Best effort: elsewhere nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):
        pass
