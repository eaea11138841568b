"""Reading a streamed payload's data chunks without parsing them.

An upload (``UploadChunk``) and a masked input (``SecAggChunk``) arrive as a header and then
chunks that are nothing but their ``data`` field (field 2 of the ``part`` oneof). Parsing
such a chunk copies its 256 KiB twice (into the protobuf message, then out of it as
``bytes``) before it is appended to the payload; :func:`data_chunks` reads the field's
bytes as a view of the received message instead, so they are copied once, into the
payload. A message that is anything else (the header, or a chunk with other fields) is
parsed as before, so what is accepted is exactly what the protobuf parser accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DataChunk", "data_chunks"]

_DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)


class DataChunk:
    """A chunk message that is only its ``data`` field, as the parsed message would answer:
    ``WhichOneof("part") == "data"`` and ``data`` (a read-only view of the received bytes);
    ``ByteSize()`` is the size received (the parser's re-encoded size differs only for a
    length written with more bytes than it needs)."""

    __slots__ = ("data", "_size")

    def __init__(self, data: memoryview, size: int) -> None:
        self.data, self._size = data, size

    def WhichOneof(self, group: str) -> str:  # noqa: N802 (protobuf's name)
        return "data"

    def ByteSize(self) -> int:  # noqa: N802 (protobuf's name)
        return self._size


def data_chunks(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer: ``parse`` (the chunk type's ``FromString``), except that a
    message made of exactly one ``data`` field becomes a :class:`DataChunk`."""
    def deserialize(raw: bytes) -> Any:
        size = len(raw)
        if size > 1 and raw[0] == _DATA_TAG:
            length, shift, i = 0, 0, 1
            while i < size and i <= 5:  # a length below 2**35 takes at most 5 bytes
                byte = raw[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    if i + length == size:
                        return DataChunk(memoryview(raw)[i:], size)
                    break
                shift += 7
        return parse(raw)
    return deserialize
