"""Update compression: sparsify → quantize/cast → entropy-code, error feedback, delta downloads.

Quick tour::

    from shoal.codec import Chain, TopK, StochasticQuantize, Zstd, ErrorFeedback, to_bytes, from_bytes

    chain = Chain([TopK(fraction=0.01), StochasticQuantize(bits=8), Zstd(level=3)])
    ef = ErrorFeedback(chain)                   # client side, one per client
    blob = to_bytes(ef.encode(update, rng))     # upload
    update_hat = from_bytes(blob, max_elements=spec.size)   # server side, validated

Modules: :mod:`~shoal.codec.encoded` (the representation between stages),
:mod:`~shoal.codec.cast`, :mod:`~shoal.codec.quantize`, :mod:`~shoal.codec.sparsify`,
:mod:`~shoal.codec.entropy` (the stages), :mod:`~shoal.codec.chain`,
:mod:`~shoal.codec.feedback`, :mod:`~shoal.codec.delta`, :mod:`~shoal.codec.wire`.
"""

from __future__ import annotations

from shoal.codec.cast import BFloat16, Float16
from shoal.codec.chain import STAGES, Chain, decode
from shoal.codec.delta import (
    Download,
    ModelHistory,
    decode_download,
    download_from_bytes,
    download_to_bytes,
    encode_download,
    require_lossless,
    smallest_download,
)
from shoal.codec.encoded import Codec, Encoded, Stage
from shoal.codec.entropy import Zstd
from shoal.codec.feedback import ErrorFeedback, feedback_step
from shoal.codec.quantize import Sign, StochasticQuantize
from shoal.codec.sparsify import RandomK, TopK
from shoal.codec.wire import Parsed, from_bytes, parse, to_bytes

__all__ = [
    "BFloat16",
    "Chain",
    "Codec",
    "Download",
    "Encoded",
    "ErrorFeedback",
    "Float16",
    "ModelHistory",
    "Parsed",
    "RandomK",
    "STAGES",
    "Sign",
    "Stage",
    "StochasticQuantize",
    "TopK",
    "Zstd",
    "decode",
    "decode_download",
    "download_from_bytes",
    "download_to_bytes",
    "encode_download",
    "feedback_step",
    "from_bytes",
    "parse",
    "require_lossless",
    "smallest_download",
    "to_bytes",
]
