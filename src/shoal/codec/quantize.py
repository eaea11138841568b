"""Low-bit quantizers of the value stream: stochastic uniform (8/4/2 bits) and scaled sign (1 bit).

* :class:`StochasticQuantize` — per block of ``block`` values, ``2^b`` evenly spaced levels over
  ``[min, max]`` (``scale="minmax"``) or ``[-max|x|, max|x|]`` (``"absmax"``); each value rounds
  to one of its two neighbouring levels with probabilities that make it unbiased,
  ``E[Q(x)] = x`` up to float32 rounding (~1e-5 of a step); stochastic rounding as in QSGD
  (Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
  Encoding", NeurIPS 2017). The error per element is below one step,
  ``(max - min) / (2^b - 1)``, and its variance at most step²/4.
  4- and 2-bit codes are bit-packed (two or four per byte, first value in the low bits).
* :class:`Sign` — ``scale · sign(x)`` with ``scale = ‖x‖₁ / d`` (per block if asked): the
  compressor of EF-SignSGD (Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD
  and other Gradient Compression Schemes", ICML 2019). It is biased; pair it with
  :class:`~shoal.codec.feedback.ErrorFeedback`. ``sign(0)`` is sent as ``+``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from shoal.codec.encoded import Encoded, Param, Role, expect_field
from shoal.errors import CodecError, ConfigError

__all__ = ["StochasticQuantize", "Sign", "pack_codes", "unpack_codes", "packed_length"]

# A scale costs 4 bytes: blocks under 8 values would spend more on scales than on codes (and
# the zstd stage's decompression bound relies on at most 1 scale byte per value).
_MIN_BLOCK = 8
_MAX_BLOCK = 1 << 24
_F32_SAFE = float(np.finfo(np.float32).max) * (1 - 1e-6)


def _check_block(block: object, key: str) -> None:
    if type(block) is not int or not _MIN_BLOCK <= block <= _MAX_BLOCK:
        raise ConfigError(f"{key} must be an integer in [{_MIN_BLOCK}, {_MAX_BLOCK}], got {block!r}", key=key)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _padded(v: np.ndarray, block: int, fill: float | None = None) -> np.ndarray:
    """``v`` padded to whole blocks and shaped ``(blocks, block)``.

    The tail repeats the last value (``fill=None``), which leaves a block's min/max unchanged.
    """
    nb = _blocks(v.size, block)
    if v.size == nb * block:
        return v.reshape(nb, block)
    out = np.empty(nb * block, dtype=v.dtype)
    out[: v.size] = v
    out[v.size :] = v[-1] if fill is None else fill
    return out.reshape(nb, block)


def packed_length(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy once packed."""
    return -(-count * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes below ``2**bits`` (``bits`` in 2, 4, 8), first code in the low bits."""
    if bits == 8:
        return codes.astype(np.uint8, copy=False)
    per = 8 // bits
    lanes = np.zeros(packed_length(codes.size, bits) * per, dtype=np.uint8)
    lanes[: codes.size] = codes
    out = lanes[0::per].copy()
    for j in range(1, per):  # loops over bit lanes (≤ 7), not elements
        out |= lanes[j::per] << np.uint8(j * bits)
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`; the caller has checked ``len(packed)``.

    Raises:
        CodecError: padding bits of the last byte are not zero (non-canonical payload).
    """
    if bits == 8:
        return packed
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty(packed.size * per, dtype=np.uint8)
    for j in range(per):
        out[j::per] = (packed >> np.uint8(j * bits)) & mask
    if out[count:].any():
        raise CodecError(f"{bits}-bit codes: padding bits after the last code are not zero")
    return out[:count]


@dataclass(frozen=True)
class StochasticQuantize:
    """Unbiased stochastic uniform quantization to ``bits`` ∈ {2, 4, 8} with per-block scales.

    Fields: ``"codes"`` (packed uint8), ``"step"`` (float32 per block) and, for ``"minmax"``,
    ``"lo"`` (float32 per block). Decoded value: ``lo + code · step`` (``lo = -step·(2^b-1)/2``
    for ``"absmax"``). A constant block has ``step = 0`` and decodes exactly.
    """

    bits: int = 8
    block: int = 256
    scale: Literal["minmax", "absmax"] = "minmax"

    name: ClassVar[str] = "quantize"
    role: ClassVar[Role] = "value"
    meta_keys: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if type(self.bits) is not int or self.bits not in (2, 4, 8):
            raise ConfigError(f"quantize.bits must be 2, 4 or 8, got {self.bits!r}", key="quantize.bits")
        _check_block(self.block, "quantize.block")
        if self.scale not in ("minmax", "absmax"):
            raise ConfigError(
                f"quantize.scale must be 'minmax' or 'absmax', got {self.scale!r}", key="quantize.scale"
            )

    @property
    def produces(self) -> frozenset[str]:
        return frozenset({"codes", "step", "lo"} if self.scale == "minmax" else {"codes", "step"})

    def params(self) -> dict[str, Param]:
        return {"bits": self.bits, "block": self.block, "scale": self.scale}

    @property
    def levels(self) -> int:
        """Largest code, ``2^bits - 1`` (there are ``levels + 1`` levels)."""
        return (1 << self.bits) - 1

    def encode(self, e: Encoded, rng: np.random.Generator) -> Encoded:
        v = expect_field(e, "values", "<f4", e.count, stage=self.name)
        top = self.levels
        if v.size == 0:
            empty = np.zeros(0, dtype="<f4")
            out = {"codes": np.zeros(0, np.uint8), "step": empty}
            return e.swap(["values"], out | ({"lo": empty} if self.scale == "minmax" else {}))
        m = _padded(v, self.block)
        if self.scale == "minmax":
            lo64 = m.min(axis=1).astype(np.float64)
            step64 = (m.max(axis=1) - lo64) / top
        else:
            step64 = 2.0 * np.abs(m).max(axis=1).astype(np.float64) / top
        # The widest level (top · step) must stay a finite float32, or decode would overflow.
        if not np.all(step64 * top < _F32_SAFE):
            raise CodecError("quantize: a block's range overflows float32; scale the update down")
        step = step64.astype(np.float32)
        lo = lo64.astype(np.float32) if self.scale == "minmax" else step * np.float32(-top / 2)
        safe = np.where(step > 0, step, np.float32(1))
        t = (m - lo[:, None]) / safe[:, None]
        t += rng.random(t.shape, dtype=np.float32)
        np.floor(t, out=t)
        np.clip(t, 0, top, out=t)
        codes = pack_codes(t.astype(np.uint8).ravel()[: v.size], self.bits)
        out = {"codes": codes, "step": step}
        return e.swap(["values"], out | ({"lo": lo} if self.scale == "minmax" else {}))

    def decode(self, e: Encoded) -> Encoded:
        nb = _blocks(e.count, self.block)
        packed = expect_field(e, "codes", "u1", packed_length(e.count, self.bits), stage=self.name)
        step = expect_field(e, "step", "<f4", nb, stage=self.name)
        if not (np.isfinite(step).all() and (step >= 0).all()):
            raise CodecError("quantize: field 'step' must be finite and non-negative")
        if self.scale == "minmax":
            lo = expect_field(e, "lo", "<f4", nb, stage=self.name)
            if not np.isfinite(lo).all():
                raise CodecError("quantize: field 'lo' must be finite")
        else:
            lo = step * np.float32(-self.levels / 2)
        codes = unpack_codes(packed, self.bits, e.count)
        if e.count == 0:
            values = np.zeros(0, dtype=np.float32)
        else:
            c = _padded(codes, self.block, fill=0)
            values = (lo[:, None] + c * step[:, None]).ravel()[: e.count]
        return e.swap(["codes", "step", "lo"], {"values": values})


@dataclass(frozen=True)
class Sign:
    """1-bit sign with an ℓ1 scale: ``Δ = (‖p‖₁/d)·sign(p)`` (EF-SignSGD), per block if set.

    Fields: ``"signs"`` (packed bits, 1 = non-negative) and ``"scale"`` (float32 per block;
    one block spanning the stream when ``block`` is ``None``).
    """

    block: int | None = None

    name: ClassVar[str] = "sign"
    role: ClassVar[Role] = "value"
    produces: ClassVar[frozenset[str]] = frozenset({"signs", "scale"})
    meta_keys: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if self.block is not None:
            _check_block(self.block, "sign.block")

    def params(self) -> dict[str, Param]:
        return {"block": self.block}

    def _block_of(self, count: int) -> int:
        return max(count, 1) if self.block is None else self.block

    def encode(self, e: Encoded, rng: np.random.Generator) -> Encoded:
        v = expect_field(e, "values", "<f4", e.count, stage=self.name)
        block = self._block_of(v.size)
        nb = _blocks(v.size, block)
        sums = _padded(np.abs(v), block, fill=0.0).sum(axis=1, dtype=np.float64) if nb else np.zeros(0)
        sizes = np.full(nb, block, dtype=np.float64)
        if nb:
            sizes[-1] = v.size - (nb - 1) * block
        scale = (sums / sizes).astype(np.float32)
        signs = np.packbits(v >= 0, bitorder="little")
        return e.swap(["values"], {"signs": signs, "scale": scale})

    def decode(self, e: Encoded) -> Encoded:
        block = self._block_of(e.count)
        nb = _blocks(e.count, block)
        packed = expect_field(e, "signs", "u1", packed_length(e.count, 1), stage=self.name)
        scale = expect_field(e, "scale", "<f4", nb, stage=self.name)
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise CodecError("sign: field 'scale' must be finite and non-negative")
        bits = _unpack_signs(packed, e.count)
        if e.count == 0:
            values = np.zeros(0, dtype=np.float32)
        else:
            s = _padded(bits, block, fill=0).astype(np.float32) * 2 - 1
            values = (s * scale[:, None]).ravel()[: e.count]
        return e.swap(["signs", "scale"], {"values": values})


def _unpack_signs(packed: np.ndarray, count: int) -> np.ndarray:
    bits = np.unpackbits(packed, bitorder="little")
    if bits[count:].any():
        raise CodecError("sign: padding bits after the last sign are not zero")
    return bits[:count]
