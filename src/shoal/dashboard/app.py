"""The dashboard's ASGI app (Starlette): the page, its JSON API and a server-sent event stream.

Routes:

* ``GET /`` -- the page (``static/index.html``; scripts and styles from ``/static``, uPlot
  vendored there: nothing is fetched from elsewhere);
* ``GET /api/state?since=N&audit_since=M`` -- :meth:`~shoal.dashboard.state.RunState.snapshot`
  (rows from N on, audit entries from M on; the canary and edges panels' data);
* ``GET /api/events?since=N&audit_since=M`` -- the same snapshot as server-sent events, sent
  when something changed, at most every ``dashboard.push_interval_s``;
* ``GET /api/devices?offset=&limit=`` -- the registry browser (attributes, windows, last seen,
  participation, recent outcomes; never a token or a key);
* ``GET /api/versions`` -- the model store's versions, production pointer and history;
* ``POST /api/versions/{id}/promote`` and ``.../rollback`` -- need the operator token
  (``Authorization: Bearer``), a JSON body and a same-origin request.

Safe by default: every response carries a strict Content-Security-Policy (``'self'`` only, no
inline script), ``nosniff``, ``DENY`` framing and no referrer; a request naming another Host
is refused (DNS rebinding); a state-changing request from another site is refused before its
token is looked at (the token travels in a header a cross-site form cannot set, and a JSON
body needs a CORS preflight this app never grants).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from shoal.dashboard.control import check_token
from shoal.dashboard.state import finite
from shoal.errors import ConfigError, ShoalError

if TYPE_CHECKING:
    from shoal.dashboard.server import Dashboard

__all__ = ["STATIC", "build_app"]

STATIC = Path(__file__).resolve().parent / "static"
Scope = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                Awaitable[None]]

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"content-security-policy": _CSP, "x-content-type-options": "nosniff",
            "x-frame-options": "DENY", "referrer-policy": "no-referrer",
            "cross-origin-opener-policy": "same-origin",
            "cross-origin-resource-policy": "same-origin"}
_KEEPALIVE_S = 15.0
_MAX_PAGE = 200


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(finite(data), status_code=status,
                        headers={"cache-control": "no-store"})


def _error(status: int, message: str) -> JSONResponse:
    return _json({"error": message}, status)


class Guard:
    """ASGI middleware: security headers on every response, and only known Host headers.

    Args:
        app: the app it wraps.
        hosts: the accepted ``Host`` header values, or ``None`` to accept any (a dashboard
            behind a proxy with ``dashboard.allow_remote``); read on every request, so the
            server can fill it in once the port is bound.
    """

    def __init__(self, app: ASGI, hosts: Callable[[], frozenset[str] | None]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = self.hosts()
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if allowed is not None and host not in allowed:
            await _error(421, f"this dashboard does not serve Host {host!r}")(
                scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in _HEADERS.items():
                    headers[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise ConfigError(f"query parameter {name} must be an integer in {lo}..{hi}, "
                          f"got {text!r}", key=name)
    return int(text)


def _cross_site(request: Request) -> str:
    """Why a state-changing request is not from this dashboard's own page ('' if it is)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin is not None and origin != own:
        return f"cross-site request refused (Origin {origin!r} is not {own!r})"
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return "state-changing requests must send Content-Type: application/json"
    return ""


def build_app(dash: Dashboard) -> ASGI:
    """The dashboard's app over ``dash`` (its state, registry, store control and token)."""

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def state(request: Request) -> Response:
        try:
            since = _int(request, "since", 0, 0, 2**62)
            audit_since = _int(request, "audit_since", 0, 0, 2**62)
        except ConfigError as exc:
            return _error(400, str(exc))
        await run_in_threadpool(dash.learn_num_params)
        return _json(dash.state.snapshot(since, audit_since))

    async def events(request: Request) -> Response:
        try:
            since = _int(request, "since", 0, 0, 2**62)
            audit_since = _int(request, "audit_since", 0, 0, 2**62)
        except ConfigError as exc:
            return _error(400, str(exc))

        async def stream() -> Any:
            nonlocal since, audit_since
            last, quiet = -1, 0.0
            dash.streams += 1
            try:
                yield "retry: 2000\n\n"
                while not dash.closing:
                    if dash.state.changes != last:
                        await run_in_threadpool(dash.learn_num_params)
                        last = dash.state.changes
                        snap = dash.state.snapshot(since, audit_since)
                        since, audit_since = snap["next"], snap["audit_next"]
                        yield f"event: state\ndata: {json.dumps(snap, allow_nan=False)}\n\n"
                        dash.pushed = max(dash.pushed, last)
                        quiet = 0.0
                    elif quiet >= _KEEPALIVE_S:
                        yield ": keep-alive\n\n"
                        quiet = 0.0
                    await asyncio.sleep(dash.push_interval_s)
                    quiet += dash.push_interval_s
            finally:
                dash.streams -= 1

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store"})

    async def devices(request: Request) -> Response:
        if dash.registry_path is None:
            return _json({"available": False})
        try:
            offset = _int(request, "offset", 0, 0, 2**62)
            limit = _int(request, "limit", 50, 1, _MAX_PAGE)
        except ConfigError as exc:
            return _error(400, str(exc))
        return _json(await run_in_threadpool(dash.devices_page, offset, limit))

    async def versions(request: Request) -> Response:
        control = dash.control
        if control is None:
            return _json({"available": False})
        return _json(await run_in_threadpool(control.listing))

    async def act(request: Request) -> Response:
        why = _cross_site(request)
        if why:
            return _error(403, why)
        if not check_token(dash.token, request.headers.get("authorization")):
            return JSONResponse({"error": "the operator token is missing or wrong"},
                                status_code=401, headers={"www-authenticate": "Bearer"})
        control = dash.control
        if control is None:
            return _error(409, "no model store is attached to this dashboard")
        text = request.path_params["version"]
        if not text.isdigit():
            return _error(400, f"{text!r} is not a version number")
        try:
            listing = await run_in_threadpool(control.act, request.path_params["action"],
                                              int(text))
        except ConfigError as exc:
            return _error(400, str(exc))
        except ShoalError as exc:  # the store refused (ModelStoreError) or its disk did
            return _error(409, str(exc))
        return _json(listing)

    app = Starlette(routes=[
        Route("/", page),
        Route("/api/state", state),
        Route("/api/events", events),
        Route("/api/devices", devices),
        Route("/api/versions", versions),
        Route("/api/versions/{version}/{action:str}", act, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    return Guard(app, lambda: dash.allowed_hosts)

