"""What every call to the aggregator passes before its first message is read.

:class:`Admission` is the gRPC server's interceptor. It runs when a call starts, with only
its method and metadata in hand, and

* refuses a call without a valid device token (:meth:`CallGate.authenticate
  <shoal.transport.gate.CallGate.authenticate>`: signature, expiry, revocation) *before any
  of its messages is read*: the call gets ``UNAUTHENTICATED`` at once and holds no upload
  slot, buffer or handler, however many such calls a client opens or however slowly it
  would have sent them;
* cuts every admitted call whose caller goes quiet: each request message (a unary call's
  request, a stream's header and every chunk after it) must arrive within ``idle_timeout_s``
  of the previous one, or the call ends with ``DEADLINE_EXCEEDED`` within 1.25 x that (one
  :class:`_Watchdog` timer looks at every call; a device's runtime retries with backoff);
* bounds each method's request by its own limit (``max_request_bytes``, e.g. a few KiB for
  a check-in) *before* it is parsed: a larger one is refused ``INVALID_ARGUMENT`` having cost
  its bytes, never the memory of parsing it (a 3 MB map of metrics parses into hundreds of
  MB of Python objects).

To do both, every method is served as a request-streaming one: the interceptor reads the
request itself, with a timeout, and hands it to the servicer's handler unchanged (on the
wire a unary request is a stream of one message, so clients see no difference). The
servicer (:mod:`shoal.transport.server`) then checks what only the message can tell: that
the call's token is for the device the message names, its scope, mutual-TLS identity and
rate limit (:meth:`CallGate.check <shoal.transport.gate.CallGate.check>`).

Connections that never make a call are the server's options' job
(:func:`~shoal.transport.listener.server_options`): a TLS or HTTP/2 handshake that does not
finish, or a connection with no call in flight, is closed after the same ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc  # type: ignore[import-untyped]

from shoal.transport.gate import CallGate, CallRefused

__all__ = ["Admission", "STATUS"]

STATUS = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
          "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
          "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED}
"""The gRPC status of each :attr:`CallRefused.status <shoal.transport.gate.CallRefused>`."""


class Admission(grpc.aio.ServerInterceptor):
    """Token first, then idle timeouts and request size limits, for every call (see the
    module docstring).

    Args:
        gate: verifies the call's token (and counts and logs a refusal).
        idle_timeout_s: longest wait for a caller's next request message.
        clock: seconds since the epoch (tokens' expiry is on it).
        max_request_bytes: method name (``"Hello"``) -> largest request message it takes;
            a method not named takes what the server's message size allows.
        parsers: method name -> its request deserializer, in place of the servicer's
            (e.g. :func:`~shoal.transport.chunks.data_chunks` for a payload stream).
    """

    def __init__(self, gate: CallGate, idle_timeout_s: float,
                 clock: Callable[[], float],
                 max_request_bytes: Mapping[str, int] | None = None,
                 parsers: Mapping[str, Callable[[bytes], Any]] | None = None) -> None:
        self.gate, self.idle_timeout_s, self.clock = gate, float(idle_timeout_s), clock
        self.max_request_bytes = dict(max_request_bytes or {})
        self.parsers = dict(parsers or {})
        self.watchdog = _Watchdog(self.idle_timeout_s)
        # method -> (the servicer's handler, it wrapped): built once per method, not per call
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        try:
            self.gate.authenticate(handler_call_details.invocation_metadata or (),
                                   self.clock())
        except CallRefused as exc:
            return _refusing(handler, exc)
        method = handler_call_details.method.rpartition("/")[2]
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _timed(handler, self.watchdog, method, self.max_request_bytes.get(method),
                         self.parsers.get(method))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _refusing(handler: grpc.RpcMethodHandler, refused: CallRefused) -> grpc.RpcMethodHandler:
    """A handler that aborts the call with ``refused`` without reading a message."""
    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(STATUS[refused.status], str(refused))

    return _streaming(handler, refuse)


def _timed(handler: grpc.RpcMethodHandler, dog: _Watchdog, method: str,
           limit: int | None, parse: Callable[[bytes], Any] | None = None
           ) -> grpc.RpcMethodHandler:
    """``handler`` with its request(s) read under ``dog``'s timeout per message, each at
    most ``limit`` bytes (``None``: any) before it is parsed (by ``parse``, default the
    handler's deserializer)."""
    parse = parse or handler.request_deserializer
    deserialize = parse if limit is None else _bounded(parse, limit)

    def paced(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        return _paced(requests, context, dog, method, limit)

    if handler.request_streaming and handler.response_streaming:
        inner = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in inner(paced(requests, context), context):
                yield response
        return _streaming(handler, stream_stream, deserialize)
    if handler.request_streaming:
        inner = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(paced(requests, context), context)
        return _streaming(handler, stream_unary, deserialize)
    if handler.response_streaming:
        inner = handler.unary_stream

        async def unary_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            request = await _one(requests, context, dog, method, limit)
            async for response in inner(request, context):
                yield response
        return _streaming(handler, unary_stream, deserialize)
    inner = handler.unary_unary

    async def unary_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await inner(await _one(requests, context, dog, method, limit), context)
    return _streaming(handler, unary_unary, deserialize)


def _streaming(handler: grpc.RpcMethodHandler, behavior: Any,
               deserialize: Any = None) -> grpc.RpcMethodHandler:
    """``behavior`` as a request-streaming handler with ``handler``'s serializer (which
    lets a response the servicer serialized itself, ``bytes``, go as it is) and
    ``deserialize`` (default ``handler``'s)."""
    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming \
        else grpc.stream_unary_rpc_method_handler
    return make(behavior, request_deserializer=deserialize or handler.request_deserializer,
                response_serializer=_passing(handler.response_serializer))


def _passing(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """``serialize``, except that a response already serialized (``bytes``, e.g. a model
    chunk every device downloads alike) is sent as it is."""
    if serialize is None:
        return None

    def out(message: Any) -> bytes:
        return message if type(message) is bytes else serialize(message)
    return out


class _TooLarge:
    """What a request above its method's limit deserializes to (it is never parsed)."""

    def __init__(self, size: int) -> None:
        self.size = size


def _bounded(parse: Callable[[bytes], Any] | None, limit: int) -> Callable[[bytes], Any]:
    """``parse`` for requests of at most ``limit`` bytes; larger ones become
    :class:`_TooLarge` unparsed."""
    def deserialize(raw: bytes) -> Any:
        if len(raw) > limit:
            return _TooLarge(len(raw))
        return parse(raw) if parse is not None else raw
    return deserialize


async def _one(requests: Any, context: grpc.aio.ServicerContext, dog: _Watchdog,
               method: str, limit: int | None) -> Any:
    """A unary call's request, within ``dog``'s timeout and at most ``limit`` bytes (not
    waiting for the caller's end of stream after it)."""
    watch = _Watch(dog)
    try:
        watch.waiting()
        message = await requests.__aiter__().__anext__()
    except StopAsyncIteration:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
    except asyncio.CancelledError:
        if not watch.cut():
            raise
        await _idle(context, dog.timeout)
    finally:
        watch.stop()
    if isinstance(message, _TooLarge):
        await _too_large(context, method, message, limit)
    return message


async def _paced(requests: Any, context: grpc.aio.ServicerContext, dog: _Watchdog,
                 method: str, limit: int | None) -> AsyncIterator[Any]:
    """The request stream, each message within ``dog``'s timeout of the previous one (else
    the call is aborted ``DEADLINE_EXCEEDED``) and at most ``limit`` bytes (else
    ``INVALID_ARGUMENT``)."""
    iterator = requests.__aiter__()
    watch = _Watch(dog)
    try:
        while True:
            watch.waiting()
            try:
                message = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not watch.cut():
                    raise
                await _idle(context, dog.timeout)
            watch.received()
            if isinstance(message, _TooLarge):
                await _too_large(context, method, message, limit)
            yield message
    finally:
        watch.stop()


class _Watchdog:
    """The idle timeouts of all the calls of one server: one event-loop timer, armed while
    any call is watched, looks every quarter of ``timeout`` for calls that have waited
    ``timeout`` for their caller's next message and cancels their tasks. So a quiet caller
    is cut after ``timeout`` to ``1.25 * timeout``, and a call or message costs no timer of
    its own: arming and cancelling one per call (``asyncio.timeout``) or per message cost
    more than reading a check-in."""

    __slots__ = ("timeout", "_period", "_watches", "_loop", "_timer")

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self._period = self.timeout / 4
        self._watches: set[_Watch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, w: _Watch) -> asyncio.AbstractEventLoop:
        """Watch ``w`` (until :meth:`forget`); returns the loop whose clock it keeps."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._watches.add(w)
        if self._timer is None:
            self._timer = loop.call_later(self._period, self._sweep)
        return loop

    def forget(self, w: _Watch) -> None:
        self._watches.discard(w)

    def _sweep(self) -> None:
        self._timer = None
        if not self._watches or self._loop is None:
            return
        due = self._loop.time() - self.timeout
        for w in [w for w in self._watches if w.since is not None and w.since <= due]:
            w.fire()
        self._timer = self._loop.call_later(self._period, self._sweep)


class _Watch:
    """One call's wait for its caller's next message, kept by the server's
    :class:`_Watchdog`: a message costs two stores."""

    __slots__ = ("_dog", "_loop", "_task", "since", "_fired")

    def __init__(self, dog: _Watchdog) -> None:
        self._dog = dog
        self._task = asyncio.current_task()
        self.since: float | None = None  # when the wait for a message began (loop time)
        self._fired = False
        self._loop = dog.watch(self)

    def waiting(self) -> None:
        self.since = self._loop.time()

    def received(self) -> None:
        self.since = None

    def fire(self) -> None:
        """The caller has been quiet too long: cancel the call's task (once)."""
        self.since = None
        if self._task is not None and not self._fired:
            self._fired = True
            self._task.cancel()

    def cut(self) -> bool:
        """After a ``CancelledError`` in the wait: whether it was this watch's (then the
        task is uncancelled, for the call to be aborted as idle)."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        self._task.uncancel()
        return True

    def stop(self) -> None:
        self.since = None
        self._dog.forget(self)


async def _idle(context: grpc.aio.ServicerContext, timeout: float) -> None:
    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"idle: no message from the caller for {timeout:g} s")


async def _too_large(context: grpc.aio.ServicerContext, method: str, message: _TooLarge,
                     limit: int | None) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"a {method} request of {message.size} bytes is larger than the "
                        f"{limit} bytes it may take")
