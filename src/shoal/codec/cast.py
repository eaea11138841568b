"""Half-precision casts of the value stream: IEEE float16 and bfloat16.

bfloat16 ("brain floating point", Kalamkar et al., "A Study of BFLOAT16 for Deep Learning
Training", 2019) keeps float32's 8-bit exponent and 7 mantissa bits: it is the top half of a
float32, rounded to nearest-even here by integer arithmetic on the uint32 bit pattern.
Relative error is at most 2^-8 (bfloat16) and 2^-11 (float16, normal range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from shoal.codec.encoded import Encoded, Param, Role, expect_field
from shoal.errors import CodecError

__all__ = ["Float16", "BFloat16", "bfloat16_bits", "bfloat16_values"]

_F16_MAX = float(np.finfo(np.float16).max)


def _values(e: Encoded, stage: str) -> np.ndarray:
    return expect_field(e, "values", "<f4", e.count, stage=stage)


@dataclass(frozen=True)
class Float16:
    """Cast values to IEEE binary16 (round to nearest even). Values beyond ±65504 are refused."""

    name: ClassVar[str] = "fp16"
    role: ClassVar[Role] = "value"
    produces: ClassVar[frozenset[str]] = frozenset({"values"})
    meta_keys: ClassVar[frozenset[str]] = frozenset()

    def params(self) -> dict[str, Param]:
        return {}

    def encode(self, e: Encoded, rng: np.random.Generator) -> Encoded:
        v = _values(e, self.name)
        peak = max(float(v.max()), -float(v.min())) if v.size else 0.0
        if peak > _F16_MAX:
            raise CodecError(
                f"fp16: |value| up to {peak:.4g} exceeds the float16 range {_F16_MAX}; "
                "use bf16 or a quantizer"
            )
        return e.swap(["values"], {"values": v.astype("<f2")})

    def decode(self, e: Encoded) -> Encoded:
        h = expect_field(e, "values", "<f2", e.count, stage=self.name)
        return e.swap(["values"], {"values": h.astype(np.float32)})


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest, ties to even.

    Adding 0x7FFF plus the lowest kept bit to the uint32 pattern and truncating is exactly
    round-half-to-even on the 16 dropped bits; finite inputs cannot overflow uint32.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (u >> 16) & np.uint32(1)
    return ((u + np.uint32(0x7FFF) + lsb) >> 16).astype("<u2")


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class BFloat16:
    """Cast values to bfloat16 (sent as uint16 bit patterns, round to nearest even)."""

    name: ClassVar[str] = "bf16"
    role: ClassVar[Role] = "value"
    produces: ClassVar[frozenset[str]] = frozenset({"bits"})
    meta_keys: ClassVar[frozenset[str]] = frozenset()

    def params(self) -> dict[str, Param]:
        return {}

    def encode(self, e: Encoded, rng: np.random.Generator) -> Encoded:
        bits = bfloat16_bits(_values(e, self.name))
        # Only |x| within half an ulp of float32's max rounds up to the infinity pattern.
        if bits.size and int(np.max(bits & np.uint16(0x7FFF))) >= 0x7F80:
            raise CodecError("bf16: a value rounds to infinity (|x| ≥ 3.3961e38)")
        return e.swap(["values"], {"bits": bits})

    def decode(self, e: Encoded) -> Encoded:
        bits = expect_field(e, "bits", "<u2", e.count, stage=self.name)
        return e.swap(["bits"], {"values": bfloat16_values(bits)})
