"""``shoal dashboard``: the web dashboard of a run directory (followed while ``shoal run``
writes it); :class:`Operations`, the dashboard and tracer that ``shoal serve`` and
``shoal launch`` run beside their aggregator; :func:`serve_simulation`, the live dashboard of
``shoal run --dashboard``."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import threading
from pathlib import Path
from typing import Any

from shoal.config import Config
from shoal.config.operations import DashboardConfig
from shoal.errors import ConfigError
from shoal.observers import Observer

EPILOG = """\
examples:
  shoal dashboard runs/20261207-120451-seed0            # http://127.0.0.1:8080/
  shoal dashboard runs/X --address 127.0.0.1:0          # any free port (the URL is printed)
  shoal dashboard runs/X --store models                 # versions page: promote, roll back
  shoal dashboard work --store work/models              # a `shoal launch --canary --dir work`:
                                                        # the canary page from work/audit.jsonl

`shoal serve --dashboard 127.0.0.1:8080` and `shoal launch` (on by default) serve the live
dashboard of a deployment, `shoal run --dashboard 127.0.0.1:0` that of a simulation while it
runs. Details: docs/dashboard.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard", help="serve the web dashboard of a run directory",
        description="Serve the web dashboard of a run directory: accuracy and loss, time per "
                    "round, clients, traffic, privacy. A run that `shoal run` is still "
                    "writing is followed live. Runs until interrupted.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("--address", default="127.0.0.1:8080",
                   help="HOST:PORT to listen on (port 0 = any free one; default %(default)s)")
    p.add_argument("--allow-remote", dest="allow_remote", action="store_true",
                   help="allow an address other than loopback (plain HTTP: use a TLS proxy)")
    p.add_argument("--store", help="a model store to list, promote and roll back (opened "
                                   "read-only when an aggregator holds it)")
    p.add_argument("--audit", metavar="FILE",
                   help="the audit log whose canary rollouts the canary page shows "
                        "(default: audit.jsonl in the run directory, followed as it grows)")
    p.add_argument("--token-file", dest="token_file",
                   help="the operator token promote and rollback need (default: "
                        "dashboard-token in the store directory, created if missing)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal

    from shoal.dashboard.control import load_or_create_token
    from shoal.dashboard.replay import RunDirFollower
    from shoal.dashboard.server import Dashboard
    from shoal.store import ModelStore
    from shoal.store.model_versions import StoreLocked

    host, port = _host_port(args.address, args.allow_remote)
    follower = RunDirFollower(args.run_dir, audit=args.audit)
    store = None
    token = secrets.token_urlsafe(32)  # nothing to protect without a store
    if args.store:
        try:
            store = ModelStore(args.store)
        except StoreLocked as exc:
            print(f"shoal dashboard: {exc}; showing it read-only", file=sys.stderr)
            store = ModelStore(args.store, readonly=True)
        token_file = Path(args.token_file) if args.token_file \
            else Path(args.store) / "dashboard-token"
        token = load_or_create_token(token_file)
    dash = Dashboard(follower.state, token)
    if store is not None:
        dash.attach_store(store)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = dash.start(host, port, allow_remote=args.allow_remote)
        follower.start()
        print(url, flush=True)
        print(f"shoal dashboard: {url} ({follower.run_dir}"
              + (f"; operator token in {token_file}" if store is not None else "")
              + "); Ctrl-C stops", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        follower.stop()
        dash.stop()
        if store is not None:
            store.close()
    return 0


class Operations:
    """The dashboard and the tracer beside an aggregator, by ``cfg`` and the flags.

    Args:
        cfg: the run's configuration (``[dashboard]``, ``[tracing]``).
        work: the aggregator's state directory (token file and trace file default there).
        registry: the aggregator's registry file, for the devices page.
        address: where to serve the dashboard (``HOST:PORT``), or ``""`` for none.
        optional: the address is a default, not asked for: without the dashboard extra,
            say so and go on without a dashboard.
        log_events: also log the run's events (rounds, versions, rejections) as structured
            records (``--log-json``).
        quiet: print nothing.

    Raises:
        ConfigError: a bad address or token file, or one that cannot be bound or written.
    """

    def __init__(self, cfg: Config, work: Path, registry: Path, *, address: str,
                 optional: bool = False, log_events: bool = False, quiet: bool = False
                 ) -> None:
        from shoal.telemetry.logs import LogObserver

        self.logs = LogObserver(logging.getLogger("shoal.aggregator")) if log_events else None
        self.tracer = None
        if cfg["tracing"]["exporter"] != "none":
            try:
                from shoal.telemetry.tracing import tracing_from_config
            except ImportError:
                raise ConfigError("tracing needs opentelemetry-sdk (pip install "
                                  "shoal[dashboard])", key="tracing.exporter") from None
            self.tracer = tracing_from_config(cfg, work, run={
                "name": work.name, "strategy": cfg["strategy"]["name"],
                "policy": cfg["round"]["policy"], "clients": cfg["data"]["clients"]})
        self.dashboard: Any = None
        self.url = ""
        if address:
            try:
                self._start_dashboard(cfg, work, registry, address, optional, quiet)
            except BaseException:
                if self.tracer is not None:
                    self.tracer.close()
                raise

    def _start_dashboard(self, cfg: Config, work: Path, registry: Path, address: str,
                         optional: bool, quiet: bool) -> None:
        if not _can_serve(optional, quiet):
            return
        from shoal.dashboard.control import load_or_create_token
        from shoal.dashboard.server import Dashboard
        from shoal.dashboard.state import RunInfo, RunState

        d = cfg["dashboard"]
        host, port = _host_port(address, d["allow_remote"])
        token_file = Path(d["token_file"]) if d["token_file"] else work / "dashboard-token"
        state = RunState(RunInfo.of(cfg, work.name, "deployment"), history=d["history"])
        state.set_status("waiting", "for devices to enrol")
        self.dashboard = Dashboard(state, load_or_create_token(token_file),
                                   registry_path=registry,
                                   push_interval_s=d["push_interval_s"],
                                   span=self.tracer.span if self.tracer else None)
        self.url = self.dashboard.start(host, port, allow_remote=d["allow_remote"])
        if not quiet:
            print(f"dashboard: {self.url} (operator token in {token_file})", file=sys.stderr,
                  flush=True)

    @property
    def observers(self) -> list[Observer]:
        """What to hand the aggregator (``run_aggregator(observers=...)``)."""
        return [o for o in (self.dashboard.observer if self.dashboard else None,
                            self.tracer, self.logs) if o is not None]

    def on_store(self, store: Any, lock: threading.Lock) -> None:
        """Give the dashboard the aggregator's model store and the lock its commits hold."""
        if self.dashboard is not None:
            self.dashboard.attach_store(store, lock)

    def __enter__(self) -> Operations:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.close(error)

    def close(self, error: BaseException | None = None) -> None:
        """Say how the run ended, stop serving, flush the traces."""
        if self.dashboard is not None:
            self.dashboard.state.set_status("failed" if error else "finished",
                                            str(error) if error else "")
            self.dashboard.stop()
        if self.tracer is not None:
            self.tracer.close()


def _host_port(address: str, allow_remote: bool) -> tuple[str, int]:
    """``(host, port)`` of a dashboard ``address``, checked as ``dashboard.address`` is.

    Raises:
        ConfigError: not ``HOST:PORT``, or off loopback without ``allow_remote``.
    """
    return DashboardConfig.from_mapping({"address": address,
                                         "allow_remote": allow_remote}).host_port


def _can_serve(optional: bool, quiet: bool) -> bool:
    """Whether the dashboard extra is installed (if not, and the dashboard is only a
    default, say so unless ``quiet``).

    Raises:
        ConfigError: it is not installed and the dashboard was asked for.
    """
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        if not optional:
            raise ConfigError("the dashboard needs starlette and uvicorn (pip install "
                              "shoal[dashboard])", key="dashboard.address") from None
        if not quiet:
            print("no dashboard: starlette and uvicorn are not installed (pip install "
                  "shoal[dashboard])", file=sys.stderr)
        return False
    return True


def simulation_address(cfg: Config, address: str) -> tuple[str, int]:
    """``(host, port)`` of ``shoal run --dashboard ADDRESS``, checked before the run writes
    anything.

    Raises:
        ConfigError: the dashboard extra is missing, or a bad address (off loopback without
            ``dashboard.allow_remote``).
    """
    _can_serve(False, True)
    return _host_port(address, cfg["dashboard"]["allow_remote"])


def serve_simulation(cfg: Config, run_dir: Path, address: str, num_params: int, *,
                     quiet: bool = False) -> Any:
    """Serve the live dashboard of a simulation on ``address`` (``HOST:PORT``); its
    :attr:`~shoal.dashboard.server.Dashboard.observer` is to be handed to the run. Nothing
    on it changes state (no store), so its operator token is a fresh random one, never
    shown.

    Returns:
        The started :class:`~shoal.dashboard.server.Dashboard` (its URL printed unless
        ``quiet``).

    Raises:
        ConfigError: the dashboard extra is missing, or a bad or busy address.
    """
    host, port = simulation_address(cfg, address)
    from shoal.dashboard.server import Dashboard
    from shoal.dashboard.state import RunInfo, RunState

    d = cfg["dashboard"]
    state = RunState(RunInfo.of(cfg, run_dir.name, "simulation", num_params),
                     history=d["history"])
    dash = Dashboard(state, secrets.token_urlsafe(32), push_interval_s=d["push_interval_s"])
    url = dash.start(host, port, allow_remote=d["allow_remote"])
    if not quiet:
        print(f"dashboard: {url} (live while the run runs; afterwards: shoal dashboard "
              f"{run_dir})", file=sys.stderr, flush=True)
    return dash
