"""(ε, δ) accounting for client-level DP-FedAvg, backed by Google's ``dp-accounting``.

One federated round is one subsampled Gaussian mechanism on the population of clients. Which
``dp-accounting`` event describes it depends on how clients are sampled, and each event fixes
the neighbouring relation:

* ``"poisson"``: each client joins independently with probability q →
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add/remove-one-client adjacency, where
  the clipped sum has sensitivity C. RDP (Mironov, "Rényi Differential Privacy", 2017; Mironov,
  Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019) and
  PLD (Koskela et al. 2020; Doroshenko et al., "Connect the Dots", 2022) both support it.
* ``"fixed_size"``: exactly m of N clients, uniformly without replacement →
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z/2))``. dp-accounting supports it
  only in the RDP accountant (Wang, Balle and Kasiviswanathan, "Subsampled Rényi Differential
  Privacy and Analytical Moments Accountant", AISTATS 2019) and only under replace-one
  adjacency, where swapping one client's clipped update moves the sum by up to 2C: the event's
  noise multiplier (std / sensitivity) is therefore z/2. The ε is a replace-one ε and is not
  comparable one-to-one with a Poisson ε. With the PLD accountant a :class:`PrivacyError` is
  raised rather than claiming a guarantee the library cannot compute.
* ``"local"``: local DP. Each upload is an unsampled Gaussian on one client's data; any two
  inputs of the client differ by up to 2C after clipping, so ``GaussianDpEvent(z_local/2)``,
  composed over every round (worst case: the client takes part in all of them). ``q`` is
  ignored.

A fourth kind of round, the distributed discrete Gaussian of distributed DP, is a
:class:`~shoal.privacy.ddg_accounting.DistributedEvent`: its Rényi curve comes from the bound
of Kairouz, Liu and Steinke (2021), composed and converted in :mod:`.ddg_accounting` (RDP
only; a ledger holds either kind, not both).

ε is non-increasing in the noise multiplier (every RDP order's bound and the PLD are monotone in
σ) and non-decreasing in rounds, which the searches of :mod:`shoal.privacy.planning` rely on.
:class:`PrivacyLedger` records the rounds a run has actually released. All functions are pure;
results of the library are cached by their (hashable) inputs.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from shoal.errors import BudgetExhausted, PrivacyError

if TYPE_CHECKING:
    from dp_accounting import dp_event as dp_event_types
    from dp_accounting.privacy_accountant import PrivacyAccountant

    from shoal.privacy.ddg_accounting import DistributedEvent

__all__ = [
    "ACCOUNTANTS",
    "SAMPLINGS",
    "PrivacyLedger",
    "RoundEvent",
    "epsilon",
    "event_epsilon",
]

AccountantName = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed_size", "local"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed_size", "local")


def _dp_event() -> ModuleType:
    """``dp_accounting.dp_event``, imported on first use: dp-accounting is an optional extra,
    and importing :mod:`shoal.privacy` (for clipping or secure aggregation) must not need it."""
    try:
        from dp_accounting import dp_event
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise PrivacyError(
            "privacy accounting needs the dp-accounting package: pip install 'shoal[privacy]'"
        ) from exc
    return dp_event


@dataclass(frozen=True)
class RoundEvent:
    """One round's privacy-relevant facts. Build with :meth:`poisson`, :meth:`fixed_size` or
    :meth:`local`.

    Attributes:
        noise_multiplier: z (total, including any adaptive-clipping share): noise std on the
            sum over the clip norm C.
        sampling: ``"poisson"``, ``"fixed_size"`` or ``"local"``.
        q: sampling rate (Poisson q, or m/N for fixed size; 1 for local).
        sample_size, population: m and N (fixed size only).
    """

    noise_multiplier: float
    sampling: str = "poisson"
    q: float = 1.0
    sample_size: int | None = None
    population: int | None = None

    def __post_init__(self) -> None:
        z = self.noise_multiplier
        if isinstance(z, bool) or not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
            raise PrivacyError(f"noise_multiplier must be finite and > 0, got {z!r}")
        if self.sampling not in SAMPLINGS:
            raise PrivacyError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if not (math.isfinite(self.q) and 0.0 < self.q <= 1.0):
            raise PrivacyError(f"q (sampling rate) must be in (0, 1], got {self.q!r}")
        if self.sampling == "fixed_size":
            m, n = self.sample_size, self.population
            if m is None or n is None or not (1 <= m <= n):
                raise PrivacyError(
                    f"fixed_size sampling needs 1 <= sample_size <= population, got {m!r} of {n!r}"
                )

    @classmethod
    def poisson(cls, q: float, noise_multiplier: float) -> RoundEvent:
        """Each client included independently with probability q."""
        return cls(noise_multiplier=float(noise_multiplier), sampling="poisson", q=float(q))

    @classmethod
    def fixed_size(cls, sample_size: int, population: int, noise_multiplier: float) -> RoundEvent:
        """Exactly ``sample_size`` of ``population`` clients, uniformly without replacement."""
        if population < 1:
            raise PrivacyError(f"population must be >= 1, got {population!r}")
        return cls(
            noise_multiplier=float(noise_multiplier),
            sampling="fixed_size",
            q=sample_size / population,
            sample_size=int(sample_size),
            population=int(population),
        )

    @classmethod
    def local(cls, noise_multiplier: float) -> RoundEvent:
        """One local-DP release per round (the client is assumed to take part every round)."""
        return cls(noise_multiplier=float(noise_multiplier), sampling="local", q=1.0)

    @property
    def neighboring_relation(self) -> str:
        """``"replace_one"`` (fixed size) or ``"add_or_remove_one"`` (dp-accounting's names)."""
        return "replace_one" if self.sampling == "fixed_size" else "add_or_remove_one"

    def dp_event(self) -> dp_event_types.DpEvent:
        """The ``dp-accounting`` event for one round (see the module docstring)."""
        dp_event = _dp_event()
        z = self.noise_multiplier
        if self.sampling == "local":
            return dp_event.GaussianDpEvent(z / 2.0)
        if self.sampling == "fixed_size":
            assert self.population is not None and self.sample_size is not None
            return dp_event.SampledWithoutReplacementDpEvent(
                self.population, self.sample_size, dp_event.GaussianDpEvent(z / 2.0)
            )
        if self.q == 1.0:
            return dp_event.GaussianDpEvent(z)
        return dp_event.PoissonSampledDpEvent(self.q, dp_event.GaussianDpEvent(z))

    def to_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling": self.sampling,
            "q": self.q,
            "sample_size": self.sample_size,
            "population": self.population,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundEvent:
        return cls(
            noise_multiplier=float(d["noise_multiplier"]),
            sampling=str(d["sampling"]),
            q=float(d["q"]),
            sample_size=None if d.get("sample_size") is None else int(d["sample_size"]),
            population=None if d.get("population") is None else int(d["population"]),
        )


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
    return delta


def _make_accountant(accountant: str, relation: str) -> PrivacyAccountant:
    _dp_event()  # clear error if the package is missing
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    rel = NeighboringRelation[relation.upper()]
    if accountant == "rdp":
        return RdpAccountant(neighboring_relation=rel)
    return PLDAccountant(neighboring_relation=rel)


#: a ledger's entry: a round's event and how many rounds of it
Entry = tuple["RoundEvent | DistributedEvent", int]


def _canonical(entries: tuple[Entry, ...]) -> tuple[Entry, ...]:
    """Merge equal events wherever they occur: composition is commutative, so the cost of an
    ε evaluation grows with the number of *distinct* round settings, not with rounds."""
    counts: dict[RoundEvent | DistributedEvent, int] = {}
    for event, n in entries:
        counts[event] = counts.get(event, 0) + n

    def key(item: Entry) -> tuple[str, float, float, int, int, str]:
        e = item[0]
        return (e.sampling, e.q, e.noise_multiplier, e.sample_size or 0, e.population or 0,
                type(e).__name__)

    return tuple(sorted(counts.items(), key=key))


def _distributed(entries: tuple[Entry, ...]) -> bool:
    """Whether ``entries`` are distributed-DP rounds (raises if they mix both kinds)."""
    kinds = {isinstance(e, RoundEvent) for e, _ in entries}
    if len(kinds) > 1:
        raise PrivacyError("cannot compose distributed-DP rounds with central or local "
                           "Gaussian rounds in one ledger")
    return kinds == {False}


@functools.lru_cache(maxsize=512)
def _composed_epsilon(accountant: str, entries: tuple[Entry, ...], delta: float) -> float:
    """ε of the run-length-encoded sequence of rounds ``entries`` (events of one relation)."""
    if not entries:
        return 0.0
    if _distributed(entries):
        if accountant != "rdp":
            raise PrivacyError("distributed DP is accounted with Rényi DP only; use "
                               "accountant='rdp'")
        from shoal.privacy.ddg_accounting import distributed_epsilon

        return distributed_epsilon(entries, delta)  # type: ignore[arg-type]
    relations = {e.neighboring_relation for e, _ in entries}
    if len(relations) != 1:
        raise PrivacyError(
            "cannot compose rounds accounted under different neighbouring relations "
            "(fixed_size is replace-one, poisson/local are add/remove-one)"
        )
    if accountant == "pld" and any(e.sampling == "fixed_size" for e, _ in entries):
        raise PrivacyError(
            "dp-accounting's PLD accountant does not support fixed-size sampling without "
            "replacement; use accountant='rdp' or Poisson sampling"
        )
    acc = _make_accountant(accountant, relations.pop())
    dp_event = _dp_event()
    event = dp_event.ComposedDpEvent(
        [dp_event.SelfComposedDpEvent(e.dp_event(), n) for e, n in entries
         if isinstance(e, RoundEvent)]
    )
    if not acc.supports(event):
        raise PrivacyError(f"the {accountant} accountant cannot account for {event}")
    acc.compose(event)
    eps = float(acc.get_epsilon(delta))
    if math.isnan(eps):
        raise PrivacyError(
            f"the {accountant} accountant returned NaN for {entries} at delta={delta}"
        )
    return eps


def event_epsilon(
    event: RoundEvent, rounds: int, delta: float, accountant: AccountantName = "rdp"
) -> float:
    """ε after ``rounds`` repetitions of ``event`` at ``delta`` (``inf`` when unbounded)."""
    _check_accountant(accountant)
    delta = _check_delta(delta)
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise PrivacyError(f"rounds must be an int >= 0, got {rounds!r}")
    return _composed_epsilon(accountant, ((event, int(rounds)),) if rounds else (), delta)


def _event(
    q: float, noise_multiplier: float, sampling: str, population: int | None
) -> RoundEvent:
    if sampling == "poisson":
        return RoundEvent.poisson(q, noise_multiplier)
    if sampling == "local":
        return RoundEvent.local(noise_multiplier)
    if sampling == "fixed_size":
        if population is None:
            raise PrivacyError("fixed_size sampling needs population (the number of clients N)")
        m = round(q * population)
        if abs(m - q * population) > 1e-9 * population:
            raise PrivacyError(
                "q·population must be a whole number of clients for fixed_size, "
                f"got {q * population!r}"
            )
        return RoundEvent.fixed_size(m, population, noise_multiplier)
    raise PrivacyError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


def epsilon(
    q: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
    *,
    sampling: Sampling = "poisson",
    population: int | None = None,
) -> float:
    """ε after ``rounds`` rounds at sampling rate q and noise multiplier z.

    Args:
        q: per-round sampling rate (for ``fixed_size``, m/N with ``population`` = N).
        noise_multiplier: total z (see :class:`RoundEvent`).
        rounds: number of rounds T >= 0.
        delta: target δ in (0, 1).
        accountant: ``"rdp"`` or ``"pld"``.
        sampling: ``"poisson"``, ``"fixed_size"`` or ``"local"`` (q ignored).
        population: N, required for ``fixed_size``.

    Raises:
        PrivacyError: invalid arguments, or a sampling the accountant cannot handle.
    """
    event = _event(q, noise_multiplier, sampling, population)
    return event_epsilon(event, rounds, delta, accountant)


@dataclass(frozen=True)
class PrivacyLedger:
    """The rounds actually run, run-length encoded, and the ε they have spent.

    Immutable: :meth:`record` returns a new ledger. Serialise with :meth:`to_dict` into the
    checkpoint so a resumed run keeps its spent budget.

    Attributes:
        accountant: ``"rdp"`` or ``"pld"``.
        entries: ``((event, count), ...)`` in order (:class:`RoundEvent` or, for distributed
            DP, :class:`~shoal.privacy.ddg_accounting.DistributedEvent`).
    """

    accountant: str = "rdp"
    entries: tuple[Entry, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_accountant(self.accountant)

    @property
    def rounds(self) -> int:
        return sum(n for _, n in self.entries)

    def record(self, event: RoundEvent | DistributedEvent, count: int = 1) -> PrivacyLedger:
        """A ledger with ``count`` more rounds of ``event``.

        Raises:
            PrivacyError: the event cannot be composed with what is already recorded
                (another neighbouring relation, the other kind of event, or fixed-size
                sampling or distributed DP under PLD).
        """
        if count < 1:
            raise PrivacyError(f"count must be >= 1, got {count}")
        _distributed((*self.entries[:1], (event, count)))
        if self.accountant == "pld" and not isinstance(event, RoundEvent):
            raise PrivacyError("distributed DP is accounted with Rényi DP only; use "
                               "accountant='rdp'")
        if self.entries and self.entries[0][0].neighboring_relation != event.neighboring_relation:
            raise PrivacyError(
                f"round sampled as {event.sampling!r} cannot join a ledger of "
                f"{self.entries[0][0].sampling!r} rounds (different neighbouring relation)"
            )
        if self.accountant == "pld" and event.sampling == "fixed_size":
            raise PrivacyError(
                "dp-accounting's PLD accountant does not support fixed-size sampling without "
                "replacement; use accountant='rdp' or Poisson sampling"
            )
        if self.entries and self.entries[-1][0] == event:
            entries = self.entries[:-1] + ((event, self.entries[-1][1] + count),)
        else:
            entries = self.entries + ((event, count),)
        return PrivacyLedger(self.accountant, entries)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before any round)."""
        return _composed_epsilon(self.accountant, _canonical(self.entries), _check_delta(delta))

    def would_exceed(
        self, budget_epsilon: float, delta: float, next_round_event: RoundEvent | DistributedEvent
    ) -> bool:
        """Whether running one more round of ``next_round_event`` would push ε past the budget."""
        return self.record(next_round_event).epsilon(delta) > budget_epsilon

    def check_next_round(
        self, budget_epsilon: float, delta: float, next_round_event: RoundEvent | DistributedEvent
    ) -> float:
        """Return ε after the next round; raise :class:`BudgetExhausted` if over budget."""
        eps = self.record(next_round_event).epsilon(delta)
        if eps > budget_epsilon:
            raise BudgetExhausted(
                f"round {self.rounds} would reach epsilon={eps:.4g} > budget {budget_epsilon:g} "
                f"(delta={delta:g}, {self.accountant}); {self.rounds} rounds ran",
                epsilon=eps,
                budget=budget_epsilon,
            )
        return eps

    def to_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "entries": [{"event": e.to_dict(), "count": n} for e, n in self.entries],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        from shoal.privacy.ddg_accounting import KIND, DistributedEvent

        def event(x: Mapping[str, Any]) -> RoundEvent | DistributedEvent:
            return DistributedEvent.from_dict(x) if x.get("kind") == KIND \
                else RoundEvent.from_dict(x)

        entries = tuple((event(x["event"]), int(x["count"])) for x in d["entries"])
        return cls(str(d["accountant"]), entries)
