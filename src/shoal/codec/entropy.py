"""Entropy coding of a whole payload with Zstandard (RFC 8878), always the last stage of a chain.

The stage packs every field it receives with :func:`~shoal.codec.encoded.pack_fields` and
compresses the bytes into one frame that records its content size. Decoding is bounded before
any byte is inflated: the declared raw size must fit the bound for the vector's length, the
frame header must declare exactly that size, the window is capped, and the frame must end
exactly at the end of the field (no trailing data, no second frame). zstd itself refuses to
write past the declared content size, so a decompression bomb fails after at most
:func:`raw_bound` bytes: twice the raw float32 size of the values carried, plus 1 KiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import zstandard

from shoal.codec.encoded import Encoded, Param, Role, expect_meta, pack_fields, unpack_fields
from shoal.errors import CodecError, ConfigError

__all__ = ["Zstd", "raw_bound"]


def raw_bound(count: int) -> int:
    """Upper bound on the packed fields of any chain before zstd, for ``count`` values.

    Per value, no stage writes more than 4 bytes (float32; quantizer and sign blocks hold at
    least 8 values, so their scales cost at most 1 byte per value) and a sparsifier at most 4
    more (uint32 gaps; a bitmap is only chosen when smaller). The field table is under 1 KiB.
    """
    return 8 * count + 1024


@dataclass(frozen=True)
class Zstd:
    """Zstandard-compress the packed fields (``level`` 1–22; 3 is zstd's default)."""

    level: int = 3

    name: ClassVar[str] = "zstd"
    role: ClassVar[Role] = "entropy"
    produces: ClassVar[frozenset[str]] = frozenset({"zstd"})
    meta_keys: ClassVar[frozenset[str]] = frozenset({"zstd_raw"})

    def __post_init__(self) -> None:
        if type(self.level) is not int or not 1 <= self.level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ConfigError(
                f"zstd.level must be an integer in [1, {zstandard.MAX_COMPRESSION_LEVEL}], "
                f"got {self.level!r}",
                key="zstd.level",
            )

    def params(self) -> dict[str, Param]:
        return {"level": self.level}

    def encode(self, e: Encoded, rng: np.random.Generator) -> Encoded:
        raw = pack_fields(e.fields)
        frame = zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(raw)
        return e.swap(
            list(e.fields),
            {"zstd": np.frombuffer(frame, dtype=np.uint8)},
            meta={**e.meta, "zstd_raw": len(raw)},
        )

    def decode(self, e: Encoded) -> Encoded:
        raw_size = expect_meta(e, "zstd_raw", 1, raw_bound(e.count), stage=self.name)
        frame_arr = e.fields.get("zstd")
        if frame_arr is None or frame_arr.dtype != np.uint8 or set(e.fields) != {"zstd"}:
            raise CodecError("zstd: expected exactly one uint8 field 'zstd'")
        frame = frame_arr.tobytes()
        try:
            header = zstandard.get_frame_parameters(frame)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: bad frame header: {exc}") from exc
        if header.content_size != raw_size:
            unknown = header.content_size == zstandard.CONTENTSIZE_UNKNOWN
            declared = "unknown" if unknown else header.content_size
            raise CodecError(f"zstd: frame declares content size {declared}, payload declares {raw_size}")
        max_window = 1 << max(10, (raw_size - 1).bit_length())
        if header.window_size > max_window:
            raise CodecError(f"zstd: window size {header.window_size} above the bound {max_window}")
        dobj = zstandard.ZstdDecompressor(max_window_size=max_window).decompressobj()
        try:
            raw = dobj.decompress(frame)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: corrupt frame: {exc}") from exc
        if not dobj.eof or dobj.unused_data or len(raw) != raw_size:
            raise CodecError(
                f"zstd: frame is truncated or followed by extra data "
                f"({len(raw)} of {raw_size} bytes decompressed)"
            )
        meta = {k: v for k, v in e.meta.items() if k != "zstd_raw"}
        return e.swap(["zstd"], unpack_fields(raw), meta=meta)
