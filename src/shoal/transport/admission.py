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
  of the previous one, or the call ends with ``DEADLINE_EXCEEDED`` (a device's runtime
  retries that with backoff).

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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc  # type: ignore[import-untyped]

from shoal.transport.gate import CallGate, CallRefused

__all__ = ["Admission", "STATUS"]

STATUS = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
          "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
          "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED}
"""The gRPC status of each :attr:`CallRefused.status <shoal.transport.gate.CallRefused>`."""

class Admission(grpc.aio.ServerInterceptor):
    """Token first, then idle timeouts, for every call (see the module docstring).

    Args:
        gate: verifies the call's token (and counts and logs a refusal).
        idle_timeout_s: longest wait for a caller's next request message.
        clock: seconds since the epoch (tokens' expiry is on it).
    """

    def __init__(self, gate: CallGate, idle_timeout_s: float,
                 clock: Callable[[], float]) -> None:
        self.gate, self.idle_timeout_s, self.clock = gate, float(idle_timeout_s), clock

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
        return _timed(handler, self.idle_timeout_s)


def _refusing(handler: grpc.RpcMethodHandler, refused: CallRefused) -> grpc.RpcMethodHandler:
    """A handler that aborts the call with ``refused`` without reading a message."""
    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(STATUS[refused.status], str(refused))

    return _streaming(handler, refuse)


def _timed(handler: grpc.RpcMethodHandler, timeout: float) -> grpc.RpcMethodHandler:
    """``handler`` with its request(s) read under ``timeout`` per message."""
    if handler.request_streaming and handler.response_streaming:
        inner = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in inner(_paced(requests, context, timeout), context):
                yield response
        return _streaming(handler, stream_stream)
    if handler.request_streaming:
        inner = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(_paced(requests, context, timeout), context)
        return _streaming(handler, stream_unary)
    if handler.response_streaming:
        inner = handler.unary_stream

        async def unary_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            request = await _one(requests, context, timeout)
            async for response in inner(request, context):
                yield response
        return _streaming(handler, unary_stream)
    inner = handler.unary_unary

    async def unary_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await inner(await _one(requests, context, timeout), context)
    return _streaming(handler, unary_unary)


def _streaming(handler: grpc.RpcMethodHandler, behavior: Any) -> grpc.RpcMethodHandler:
    """``behavior`` as a request-streaming handler with ``handler``'s (de)serializers."""
    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming \
        else grpc.stream_unary_rpc_method_handler
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


async def _next(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                timeout: float) -> Any:
    """The next request message; ``StopAsyncIteration`` at the end of the stream; the call
    is aborted with ``DEADLINE_EXCEEDED`` if none comes within ``timeout``."""
    try:
        return await asyncio.wait_for(requests.__anext__(), timeout)
    except asyncio.TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"idle: no message from the caller for {timeout:g} s")


async def _one(requests: Any, context: grpc.aio.ServicerContext, timeout: float) -> Any:
    """A unary call's request (not waiting for the caller's end of stream after it)."""
    try:
        return await _next(requests.__aiter__(), context, timeout)
    except StopAsyncIteration:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")


async def _paced(requests: Any, context: grpc.aio.ServicerContext, timeout: float
                 ) -> AsyncIterator[Any]:
    """The request stream, each message within ``timeout`` of the previous one."""
    iterator = requests.__aiter__()
    while True:
        try:
            message = await _next(iterator, context, timeout)
        except StopAsyncIteration:
            return
        yield message
