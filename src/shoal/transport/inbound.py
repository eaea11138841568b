"""Payloads streaming into the aggregator (uploads, masked inputs): bounded before they are read.

A header-then-data stream (``Upload``, ``SecAgg``) is taken in three steps, each refusing as
early as it can:

1. its header: the caller is authenticated by its token already
   (:class:`~shoal.transport.admission.Admission`); the server then checks the header's
   device and the declared size, which above the limit is refused (``too_large``) before a
   byte of data is read;
2. :class:`Inbound`: a device streams one payload at a time (a second one is refused with
   :class:`Busy`), and at most ``max_active`` payloads are read at once, the rest waiting
   under HTTP/2 flow control (their bytes stay on the devices);
3. :func:`read_payload`: the data, into a buffer that grows with what arrives (never
   allocated from the declared size), refused at the first chunk that goes past the
   declared size, then checked for length and SHA-256.

So the payload memory of the server is at most ``max_active x`` the limit, whatever the
number of callers; :func:`~shoal.transport.downloads.upload_limit` derives that limit from
the model and the task's codec.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from shoal.errors import ShoalError

__all__ = ["Busy", "Inbound", "Refusal", "read_payload"]


class Refusal(ShoalError):
    """A payload refused on the wire, before it reached a round.

    Attributes:
        reason: machine-readable (``"malformed"``, ``"too_large"``, ``"truncated"``,
            ``"checksum"``).
        detail: for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class Busy(ShoalError):
    """The device is already streaming a payload in (answered ``RESOURCE_EXHAUSTED``: its
    runtime retries after a backoff)."""


class Inbound:
    """Who is streaming a payload in (one stream per device) and how many are being read.

    Args:
        max_active: payloads read at once.
        on_active: told ``+1`` / ``-1`` as a payload starts and stops being read (metrics).
    """

    def __init__(self, max_active: int, on_active: Callable[[int], None] | None = None
                 ) -> None:
        if isinstance(max_active, bool) or not isinstance(max_active, int) or max_active < 1:
            raise ValueError(f"max_active must be an int >= 1, got {max_active!r}")
        self.max_active = max_active
        self._on_active = on_active or (lambda _: None)
        self._streaming: set[str] = set()
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop

    @property
    def streaming(self) -> frozenset[str]:
        """The devices with a payload in flight (waiting for a slot or being read)."""
        return frozenset(self._streaming)

    @contextmanager
    def stream_of(self, device: str) -> Iterator[None]:
        """Hold ``device``'s one inbound stream for the block.

        Raises:
            Busy: the device has one in flight already.
        """
        if device in self._streaming:
            raise Busy(f"a payload from {device!r} is already being received: one at a time")
        self._streaming.add(device)
        try:
            yield
        finally:
            self._streaming.discard(device)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for one of the ``max_active`` read slots and hold it for the block."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_active)
        async with self._slots:
            self._on_active(1)
            try:
                yield
            finally:
                self._on_active(-1)


async def read_payload(chunks: AsyncIterator[Any], total: int, sha256: bytes | None
                       ) -> tuple[bytearray, int]:
    """Read the data chunks that follow a header: exactly ``total`` bytes whose SHA-256 is
    ``sha256`` (``None``: not checked).

    Returns:
        ``(payload, bytes on the wire)``.

    Raises:
        Refusal: ``malformed`` (a second header, or more data than ``total``: refused at the
            first chunk that goes past it), ``truncated`` or ``checksum``.
    """
    buf, wire = bytearray(), 0
    async for chunk in chunks:
        wire += chunk.ByteSize()
        if chunk.WhichOneof("part") != "data":
            raise Refusal("malformed", "a second header")
        data = chunk.data  # a view of the received message (transport/chunks.py): no copy
        if len(buf) + len(data) > total:
            raise Refusal("malformed", "more data than total_size")
        buf += data
        del data
    if len(buf) != total:
        raise Refusal("truncated", f"{len(buf)} of {total} bytes")
    if sha256 is not None and hashlib.sha256(buf).digest() != sha256:
        raise Refusal("checksum", "SHA-256 of the payload does not match")
    return buf, wire
