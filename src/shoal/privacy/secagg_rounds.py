"""Secure aggregation as the round engine sees it: a sum rule of the aggregation pipeline.

:class:`SecAggAggregation` satisfies the pipeline's ``SumRule`` protocol (it holds the round's
updates, ``holds_updates = True``), so stages compose around it: central DP clips on the way
in and adds noise to the unmasked sum on the way out. It collects a
round's updates, then runs the real SecAgg / SecAgg+ state machines of
:mod:`shoal.privacy.secagg` in process (X25519, AES-GCM, AES-CTR masks, Shamir shares), with
the configured fraction of clients vanishing mid-protocol (after ShareKeys by default, the
case that forces the server to reconstruct their pairwise masks; or at any stage) -- and
returns the weighted mean the server learns
from the unmasked sum. The server side never sees an individual update; in simulation the
collector holds the cohort's updates only because it also plays every client (memory
O(cohort x model), unlike the streaming aggregators).

Weighting: each client masks ``w * x`` and ``w`` with ``w = min(examples, max_weight)``, so
the unmasked sum yields the example-weighted FedAvg mean, clipped to ``[-clip, clip]`` per
coordinate and quantized to ``value_bits`` (stochastic rounding, unbiased).

With a :class:`~shoal.privacy.rotated_encoding.RotatedPlan` instead (``rotated``), every
client weighs 1 and enters a ring of a few bits after the round's shared random rotation
(compression); when the plan carries noise, each client also adds its share of the
distributed discrete Gaussian (:mod:`shoal.privacy.ddg`), and a round with fewer than
``min_inputs`` masked inputs aborts before unmasking.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shoal.errors import ConfigError, UpdateRejected
from shoal.pipeline import Sum
from shoal.privacy.secagg_driver import SecAggConfig, run_secagg_round
from shoal.privacy.rotated_encoding import RotatedPlan
from shoal.privacy.secagg_encoding import FixedPoint, RingEncoding, ring_bytes
from shoal.privacy.secagg_graph import secagg_parameters
from shoal.privacy.secagg_messages import Stage

__all__ = ["SecAggAggregation", "SPARSE_FROM"]

#: Cohorts at least this large use SecAgg+ neighbourhoods when k is chosen automatically.
SPARSE_FROM = 100

# where a client can vanish: after the setup (it never advertises keys), after its keys, after
# its shares, after its masked input (in the sum, but it never helps unmask)
_STAGES = (Stage.SETUP, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT)


class _Collector:
    def __init__(self, owner: SecAggAggregation, dim: int, step: int) -> None:
        self.owner = owner
        self.step = step
        self.dim = dim
        self.rows: list[np.ndarray] = []
        self.weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self.rows)

    def add(self, updates: np.ndarray, weights: np.ndarray) -> None:
        if updates.ndim != 2 or updates.shape[1] != self.dim:
            raise UpdateRejected("wrong_shape", f"expected rows of {self.dim} values, got "
                                 f"shape {updates.shape}")
        if not np.isfinite(updates).all():
            raise UpdateRejected("non_finite", "an update holds NaN or infinity")
        if not (np.isfinite(weights).all() and (weights > 0).all()):
            raise UpdateRejected("bad_weight", "weights must be finite and > 0")
        self.rows.extend(np.array(updates, dtype=np.float32, copy=True))
        self.weights.extend(float(w) for w in weights)

    def finish(self) -> Sum:
        return self.owner.run_protocol(self, self.step)


class SecAggAggregation:
    """Simulated SecAgg+ rounds.

    Args:
        clip: per-coordinate clipping range c of the fixed-point encoding.
        value_bits: quantization bits per coordinate.
        max_weight: largest per-client weight (example count); larger counts are capped.
        neighbours, threshold: k and t; 0 picks them from the cohort size, ``dropout`` and
            ``corrupt_rate`` (Bell et al. 2020 via Google's parameter search); use
            ``neighbours = -1`` for the complete graph (plain SecAgg).
        dropout: fraction of each cohort that vanishes mid-protocol (simulated).
        dropout_stage: the last stage they complete before vanishing (``Stage.SHARE_KEYS``,
            the case that forces mask reconstruction, by default); ``None``: each at a point
            drawn uniformly from the four (``SETUP``: never advertises keys;
            ``ADVERTISE_KEYS``; ``SHARE_KEYS``; ``MASKED_INPUT``: its input is in the sum but
            it never helps unmask).
        post_quantum: hybrid X25519 + ML-KEM-768 pairwise keys.
        corrupt_rate: fraction of clients assumed to collude with the server (for k and t).
        rng_for_round: stochastic rounding (and noise) and the choice of who drops out.
        rotated: encode with this plan (unit weights, a few-bit ring after a random
            rotation, noise when the plan has some) instead of the fixed point of ``clip``,
            ``value_bits`` and ``max_weight``.
        rotation_seed: the 32-byte rotation seed of a round (needed with ``rotated``).
        min_inputs: fewer masked inputs abort a round before unmasking.
    """

    name = "secagg"
    holds_updates = True

    def __init__(self, *, clip: float, value_bits: int, max_weight: int, neighbours: int,
                 threshold: int, dropout: float, corrupt_rate: float,
                 rng_for_round: Callable[[int], np.random.Generator],
                 dropout_stage: Stage | None = Stage.SHARE_KEYS,
                 post_quantum: bool = False, rotated: RotatedPlan | None = None,
                 rotation_seed: Callable[[int], bytes] | None = None,
                 min_inputs: int = 1) -> None:
        if rotated is not None and rotation_seed is None:
            raise ConfigError("a rotated encoding needs each round's rotation seed",
                              key="rotation_seed")
        self.encoding = FixedPoint(clip=clip, value_bits=value_bits, max_weight=max_weight)
        self.rotated = rotated
        self.rotation_seed = rotation_seed
        self.min_inputs = min_inputs
        self.dropout_stage = dropout_stage
        self.post_quantum = post_quantum
        self.neighbours = neighbours
        self.threshold = threshold
        self.dropout = dropout
        self.corrupt_rate = corrupt_rate
        self.rng_for_round = rng_for_round

    def config_for(self, n: int, encoding: RingEncoding | None = None) -> SecAggConfig:
        """k and t for a cohort of ``n`` (with the fixed-point encoding, ``encoding``, or
        the rotated plan, which :meth:`SecAggConfig.bind` binds to a round).

        Automatic choice (``neighbours = 0``): below :data:`SPARSE_FROM` clients the complete
        graph with a majority threshold t = floor((n - 1) / 2) + 1 (tolerates nearly half of
        the cohort vanishing; secure against fewer than t colluding clients); from there on
        the SecAgg+ parameter search, whose small-n answers (k = 2, t = 2 at n = 10) cannot
        survive a single dropout in a neighbourhood.
        """
        enc = self.encoding if encoding is None else encoding
        plan = self.rotated if encoding is None else None
        if self.neighbours == -1 or (self.neighbours == 0 and n < SPARSE_FROM):
            t = self.threshold or (n - 1) // 2 + 1
            return SecAggConfig(enc, None, max(1, min(t, n - 1)),
                                post_quantum=self.post_quantum, min_inputs=self.min_inputs,
                                rotated=plan)
        if self.neighbours == 0:
            k, t = secagg_parameters(n, max(self.dropout, 1e-3), max(self.corrupt_rate, 1e-3))
        else:
            k = min(self.neighbours, n - 1)
            t = self.threshold or k // 2 + 1
        return SecAggConfig(enc, k, self.threshold or t, post_quantum=self.post_quantum,
                            min_inputs=self.min_inputs, rotated=plan)

    def begin(self, dim: int, step: int) -> _Collector:
        return _Collector(self, dim, step)

    def run_protocol(self, acc: _Collector, round: int) -> Sum:
        """Run the protocol over the collected updates; the sum the server learns.

        Raises:
            SecAggAborted: too few survivors in some neighbourhood; nothing is revealed.
        """
        rng = self.rng_for_round(round)
        n = acc.count
        ids = list(range(n))
        config = self.config_for(n)
        if self.rotated is not None:
            assert self.rotation_seed is not None
            config = config.bind(acc.dim, n, self.rotation_seed(round))
        weights = {i: int(min(max(1, round_half(w)), config.encoding.max_weight))
                   for i, w in zip(ids, acc.weights)}
        drops = [i for i in ids if rng.random() < self.dropout]
        after: dict[Stage, set[int]] = {}
        for i in drops:
            stage = self.dropout_stage if self.dropout_stage is not None \
                else _STAGES[int(rng.integers(len(_STAGES)))]
            after.setdefault(stage, set()).add(i)
        result = run_secagg_round(dict(zip(ids, acc.rows)), weights, config, after or None,
                                  rng)
        params = config.params_for(n, acc.dim)
        total = float(result.total_weight)
        extra = {}
        if self.rotated is not None and self.rotated.noise_std > 0:
            # every included client's noise share is in the sum (the DP stage checks it)
            extra["ddg_noise_shares"] = float(len(result.included))
        return Sum(result.mean.astype(np.float64) * total, total, len(result.included), {
            **extra,
            "secagg_upload_bytes": float(ring_bytes(params.bits) * params.length),
            "secagg_included": float(len(result.included)),
            "secagg_dropped": float(len(drops)),
            **{f"secagg_dropped_at_{stage.value}": float(len(who))
               for stage, who in after.items()},
            "secagg_neighbours": float(params.neighbours),
            "secagg_threshold": float(params.threshold),
            "secagg_ring_bits": float(params.bits),
        })


def round_half(w: float) -> int:
    return int(np.floor(w + 0.5))
