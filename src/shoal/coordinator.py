"""The round engine: one synchronous federated round at a time.

The coordinator decides *when* and *with whom*: it samples clients, hands them the global
model and their settings through a :class:`ClientPool`, folds each arriving update into the
strategy's streaming accumulator, lets the strategy step, and evaluates. It does not know how
clients are reached: virtual clients in this process, Ray actors and devices over gRPC are
all pools. An edge aggregator is a coordinator downstream and a pool member upstream.

Randomness: the cohort of round ``r`` comes from the stream ``(seed, "sample", r)``, so a
resumed run picks the same clients. Time comes from a clock callable, never from the wall
directly, so simulated time and tests need no sleeping.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from shoal import seeds
from shoal.errors import ConfigError, ProtocolError, ShoalError, UpdateRejected
from shoal.strategy import ServerState, Strategy

__all__ = [
    "Aggregation", "RoundAbandoned", "ClientPool", "ClientUpdate", "UpdateBatch",
    "PartialAggregate", "TrainTask", "Sampler",
    "UniformSampler", "PoissonSampler", "RoundRecord", "Coordinator",
]


@dataclass(frozen=True)
class TrainTask:
    """What every client of a round receives.

    Attributes:
        round: the round number (1-based).
        params: the global model as a flat float32 vector (read-only for clients).
        settings: the strategy's per-round client settings (e.g. FedProx ``mu``).
    """

    round: int
    params: np.ndarray
    settings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round."""

    client_id: int
    delta: np.ndarray
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateBatch:
    """Several clients' updates at once, as rows of one matrix (the in-process pool's form:
    splitting it into single updates would only cost copies).

    Attributes:
        client_ids: int64 ``(k,)``.
        deltas: float32 ``(k, D)``.
        num_examples: int64 ``(k,)``.
        metrics: name -> float ``(k,)`` per-client values (e.g. ``loss``).
    """

    client_ids: np.ndarray
    deltas: np.ndarray
    num_examples: np.ndarray
    metrics: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PartialAggregate:
    """The weighted mean of several clients' updates, aggregated before it reached the
    coordinator: by secure aggregation (the server learns only this) or by an edge
    aggregator. It folds like one update of weight ``num_examples`` and counts as ``clients``
    accepted updates.

    Attributes:
        delta: float32 ``(D,)``, the weighted mean of the clients' deltas.
        num_examples: the total weight behind it.
        clients: how many client updates it holds (>= 1).
        metrics: values to record with the round (e.g. ``secagg_dropped``), and
            ``upload_bytes`` / ``download_bytes`` for the whole group.
    """

    delta: np.ndarray
    num_examples: int
    clients: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class RoundAbandoned(ShoalError):
    """Raised by a pool at the end of ``train`` when the round must not commit (e.g. fewer
    devices reported before the deadline than the round's minimum); the coordinator then
    discards what it folded and leaves the model unchanged."""


@runtime_checkable
class ClientPool(Protocol):
    """How the coordinator reaches clients.

    ``train`` yields updates as they arrive (one at a time or in batches). A client that
    fails or drops out simply yields nothing; a pool may raise :class:`UpdateRejected` *for a
    single update* only by yielding it -- the coordinator validates what it folds.
    """

    @property
    def num_clients(self) -> int: ...

    def train(self, task: TrainTask, client_ids: np.ndarray
              ) -> Iterable[ClientUpdate | UpdateBatch | PartialAggregate]: ...


class Sampler(Protocol):
    """Chooses a round's cohort from ``num_clients`` clients using ``rng``."""

    def sample(self, num_clients: int, rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True)
class UniformSampler:
    """``per_round`` clients uniformly at random without replacement (sorted ids)."""

    per_round: int

    def sample(self, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        if not 1 <= self.per_round <= num_clients:
            raise ConfigError(f"sampling.per_round = {self.per_round} must be between 1 and "
                              f"the number of clients ({num_clients})",
                              key="sampling.per_round")
        return np.sort(rng.choice(num_clients, size=self.per_round, replace=False))


@dataclass(frozen=True)
class PoissonSampler:
    """Each client joins independently with probability ``q`` (the sampling that
    differential-privacy accounting assumes); the cohort size varies and may be 0."""

    q: float

    def sample(self, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        if not 0.0 < self.q <= 1.0:
            raise ConfigError(f"sampling.q = {self.q} must be in (0, 1]", key="sampling.q")
        return np.flatnonzero(rng.random(num_clients) < self.q)


class Accumulator(Protocol):
    """A round's running aggregate (see :class:`~shoal.strategy.WeightedMean`)."""

    @property
    def count(self) -> int: ...

    def add(self, update: np.ndarray, weight: float) -> None: ...

    def add_stacked(self, updates: np.ndarray, weights: np.ndarray) -> None: ...


class Aggregation(Protocol):
    """Replaces the strategy's plain weighted mean for a round, e.g. with central
    differential privacy (clip every update, add noise to the sum).

    ``begin`` returns the accumulator updates are folded into; ``finish`` turns it into the
    mean delta the strategy then applies (the strategy's server optimizer sees it as the
    round's only update) and a dict of values to record, such as ``epsilon``. ``always_commits``
    says whether a round with no accepted update still releases a (noise-only) result.
    """

    always_commits: bool

    def begin(self, round: int, dim: int) -> Accumulator: ...

    def finish(self, acc: Accumulator, round: int) -> tuple[np.ndarray, dict[str, float]]: ...


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round (one line of the run's metrics).

    Attributes:
        round: round number (0 is the evaluation of the initial model).
        sampled: clients asked to train.
        accepted: updates folded into the aggregate.
        rejected: reason -> count of refused updates.
        examples: training examples behind the accepted updates.
        train_loss: example-weighted mean local training loss of accepted updates.
        committed: whether the global model changed this round.
        eval: central evaluation metrics (e.g. ``accuracy``, ``loss``), empty if skipped.
        seconds: duration by the coordinator's clock.
        bytes_up: bytes the accepted updates took on the wire (0 if the pool did not say).
        bytes_down: bytes sent to the sampled clients (model downloads).
        privacy: values from the round's :class:`Aggregation` (e.g. ``epsilon``).
    """

    round: int
    sampled: int = 0
    accepted: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    examples: int = 0
    train_loss: float = float("nan")
    committed: bool = False
    eval: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    privacy: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"round": self.round, "sampled": self.sampled, "accepted": self.accepted,
             "rejected": sum(self.rejected.values()), "examples": self.examples,
             "train_loss": self.train_loss, "committed": self.committed,
             "seconds": self.seconds, "bytes_up": self.bytes_up,
             "bytes_down": self.bytes_down}
        d.update({f"eval_{k}": v for k, v in self.eval.items()})
        d.update({f"privacy_{k}": v for k, v in self.privacy.items()})
        d.update({f"rejected_{k}": v for k, v in self.rejected.items()})
        return d


class Coordinator:
    """Runs synchronous rounds of a strategy over a client pool.

    Args:
        strategy: the aggregation rule (pure; state is passed in and out).
        pool: how clients are reached.
        sampler: who trains each round.
        seed: the run seed (cohorts derive from it and the round number).
        evaluate: central evaluation of a flat model, returning metrics; optional.
        clock: seconds as a float; ``time.perf_counter`` by default.
        aggregation: replaces the strategy's weighted mean (central DP); optional.
        sample_rng: the generator of a round's cohort, ``sample_rng(round, attempt)``; by
            default the run's seeded stream, so a resumed run picks the same clients. A
            deployment with differential privacy passes unpredictable generators: the
            accountant's sampling amplification assumes nobody can tell who was sampled.
    """

    def __init__(self, strategy: Strategy, pool: ClientPool, sampler: Sampler, *, seed: int,
                 evaluate: Callable[[np.ndarray], Mapping[str, float]] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 aggregation: Aggregation | None = None,
                 sample_rng: Callable[[int, int], np.random.Generator] | None = None) -> None:
        self.strategy = strategy
        self.pool = pool
        self.sampler = sampler
        self.seed = seed
        self.evaluate = evaluate
        self.clock = clock
        self.aggregation = aggregation
        self.last_abort: ProtocolError | None = None
        self.sample_rng = sample_rng or self._seeded_sample_rng

    def _seeded_sample_rng(self, round: int, attempt: int) -> np.random.Generator:
        path = (round,) if attempt == 0 else (round, attempt)
        return seeds.generator(self.seed, "sample", *path)

    def cohort(self, round: int, attempt: int = 0) -> np.ndarray:
        """The clients sampled for ``round`` (and retry ``attempt`` of it); with the default
        generators the same for the same seed, always."""
        return self.sampler.sample(self.pool.num_clients, self.sample_rng(round, attempt))

    def run_round(self, state: ServerState, *, evaluate: bool = True, attempt: int = 0
                  ) -> tuple[ServerState, RoundRecord]:
        """Run round ``state.round + 1`` and return the new state and its record.

        A round in which no update is accepted leaves the state unchanged
        (``committed = False``); the caller may retry it with the next ``attempt`` number,
        which samples a fresh cohort.
        """
        start = self.clock()
        rnd = state.round + 1
        cohort = self.cohort(rnd, attempt)
        task = TrainTask(round=rnd, params=state.params,
                         settings=self.strategy.client_config(state))
        acc = (self.aggregation.begin(rnd, state.params.size) if self.aggregation
               else self.strategy.accumulator(state))
        tally = _Tally()
        rejected = tally.rejected
        abandoned = False
        try:
            for item in self.pool.train(task, cohort):
                tally.fold(item, acc)
        except RoundAbandoned:
            abandoned = True
            rejected["round_abandoned"] += 1
        privacy: dict[str, float] = {}
        if abandoned:
            committed, new_state = False, state
        elif self.aggregation is not None:
            committed = acc.count > 0 or self.aggregation.always_commits
            new_state = state
            if committed:
                try:
                    mean, privacy = self.aggregation.finish(acc, rnd)
                except ProtocolError as exc:
                    # e.g. secure aggregation lost too many clients: nothing is revealed and
                    # the round is abandoned (the caller may retry with a fresh cohort)
                    committed = False
                    rejected["aggregation_aborted"] += 1
                    privacy = {"aborted": 1.0}
                    self.last_abort = exc
                else:
                    single = self.strategy.accumulator(state)
                    single.add(mean, 1.0)
                    new_state = self.strategy.apply(state, single)
        else:
            committed = acc.count > 0
            new_state = self.strategy.apply(state, acc) if committed else state
        metrics: dict[str, float] = {}
        if committed and evaluate and self.evaluate is not None:
            metrics = dict(self.evaluate(new_state.params))
        privacy = {**tally.group_metrics, **privacy}
        record = RoundRecord(
            round=rnd, sampled=len(cohort), accepted=acc.count + tally.merged,
            rejected=dict(rejected),
            examples=tally.examples,
            train_loss=tally.loss_sum / tally.loss_weight if tally.loss_weight
            else float("nan"),
            committed=committed, eval=metrics, seconds=self.clock() - start,
            bytes_up=tally.bytes_up, bytes_down=tally.bytes_down, privacy=privacy)
        return new_state, record


@dataclass
class _Tally:
    """What one round's arrivals add up to, besides the aggregate itself."""

    rejected: Counter[str] = field(default_factory=Counter)
    examples: int = 0
    loss_sum: float = 0.0
    loss_weight: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    merged: int = 0  # client updates inside partial aggregates, beyond one each
    group_metrics: dict[str, float] = field(default_factory=dict)

    def fold(self, item: ClientUpdate | UpdateBatch | PartialAggregate, acc: Accumulator
             ) -> None:
        """Fold one arrival into ``acc``; a refused update is counted by reason and leaves
        ``acc`` untouched (the accumulators validate before they add)."""
        try:
            if isinstance(item, PartialAggregate):
                if item.num_examples <= 0 or item.clients < 1:
                    self.rejected["no_data"] += 1
                    return
                acc.add(item.delta, float(item.num_examples))
                self.examples += int(item.num_examples)
                self.merged += int(item.clients) - 1
                self.bytes_up += int(item.metrics.get("upload_bytes", 0))
                for key, value in item.metrics.items():
                    if key not in ("upload_bytes", "download_bytes"):
                        self.group_metrics[key] = self.group_metrics.get(key, 0.0) + value
            elif isinstance(item, UpdateBatch):
                n = np.asarray(item.num_examples)
                keep = n > 0
                if not keep.all():
                    # clients without data contribute nothing (weight 0), not an error
                    self.rejected["no_data"] += int((~keep).sum())
                if keep.any():
                    rows = item.deltas if keep.all() else item.deltas[keep]
                    acc.add_stacked(rows, n[keep].astype(np.float64))
                    self.examples += int(n[keep].sum())
                    if "upload_bytes" in item.metrics:
                        up = np.asarray(item.metrics["upload_bytes"])
                        self.bytes_up += int(up[keep].sum())
                    loss = np.asarray(item.metrics.get("loss", np.full(len(n), np.nan)))
                    ok = keep & np.isfinite(loss)
                    self.loss_sum += float((loss[ok] * n[ok]).sum())
                    self.loss_weight += int(n[ok].sum())
            else:
                if item.num_examples <= 0:
                    self.rejected["no_data"] += 1
                    return
                acc.add(item.delta, float(item.num_examples))
                self.examples += int(item.num_examples)
                self.bytes_up += int(item.metrics.get("upload_bytes", 0))
                one_loss = item.metrics.get("loss")
                if one_loss is not None and np.isfinite(one_loss):
                    self.loss_sum += float(one_loss) * item.num_examples
                    self.loss_weight += int(item.num_examples)
        except UpdateRejected as exc:
            self.rejected[exc.reason] += 1
        finally:
            down = item.metrics.get("download_bytes", 0)
            self.bytes_down += int(np.sum(down))
