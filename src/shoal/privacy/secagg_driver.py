"""In-memory driver of one SecAgg / SecAgg+ round, for tests and the simulator.

Runs the very state machines of :mod:`shoal.privacy.secagg_client` and
:mod:`shoal.privacy.secagg_server` (Bonawitz et al., CCS 2017; Bell et al., CCS 2020), handing
messages across in process, with chosen clients vanishing after chosen stages. A transport
(gRPC, Ray) replaces this loop; the machines stay the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from shoal.errors import ConfigError, UpdateRejected
from shoal.privacy.rotated_encoding import RotatedPlan
from shoal.privacy.secagg_client import SecAggClient
from shoal.privacy.secagg_encoding import FixedPoint, RingEncoding
from shoal.privacy.secagg_graph import secagg_parameters
from shoal.privacy.secagg_messages import ClientMessage, SecAggParams, ServerMessage, Stage
from shoal.privacy.secagg_server import SecAggServer

__all__ = ["SecAggConfig", "SecAggResult", "run_secagg_ring", "run_secagg_round"]

_STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING)
_PREVIOUS = {
    Stage.ADVERTISE_KEYS: Stage.SETUP,
    Stage.SHARE_KEYS: Stage.ADVERTISE_KEYS,
    Stage.MASKED_INPUT: Stage.SHARE_KEYS,
    Stage.UNMASKING: Stage.MASKED_INPUT,
}


@dataclass(frozen=True)
class SecAggConfig:
    """How a round encodes and protects updates.

    Attributes:
        encoding: clipping, quantization and weight range (:class:`FixedPoint`, or one
            round of the rotated encoding).
        neighbours: k; ``None`` means the complete graph (plain SecAgg, k = n - 1).
        threshold: t; ``None`` means floor(k / 2) + 1 (a majority of the neighbours).
        post_quantum: hybrid X25519 + ML-KEM-768 pairwise keys (see ``SecAggParams``).
        min_inputs: the server unmasks nothing with fewer masked inputs (distributed DP's
            h + f); 1 for any.
        rotated: a run's rotated encoding not yet bound to a round (:meth:`bind` replaces
            ``encoding`` with the round's); ``None`` once bound or with the fixed point.
    """

    encoding: RingEncoding
    neighbours: int | None = None
    threshold: int | None = None
    post_quantum: bool = False
    min_inputs: int = 1
    rotated: RotatedPlan | None = None

    def bind(self, dim: int, n: int, rotation_seed: bytes) -> SecAggConfig:
        """This config for one round of ``n`` clients and ``dim``-long updates: with a
        rotated plan, its encoding (γ for the roster, the round's 32-byte rotation seed, e.g.
        :func:`~shoal.privacy.rotation.rotation_seed` of the session); else itself.

        Raises:
            ConfigError: the plan cannot serve the roster (see
                :func:`~shoal.privacy.rotated_encoding.plan_quantization`).
        """
        if self.rotated is None:
            return self
        return replace(self, encoding=self.rotated.for_round(dim, n, rotation_seed),
                       rotated=None)

    @classmethod
    def for_population(
        cls, encoding: FixedPoint, n: int, *, dropout_rate: float, corrupt_rate: float
    ) -> SecAggConfig:
        """k and t from :func:`~shoal.privacy.secagg_graph.secagg_parameters`."""
        k, t = secagg_parameters(n, dropout_rate, corrupt_rate)
        return cls(encoding, k, t)

    def params_for(self, n: int, d: int) -> SecAggParams:
        """Round parameters for n clients and d-dimensional updates (d + 1 ring entries)."""
        if self.rotated is not None:
            raise ConfigError("a rotated encoding must be bound to its round first "
                              "(SecAggConfig.bind)", key="encoding")
        k = n - 1 if self.neighbours is None else self.neighbours
        t = k // 2 + 1 if self.threshold is None else self.threshold
        if k > n - 1:
            raise ConfigError(f"neighbours k={k} exceeds n-1={n - 1}", key="neighbours")
        bits = self.encoding.ring_bits(n)
        return SecAggParams(neighbours=k, threshold=t, bits=bits,
                            length=self.encoding.length(d), post_quantum=self.post_quantum)


@dataclass(frozen=True)
class SecAggResult:
    """Outcome of a round.

    Attributes:
        mean: weighted mean of the included clients' clipped updates (float64, length d).
        total_weight: sum of the included clients' weights.
        included: the clients whose updates are in the mean (U3).
    """

    mean: np.ndarray
    total_weight: int
    included: frozenset[int]


def run_secagg_ring(
    vectors: Mapping[int, np.ndarray],
    params: SecAggParams,
    drop_after: Mapping[Stage, set[int]] | None = None,
    *,
    server_inbox: list[ClientMessage] | None = None,
    session: bytes | None = None,
    graph_seed: bytes | None = None,
    min_inputs: int = 1,
) -> tuple[np.ndarray, frozenset[int]]:
    """Drive one round over already-encoded ring vectors.

    Args:
        vectors: client id -> ring vector (see :class:`SecAggClient`); the keys are the roster.
        params: the round's parameters.
        drop_after: stage -> clients that complete that stage and then vanish
            (``Stage.SETUP``: never advertise keys; ``Stage.MASKED_INPUT``: send their masked
            input but never help unmask).
        server_inbox: if given, every message the server receives is appended to it.
        session, graph_seed: fixed values instead of fresh random ones.
        min_inputs: fewer masked inputs abort the round before unmasking.

    Returns:
        ``(sum of the included vectors mod 2^b, included client ids)``.

    Raises:
        SecAggAborted: too few survivors for the threshold.
    """
    drop_after = dict(drop_after or {})
    unknown = set(drop_after) - set(_PREVIOUS.values())
    if unknown:
        raise ConfigError(f"cannot drop after {sorted(s.value for s in unknown)}", key="drop_after")
    server = SecAggServer(params, vectors, session=session, graph_seed=graph_seed,
                          min_inputs=min_inputs)
    clients = {cid: SecAggClient(cid, vec) for cid, vec in vectors.items()}
    setup = server.setup()
    outgoing: dict[int, ServerMessage] = {cid: setup for cid in clients}
    alive = set(clients)
    for stage in _STAGES:
        alive -= set(drop_after.get(_PREVIOUS[stage], ()))
        for cid in sorted(outgoing):
            if cid in alive:
                reply = clients[cid].handle(outgoing[cid])
                if server_inbox is not None:
                    server_inbox.append(reply)
                server.receive(reply)
        outgoing = server.advance()
    return server.aggregate, server.included


def run_secagg_round(
    inputs: Mapping[int, np.ndarray],
    weights: Mapping[int, int] | None,
    config: SecAggConfig,
    drop_after: Mapping[Stage, set[int]] | None,
    rng: np.random.Generator,
    *,
    server_inbox: list[ClientMessage] | None = None,
) -> SecAggResult:
    """Encode float updates, run one secure-aggregation round, decode the weighted mean.

    Args:
        inputs: client id -> float update (all the same length d).
        weights: client id -> integer weight in [1, max_weight]; ``None`` for all ones.
        config: encoding and graph parameters.
        drop_after: see :func:`run_secagg_ring`.
        rng: stochastic-rounding randomness (masks use the OS CSPRNG, not this).
        server_inbox: see :func:`run_secagg_ring`.

    Raises:
        SecAggAborted: too few survivors for the threshold.
        UpdateRejected: a non-finite or non-vector input.
    """
    if not inputs:
        raise ConfigError("no inputs", key="inputs")
    shapes = sorted({np.shape(x) for x in inputs.values()})
    if len(shapes) != 1 or len(shapes[0]) != 1:
        raise UpdateRejected("wrong_shape", f"inputs must be 1-D of one length, got {shapes}")
    (d,) = shapes[0]
    if weights is not None and set(weights) != set(inputs):
        raise ConfigError("weights must name exactly the clients in inputs", key="weights")
    params = config.params_for(len(inputs), d)
    vectors = {
        cid: config.encoding.encode(x, 1 if weights is None else weights[cid], params.bits, rng)
        for cid, x in sorted(inputs.items())
    }
    total, included = run_secagg_ring(vectors, params, drop_after, server_inbox=server_inbox,
                                      min_inputs=config.min_inputs)
    mean, weight = config.encoding.decode(total)
    return SecAggResult(mean=mean, total_weight=weight, included=included)
