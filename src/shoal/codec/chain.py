"""Chains of codec stages, the registry of stage names, and building a chain from a spec.

A chain is ``[sparsifier] → [value codec] → [entropy coder]``, each part optional and at most
once, in that order: a sparsifier needs the dense float values, a quantizer or cast needs float
values (dense or the kept ones), and zstd needs the final fields. Anything else is refused when
the chain is built, with :class:`~shoal.errors.ConfigError`. The empty chain sends raw float32.

A chain's *spec* is ``((name, params), ...)`` — JSON-friendly, so configs and the wire header
use the same description, and a server can decode any payload from the spec it carries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from shoal.codec.cast import BFloat16, Float16
from shoal.codec.encoded import (
    MAX_SIZE,
    ChainSpec,
    Encoded,
    Stage,
    as_update,
    expect_field,
)
from shoal.codec.entropy import Zstd
from shoal.codec.quantize import Sign, StochasticQuantize
from shoal.codec.sparsify import RandomK, TopK
from shoal.errors import CodecError, ConfigError

__all__ = ["Chain", "STAGES", "decode", "chain_of"]

#: Every stage class by its wire name.
STAGES: Mapping[str, type[Any]] = {
    cls.name: cls for cls in (TopK, RandomK, Float16, BFloat16, StochasticQuantize, Sign, Zstd)
}
_RANK = {"sparsify": 0, "value": 1, "entropy": 2}


class Chain:
    """An ordered composition of stages; itself a :class:`~shoal.codec.encoded.Codec`.

    Example: ``Chain([TopK(fraction=0.01), StochasticQuantize(bits=8), Zstd(level=3)])``.

    Raises:
        ConfigError: on construction, for an order other than sparsify → value → entropy
            or a role used twice.
    """

    __slots__ = ("stages",)

    def __init__(self, stages: Sequence[Stage] = ()) -> None:
        stages = tuple(stages)
        last: Stage | None = None
        for i, stage in enumerate(stages):
            role = getattr(stage, "role", None)
            if role not in _RANK:
                key = f"codec.chain[{i}]"
                raise ConfigError(f"{key}: {stage!r} is not a codec stage", key=key)
            if last is not None and _RANK[role] <= _RANK[last.role]:
                if role == last.role:
                    why = f"at most one {role} stage is allowed (got {last.name!r} and {stage.name!r})"
                else:
                    why = (
                        f"{stage.name!r} ({role}) cannot follow {last.name!r} ({last.role}); "
                        "the order is sparsify → value → entropy (zstd last)"
                    )
                raise ConfigError(f"codec.chain[{i}]: {why}", key=f"codec.chain[{i}]")
            last = stage
        self.stages: tuple[Stage, ...] = stages

    @classmethod
    def from_spec(cls, spec: Iterable[Any]) -> Chain:
        """Build a chain from ``[(name, {param: value}), ...]`` (lists work too, as in JSON).

        Each item may also be a mapping with a ``"codec"`` key, the shape a TOML or YAML config
        gives: ``[{"codec": "topk", "fraction": 0.01}, {"codec": "zstd"}]``.

        Raises:
            ConfigError: unknown stage name, unknown or invalid parameter, or a bad order.
        """
        stages = []
        for i, item in enumerate(spec):
            key = f"codec.chain[{i}]"
            if isinstance(item, Mapping):
                params = {k: v for k, v in item.items() if k != "codec"}
                name = item.get("codec")
            elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping):
                name, params = item
            else:
                raise ConfigError(f"{key}: expected [name, {{params}}], got {item!r}", key=key)
            stage_cls = STAGES.get(name) if isinstance(name, str) else None
            if stage_cls is None:
                raise ConfigError(f"{key}: unknown codec {name!r}; known: {sorted(STAGES)}", key=key)
            try:
                stages.append(stage_cls(**params))
            except TypeError as exc:
                raise ConfigError(f"{key}: bad parameters for {name!r}: {exc}", key=key) from exc
        return cls(stages)

    @classmethod
    def parse(cls, text: str, key: str = "compression.upload") -> Chain:
        """Build a chain from the config's compact form, stages joined by ``+``.

        ``"none"`` (raw float32), ``fp16``, ``bf16``, ``q8`` / ``q4`` / ``q2`` (stochastic
        quantization, optional block size ``q8(256)``), ``sign`` (optional block), ``topk(F)``
        and ``randk(F)`` (a fraction F of the coordinates), ``zstd`` (optional level
        ``zstd(3)``). Example: ``"topk(0.01)+q8+zstd"``.

        Raises:
            ConfigError: an unknown stage, a malformed argument, or a bad order (named by
                ``key``).
        """
        text = text.strip()
        if text in ("", "none"):
            return cls([])
        spec: list[tuple[str, dict[str, Any]]] = []
        for part in text.split("+"):
            part = part.strip()
            name, _, rest = part.partition("(")
            arg: float | None = None
            if rest:
                if not rest.endswith(")"):
                    raise ConfigError(f"{key} = {text!r}: malformed stage {part!r} (expected "
                                      f"name or name(number))", key=key)
                try:
                    arg = float(rest[:-1])
                except ValueError:
                    raise ConfigError(f"{key} = {text!r}: {part!r} needs a number in "
                                      f"parentheses", key=key) from None
            name = name.strip().lower()
            if name in ("q8", "q4", "q2"):
                params: dict[str, Any] = {"bits": int(name[1])}
                if arg is not None:
                    params["block"] = int(arg)
                spec.append(("quantize", params))
            elif name in ("topk", "randk"):
                if arg is None:
                    raise ConfigError(f"{key} = {text!r}: {name} needs a fraction, e.g. "
                                      f"{name}(0.01)", key=key)
                spec.append((name, {"fraction": arg}))
            elif name == "sign":
                spec.append(("sign", {} if arg is None else {"block": int(arg)}))
            elif name == "zstd":
                spec.append(("zstd", {} if arg is None else {"level": int(arg)}))
            elif name in ("fp16", "bf16"):
                spec.append((name, {}))
            else:
                raise ConfigError(f"{key} = {text!r}: unknown stage {name!r}; known: none, "
                                  f"fp16, bf16, q8, q4, q2, sign, topk(F), randk(F), zstd",
                                  key=key)
        try:
            return cls.from_spec(spec)
        except ConfigError as exc:
            raise ConfigError(f"{key} = {text!r}: {exc}", key=key) from None

    @property
    def spec(self) -> ChainSpec:
        """``((name, params), ...)`` describing this chain."""
        return tuple((s.name, s.params()) for s in self.stages)

    def __repr__(self) -> str:
        return f"Chain({list(self.stages)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(repr(self.spec))

    @property
    def sparse(self) -> bool:
        """Whether the chain has a sparsifier (then ``Encoded.count`` may be below ``size``)."""
        return any(s.role == "sparsify" for s in self.stages)

    def expected_fields(self) -> frozenset[str]:
        """Field names an encoded payload of this chain carries."""
        names = frozenset({"values"})
        for s in self.stages:
            names = s.produces if s.role == "entropy" else (names - {"values"}) | s.produces
        return names

    def expected_meta(self) -> frozenset[str]:
        """Meta keys an encoded payload of this chain carries."""
        return frozenset().union(*(s.meta_keys for s in self.stages))

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        """Encode a flat update. ``rng`` drives stochastic stages (quantizer, random-k).

        Raises:
            CodecError: ``x`` is not a finite 1-D float vector, or a stage cannot represent it.
        """
        x32 = as_update(x)
        values = x32 if self.stages else x32.copy()  # never alias the caller's buffer
        e = Encoded(size=int(x32.size), count=int(x32.size), fields={"values": values})
        for stage in self.stages:
            e = stage.encode(e, rng)
        return replace(e, spec=self.spec)

    def decode(self, e: Encoded, *, copy: bool = True, finite: bool = True) -> np.ndarray:
        """Decode to a fresh, writable float32 vector of length ``e.size``.

        ``copy=False``: a raw chain's result may instead be a view of the payload's own
        buffer (read-only if the buffer is), for a caller that owns that buffer and never
        reuses it (the aggregator's received upload: one copy of 0.8 MB less per update).
        ``finite=False``: the result is not checked for NaN and infinities, for a caller that
        checks every value itself (the aggregator's round validates each update).

        Raises:
            CodecError: ``e`` was made by another chain, or any field, length, index or scale
                is inconsistent, or the result is not finite.
        """
        self.check(e)
        given = e.fields.get("values")
        with np.errstate(all="ignore"):  # non-finite results are caught below, not warned
            for stage in reversed(self.stages):
                e = stage.decode(e)
        out = expect_field(e, "values", "<f4", e.size, stage="chain")
        if set(e.fields) != {"values"}:
            raise CodecError(f"chain: unexpected fields {sorted(set(e.fields) - {'values'})}")
        if finite and not np.isfinite(out).all():
            raise CodecError("chain: payload decodes to non-finite values",
                             reason="non_finite")
        # Never hand back the payload's own buffer (raw chain) or a read-only wire view,
        # unless the caller owns that buffer
        if copy and (out is given or not out.flags.writeable):
            return out.copy()
        return out

    def check(self, e: Encoded) -> None:
        """Validate the envelope of ``e`` (spec, sizes, field names, meta keys) without decoding."""
        if tuple(e.spec) != self.spec:
            raise CodecError(f"payload was encoded with chain {list(e.spec)}, decoder is {list(self.spec)}")
        if type(e.size) is not int or not 0 <= e.size <= MAX_SIZE:
            raise CodecError(f"element count {e.size!r} outside [0, {MAX_SIZE}]")
        low = 0 if self.sparse else e.size
        if type(e.count) is not int or not low <= e.count <= e.size:
            raise CodecError(f"value count {e.count!r} outside [{low}, {e.size}] for d={e.size}")
        if set(e.fields) != self.expected_fields():
            raise CodecError(f"payload fields {sorted(e.fields)}, expected {sorted(self.expected_fields())}")
        if set(e.meta) != self.expected_meta():
            raise CodecError(f"payload meta keys {sorted(e.meta)}, expected {sorted(self.expected_meta())}")


def decode(e: Encoded) -> np.ndarray:
    """Decode any payload from the chain spec it carries (the server does not need the config).

    Raises:
        CodecError: unknown or invalid chain spec, or anything :meth:`Chain.decode` refuses.
    """
    return chain_of(e.spec).decode(e)


def chain_of(spec: Iterable[Any]) -> Chain:
    """:meth:`Chain.from_spec` for untrusted specs: a bad spec is a :class:`CodecError`."""
    try:
        return Chain.from_spec(spec)
    except ConfigError as exc:
        raise CodecError(f"payload names an invalid codec chain: {exc}") from exc
