"""Homomorphic aggregation as the round engine sees it: a streaming sum rule of the pipeline.

:class:`HEAggregation` satisfies the pipeline's ``SumRule`` protocol like plain summation and
SecAgg+ do (the three are interchangeable secure sums: stages such as central DP compose
around any of them). In simulation it plays every party of :mod:`shoal.privacy.he`: each
arriving row is clipped, weighted and encrypted under the public context as its client would,
folded into the aggregator's :class:`~shoal.privacy.he.CkksSum` at once (nothing is held but
one ciphertext set: ``holds_updates = False``), and at the end the key holder decrypts the one
sum. The mean is the example-weighted FedAvg mean of the clipped updates, within CKKS's
approximation error (about 1e-8 per contribution at scale 2^40).
"""

from __future__ import annotations

import numpy as np

from shoal.errors import UpdateRejected
from shoal.pipeline import Sum
from shoal.privacy.he import CkksParams, CkksSum, KeyHolder, encrypt_update, public_context

__all__ = ["HEAggregation"]


class _Run:
    def __init__(self, owner: HEAggregation, dim: int, step: int) -> None:
        self.owner, self.dim, self.step = owner, dim, step
        self.sum = CkksSum(owner.ctx, owner.params, dim, clip=owner.clip,
                           max_weight=owner.max_weight)
        self.uploads = 0

    @property
    def count(self) -> int:
        return self.sum.count

    def add(self, rows: np.ndarray, weights: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise UpdateRejected("wrong_shape", f"expected rows of {self.dim} values, got "
                                 f"shape {rows.shape}")
        o = self.owner
        for row, w in zip(rows, weights):
            weight = float(min(max(1.0, round(float(w))), o.max_weight))
            self.sum.add(encrypt_update(o.ctx, row, weight, clip=o.clip, slots=o.params.slots))

    def finish(self) -> Sum:
        o = self.owner
        vector, weight = o.key_holder.decrypt_sum(self.sum.result(), self.dim, self.count,
                                                  self.step)
        return Sum(vector, weight, self.count, {
            "he_upload_bytes": self.sum.bytes_in / max(1, self.count),
            "he_ring_degree": float(o.params.poly_modulus_degree),
            "he_security_bits": float(o.params.security_bits)})


class HEAggregation:
    """Simulated CKKS rounds (see the module docstring).

    Args:
        params: the CKKS parameters.
        clip: per-coordinate clipping range every client applies.
        max_weight: largest per-client weight (example count); larger counts are capped.
        min_clients: the key holder decrypts no sum of fewer contributions.
    """

    name = "ckks"
    holds_updates = False

    def __init__(self, params: CkksParams = CkksParams(), *, clip: float, max_weight: int,
                 min_clients: int = 2) -> None:
        self.params = params
        self.clip = float(clip)
        self.max_weight = int(max_weight)
        self.key_holder = KeyHolder(params, min_clients=min_clients)
        self.ctx = public_context(self.key_holder.public_context())

    def begin(self, dim: int, step: int) -> _Run:
        return _Run(self, dim, step)
