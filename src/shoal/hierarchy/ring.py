"""Which edge aggregator serves which device: consistent hashing with bounded loads.

Consistent hashing (D. Karger, E. Lehman, T. Leighton, R. Panigrahy, M. Levine, D. Lewin,
"Consistent Hashing and Random Trees", STOC 1997) puts edges (each at ``vnodes`` points) and
devices on one circle of 2^64 points and gives a device to the first edge clockwise from it,
so an edge that fails moves only its own devices. Bounded loads (V. Mirrokni, M. Thorup,
M. Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018) cap every edge at
``ceil((1 + eps) x m / n)`` devices (m devices, n live edges): a device walks on clockwise
past full edges, so no edge takes more than ``1 + eps`` times its share however the hashes
fall, and a device still moves only when its own edge fails (the cap only grows then).

With regions (:meth:`Ring.__init__`'s ``edge_regions``), a device that declares a region is
placed among that region's live edges only (capped by the region's own share); a device
without one, or whose region has no live edge left, is placed among all live edges.

An assignment is remembered (the edge a device was given stays its edge until that edge
fails), so :meth:`Ring.assign_all` in a fixed order makes it reproducible: the simulator and
a deployed parent that enrol the same devices agree on it. Points are BLAKE2b hashes of the
names: the same everywhere, with no randomness. Not thread-safe: a carrier serialises calls.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from shoal.errors import ConfigError, ProtocolError

__all__ = ["Ring", "point"]


def point(name: str) -> int:
    """A name's place on the circle: the first 8 bytes of its BLAKE2b hash, as an integer."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


class Ring:
    """Devices to edges (see the module docstring).

    Args:
        edges: the edge ids, unique non-empty strings.
        vnodes: points per edge on the circle (more: a more even split before the cap).
        load_factor: ``eps``: no edge takes more than ``ceil((1 + eps) x m / n)`` devices.
        edge_regions: an edge's region (edges missing from it belong to none).

    Raises:
        ConfigError: no edges, a repeated or empty id, ``vnodes < 1`` or ``load_factor``
            not a finite number > 0.
    """

    def __init__(self, edges: Sequence[str], *, vnodes: int = 64, load_factor: float = 0.25,
                 edge_regions: Mapping[str, str] | None = None) -> None:
        names = list(edges)
        if not names or any(not isinstance(e, str) or not e for e in names):
            raise ConfigError("a ring needs at least one edge, each a non-empty id",
                              key="hierarchy.edges")
        if len(set(names)) != len(names):
            raise ConfigError("edge ids must be unique", key="hierarchy.edges")
        if vnodes < 1:
            raise ConfigError(f"hierarchy.vnodes must be >= 1, got {vnodes}",
                              key="hierarchy.vnodes")
        if not (math.isfinite(load_factor) and load_factor > 0):
            raise ConfigError(f"hierarchy.load_factor must be a finite number > 0, got "
                              f"{load_factor!r}", key="hierarchy.load_factor")
        self.edges = tuple(names)
        self.load_factor = float(load_factor)
        self.edge_regions = dict(edge_regions or {})
        marks = sorted((point(f"{e}#{i}"), e) for e in names for i in range(vnodes))
        self._points = [p for p, _ in marks]
        self._owners = [e for _, e in marks]
        self._dead: set[str] = set()
        self._edge_of: dict[str, str] = {}
        self._region_of: dict[str, str] = {}  # device -> the region it declared
        self._load: Counter[str] = Counter()

    # -- queries ------------------------------------------------------------------------------

    @property
    def live(self) -> tuple[str, ...]:
        """The edges not failed, in construction order."""
        return tuple(e for e in self.edges if e not in self._dead)

    def is_live(self, edge: str) -> bool:
        return edge in self.edges and edge not in self._dead

    def loads(self) -> dict[str, int]:
        """Devices per live edge."""
        return {e: self._load[e] for e in self.live}

    def devices_of(self, edge: str) -> list[str]:
        """The devices assigned to ``edge``, sorted."""
        return sorted(d for d, e in self._edge_of.items() if e == edge)

    def capacity(self, region: str | None = None) -> int:
        """The most devices one live edge (of ``region``, or of all) may hold now."""
        return self._pool(region, 0)[1]

    def edge_of(self, device: str) -> str | None:
        """The edge serving ``device``, or ``None`` if it was never assigned."""
        return self._edge_of.get(device)

    def successors(self, device: str) -> list[str]:
        """The edges ``device`` is served by as they fail one after another: its edge, the
        one the ring moves it to when that edge fails, and so on to the last live edge
        (worked out on a copy: nothing here changes). A deployed device keeps this list to
        find its next edge when its own stops answering.

        Raises:
            ProtocolError: ``device`` was never assigned.
        """
        if device not in self._edge_of:
            raise ProtocolError(f"device {device!r} has no edge on the ring")
        trial = copy.deepcopy(self)
        order = [trial._edge_of[device]]
        while len(trial.live) > 1:
            trial.fail(order[-1])
            order.append(trial._edge_of[device])
        return order

    # -- changes ------------------------------------------------------------------------------

    def assign_all(self, devices: Iterable[str],
                   regions: Mapping[str, str] | None = None) -> None:
        """Assign every device not yet assigned, in sorted order (reproducible), with the
        caps computed for all of them at once."""
        new = sorted(set(devices) - set(self._edge_of))
        regions = regions or {}
        for d in new:  # count them first: the caps are for the whole population
            if d in regions:
                self._region_of[d] = regions[d]
        pending = set(new)
        for d in new:
            self._place(d, extra=len(pending))
            pending.discard(d)

    def assign(self, device: str, region: str | None = None) -> str:
        """The edge of ``device``, placing it now if it has none (online: the cap counts it).

        Raises:
            ProtocolError: no edge is live.
        """
        edge = self._edge_of.get(device)
        if edge is not None:
            return edge
        if region is not None:
            self._region_of[device] = region
        return self._place(device, extra=1)

    def fail(self, edge: str) -> list[str]:
        """Take ``edge`` out: its devices move, each to the next live edge clockwise with
        room; nobody else moves. Returns the moved devices (sorted); idempotent.

        Raises:
            ProtocolError: ``edge`` is unknown, or it is the last live edge.
        """
        if edge not in self.edges:
            raise ProtocolError(f"no edge {edge!r} on the ring")
        if edge in self._dead:
            return []
        if len(self.live) == 1:
            raise ProtocolError(f"edge {edge!r} is the last live edge: its devices have "
                                f"nowhere to go")
        self._dead.add(edge)
        moved = self.devices_of(edge)
        for d in moved:
            del self._edge_of[d]
        self._load.pop(edge, None)
        for i, d in enumerate(moved):
            self._place(d, extra=len(moved) - i)
        return moved

    def revive(self, edge: str) -> None:
        """Put a failed edge back: devices placed from now on may go to it; none moves."""
        if edge not in self.edges:
            raise ProtocolError(f"no edge {edge!r} on the ring")
        self._dead.discard(edge)

    # -- internals ----------------------------------------------------------------------------

    def _pool(self, region: str | None, pending: int) -> tuple[list[str], int]:
        """The live edges a device of ``region`` may go to and their cap: the region's own
        edges and devices when it has a live edge, else every live edge and every device
        (assigned, plus ``pending`` being placed)."""
        live = [e for e in self.edges if e not in self._dead]
        if not live:
            raise ProtocolError("no edge is live: nowhere to place a device")
        edges, members = live, len(self._edge_of) + pending
        if region is not None:
            mine = [e for e in live if self.edge_regions.get(e) == region]
            if mine:
                edges = mine
                members = sum(1 for r in self._region_of.values() if r == region)
        return edges, max(1, math.ceil((1 + self.load_factor) * max(1, members) / len(edges)))

    def _place(self, device: str, extra: int) -> str:
        edges, cap = self._pool(self._region_of.get(device), extra)
        allowed = set(edges)
        start = bisect.bisect(self._points, point(device))
        n = len(self._points)
        for step in range(n):
            owner = self._owners[(start + step) % n]
            if owner in allowed and self._load[owner] < cap:
                self._edge_of[device] = owner
                self._load[owner] += 1
                return owner
        # only when devices of a region and devices of none share edges: the cap counts
        # each kind apart, so the other kind may have filled them; take the least loaded
        owner = min(edges, key=lambda e: (self._load[e], edges.index(e)))
        self._edge_of[device] = owner
        self._load[owner] += 1
        return owner
