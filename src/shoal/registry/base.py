"""The client registry's interface: device records, outcomes and the Protocol.

The registry remembers every enrolled device: its attributes (what selection may stratify or
filter on), its capabilities (what the device says it can do), when it is usually available,
when it was last seen, how often it contributed, and the outcome of its last few rounds. It is
the *with whom* store behind client selection, in the spirit of the device-facing "Selector"
actors of K. Bonawitz et al., "Towards Federated Learning at Scale: System Design", MLSys 2019.

Everything here is storage-independent: :class:`Registry` is a ``typing.Protocol`` so an
embedded SQLite file (:mod:`shoal.registry.sqlite`, the default) can later be swapped for Redis
or Postgres without touching selection or the round engine. The checks every field passes
(the same in every implementation) are in :mod:`shoal.registry.validation`.

Time is always passed in (``now``: seconds since the UNIX epoch, UTC); nothing here reads the
wall clock, so the simulator can run simulated time and tests never sleep.

Availability windows are half-open intervals ``[start, end)`` of *minutes of the week* in UTC,
Monday 00:00 = minute 0, Sunday 23:59 = minute 10079. A window with ``end < start`` wraps
around the end of the week (``(10000, 60)`` covers Sunday 22:40 to Monday 01:00). ``end`` may
be 10080 (the end of the week), so ``(0, 10080)`` is "always". A device with *no* windows has
declared no constraint and counts as always available.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from shoal.registry.validation import (
    _REJECTED,
    MINUTES_PER_WEEK,
    AttrValue,
    RegistryError,
    _check_time,
    _validate_round,
    validate_attributes,
    validate_capabilities,
    validate_device_id,
    validate_outcome,
    validate_windows,
)

if TYPE_CHECKING:
    from shoal.registry.columns import Columns

# RegistryError is re-exported: it is the error every method of the Registry protocol raises.
__all__ = [
    "Device",
    "Outcome",
    "Registry",
    "RegistryError",
    "UnknownDevice",
    "minute_of_week",
    "outcome_kind",
]


# The UNIX epoch (1970-01-01 00:00 UTC) was a Thursday: Monday-based minute 3 * 1440.
_EPOCH_MINUTE_OF_WEEK = 3 * 24 * 60


class UnknownDevice(RegistryError, LookupError):
    """The device id is not enrolled."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} is not enrolled", device_id=device_id)


# ---------------------------------------------------------------------------------------------
# Time and outcome kinds
# ---------------------------------------------------------------------------------------------


def minute_of_week(now: float) -> int:
    """The UTC minute of the week of the UNIX time ``now`` (Monday 00:00 = 0)."""
    _check_time(now, "now")
    return (math.floor(now / 60.0) + _EPOCH_MINUTE_OF_WEEK) % MINUTES_PER_WEEK


def outcome_kind(outcome: str) -> str:
    """``"accepted"``, ``"rejected"``, ``"dropped"`` or ``"late"`` for a valid outcome."""
    return "rejected" if outcome.startswith(_REJECTED) else outcome


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one device did in one round.

    Attributes:
        round: the round number.
        outcome: ``"accepted"``, ``"rejected:<reason>"``, ``"dropped"`` or ``"late"``.
        ts: when it was recorded (UNIX seconds).
    """

    round: int
    outcome: str
    ts: float

    def __post_init__(self) -> None:
        _validate_round(self.round)
        validate_outcome(self.outcome)
        object.__setattr__(self, "ts", _check_time(self.ts, "ts"))

    @property
    def kind(self) -> str:
        """The outcome without its rejection reason."""
        return outcome_kind(self.outcome)


@dataclass(frozen=True)
class Device:
    """One enrolled device, as the registry holds it (read-only).

    Attributes:
        device_id: unique id, 1 to 128 printable characters.
        attributes: name -> str | int | float (e.g. ``{"os": "android", "region": "eu"}``).
        capabilities: free-form JSON object the device reported (e.g. ``{"ram_mb": 2048}``).
        windows: availability windows, ``(start, end)`` minutes of the week in UTC.
        enrolled_at: when the device first enrolled (UNIX seconds).
        last_seen: latest contact (UNIX seconds); never moves backwards.
        participation: rounds whose update was accepted.

    Raises:
        RegistryError: a field is invalid (the same checks as enrolment).
    """

    device_id: str
    attributes: Mapping[str, AttrValue] = field(default_factory=dict)
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    windows: tuple[tuple[int, int], ...] = ()
    enrolled_at: float = 0.0
    last_seen: float = 0.0
    participation: int = 0

    def __post_init__(self) -> None:
        device_id = validate_device_id(self.device_id)
        set_ = object.__setattr__
        set_(self, "attributes", MappingProxyType(
            validate_attributes(self.attributes, device_id=device_id)))
        set_(self, "capabilities", MappingProxyType(
            validate_capabilities(self.capabilities, device_id=device_id)))
        set_(self, "windows", validate_windows(self.windows, device_id=device_id))
        set_(self, "enrolled_at", _check_time(self.enrolled_at, "enrolled_at"))
        set_(self, "last_seen", _check_time(self.last_seen, "last_seen"))
        p = self.participation
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise RegistryError(f"participation must be an int >= 0, got {p!r}",
                                device_id=device_id, field="participation")

    def __hash__(self) -> int:
        # The mappings are unhashable; equal records always share an id.
        return hash(self.device_id)

    def available_at(self, now: float) -> bool:
        """Whether one of the device's windows covers ``now`` (always, if it declared none)."""
        if not self.windows:
            return True
        m = minute_of_week(now)
        return any((s <= m < e) if s < e else (m >= s or m < e) for s, e in self.windows)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class Registry(Protocol):
    """Where enrolled devices live. Implementations: :class:`~shoal.registry.SQLiteRegistry`
    (embedded file, the deployment default) and :class:`~shoal.registry.MemoryRegistry`
    (numpy columns: simulation, millions of clients).

    Every method validates its inputs with :mod:`shoal.registry.validation` and raises
    :class:`RegistryError` (or :class:`UnknownDevice`) without changing anything on bad input.
    Filters shared by :meth:`list`, :meth:`scan` and :meth:`count`:

    * ``where``: attribute name -> value; a device matches if it has every attribute with an
      equal value (``3 == 3.0``; ``"3" != 3``);
    * ``seen_since``: ``last_seen >= seen_since``;
    * ``available_at``: :meth:`Device.available_at` is true at that time.
    """

    def enroll(self, device_id: str, *, now: float,
               attributes: Mapping[str, AttrValue] | None = None,
               capabilities: Mapping[str, Any] | None = None,
               windows: Sequence[Sequence[int]] | None = None) -> Device:
        """Insert a device or update one: fields given replace the stored ones, ``None``
        keeps them; ``enrolled_at`` and ``participation`` are kept; ``last_seen`` advances to
        ``now``. Returns the stored record."""
        ...

    def enroll_many(self, device_ids: Sequence[str], *, now: float,
                    attributes: Mapping[str, Sequence[AttrValue | None]] | None = None,
                    windows: Sequence[Sequence[Sequence[int]]] | None = None) -> int:
        """Enrol new devices in one call: ``attributes`` maps a name to one value per id
        (``None``: the device lacks it), ``windows`` gives one list per id. Returns how many
        were enrolled. Raises :class:`RegistryError` -- and enrols none -- if an id is
        invalid, repeated or already enrolled, or a column has the wrong length."""
        ...

    def get(self, device_id: str) -> Device:
        """The device's record. Raises :class:`UnknownDevice`."""
        ...

    def touch(self, device_id: str, *, now: float) -> None:
        """Advance ``last_seen`` to ``now`` (never backwards). Raises :class:`UnknownDevice`."""
        ...

    def record_outcome(self, device_id: str, round: int, outcome: str, *, now: float) -> bool:
        """Record the device's outcome in ``round``; ``"accepted"`` increments participation.

        A device has one outcome per round. Returns ``False`` (and changes nothing) if the
        same outcome is already recorded for that round -- a replayed report -- or if the
        recorded one is ``"accepted"``, which is final: participation counts each round a
        device contributed to once. Any other recorded outcome is replaced by a different
        later one (a device refused once may upload again and be accepted; a retried round
        may ask a device again). Does not touch ``last_seen``. Raises :class:`UnknownDevice`.
        """
        ...

    def record_outcomes(self, device_ids: Sequence[str], round: int, outcome: str, *,
                        now: float) -> int:
        """:meth:`record_outcome` for several devices at once (a cohort); returns how many
        outcomes changed. Raises :class:`RegistryError` -- and records none -- if an id is
        unknown (:class:`UnknownDevice`), invalid or repeated."""
        ...

    def outcomes(self, device_id: str) -> builtins.list[Outcome]:
        """The device's most recent outcomes (bounded), oldest round first."""
        ...

    def list(self, *, where: Mapping[str, AttrValue] | None = None,
             seen_since: float | None = None, available_at: float | None = None,
             limit: int | None = None) -> builtins.list[Device]:
        """Matching devices in device-id order, at most ``limit``."""
        ...

    def scan(self, *, where: Mapping[str, AttrValue] | None = None,
             seen_since: float | None = None, available_at: float | None = None,
             batch_size: int = 1000) -> Iterator[Device]:
        """Matching devices in device-id order, fetched ``batch_size`` at a time."""
        ...

    def count(self, *, where: Mapping[str, AttrValue] | None = None,
              seen_since: float | None = None, available_at: float | None = None) -> int:
        """Number of matching devices."""
        ...

    def columns(self) -> Columns:
        """Every device as a :class:`~shoal.registry.columns.Columns` view, rows in
        device-id order: what the selectors of :mod:`shoal.selection` read."""
        ...

    def remove(self, device_id: str) -> bool:
        """Forget the device and its outcomes; ``False`` if it was not enrolled."""
        ...

    def close(self) -> None:
        """Release the store's resources; later calls raise :class:`RegistryError`."""
        ...
