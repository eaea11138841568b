"""Devices to edges: consistent hashing with bounded loads (shoal.hierarchy.ring)."""

from __future__ import annotations

import hashlib
import math

import pytest

from shoal.errors import ConfigError, ProtocolError
from shoal.hierarchy.ring import Ring

EDGES = [f"edge-{i}" for i in range(10)]
DEVICES = [f"device-{i}" for i in range(2000)]


def _h(name: str) -> int:  # the oracle's own hash: BLAKE2b-64 of the name
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def test_without_a_binding_cap_a_device_goes_to_the_first_edge_clockwise() -> None:
    ring = Ring(EDGES, vnodes=8, load_factor=100.0)  # the cap never binds
    ring.assign_all(DEVICES[:300])
    marks = sorted((_h(f"{e}#{i}"), e) for e in EDGES for i in range(8))
    for d in DEVICES[:300]:
        p = _h(d)
        owner = next((e for q, e in marks if q > p), marks[0][1])
        assert ring.edge_of(d) == owner


@pytest.mark.parametrize("eps", [0.05, 0.25, 1.0])
def test_no_edge_holds_more_than_its_bound(eps: float) -> None:
    ring = Ring(EDGES, load_factor=eps)
    ring.assign_all(DEVICES)
    cap = math.ceil((1 + eps) * len(DEVICES) / len(EDGES))
    loads = ring.loads()
    assert sum(loads.values()) == len(DEVICES)
    assert max(loads.values()) <= cap


def test_a_failed_edge_moves_only_its_own_devices_within_the_bound() -> None:
    ring = Ring(EDGES, load_factor=0.25)
    ring.assign_all(DEVICES)
    before = {d: ring.edge_of(d) for d in DEVICES}
    victims = ring.devices_of("edge-3")
    moved = ring.fail("edge-3")
    assert moved == victims and moved
    for d in DEVICES:
        if before[d] == "edge-3":
            assert ring.edge_of(d) not in (None, "edge-3")
        else:
            assert ring.edge_of(d) == before[d]  # nobody else moves
    assert "edge-3" not in ring.loads()
    assert max(ring.loads().values()) <= math.ceil(1.25 * len(DEVICES) / 9)
    assert ring.fail("edge-3") == []  # idempotent
    assert ring.assign("device-new") != "edge-3"


def test_assignment_is_reproducible_whatever_the_order() -> None:
    a, b = Ring(EDGES), Ring(EDGES)
    a.assign_all(DEVICES)
    b.assign_all(list(reversed(DEVICES)))
    assert all(a.edge_of(d) == b.edge_of(d) for d in DEVICES)


def test_regions_keep_devices_on_their_region_edges() -> None:
    regions = {e: ("eu" if i < 4 else "us") for i, e in enumerate(EDGES)}
    ring = Ring(EDGES, edge_regions=regions)
    declared = {d: ("eu" if i % 3 == 0 else "us") for i, d in enumerate(DEVICES)}
    ring.assign_all(DEVICES, declared)
    for d in DEVICES:
        assert regions[ring.edge_of(d)] == declared[d]
    eu = sum(1 for r in declared.values() if r == "eu")
    assert max(ring.loads()[e] for e in EDGES[:4]) <= math.ceil(1.25 * eu / 4)
    for e in EDGES[:4]:  # a region losing every edge falls back to all live edges
        if e != EDGES[3]:
            ring.fail(e)
    ring.fail(EDGES[3])
    assert all(ring.edge_of(d) in EDGES[4:] for d in DEVICES)


def test_bad_rings_are_refused() -> None:
    with pytest.raises(ConfigError):
        Ring([])
    with pytest.raises(ConfigError):
        Ring(["a", "a"])
    with pytest.raises(ConfigError):
        Ring(["a"], vnodes=0)
    with pytest.raises(ConfigError):
        Ring(["a"], load_factor=0.0)
    ring = Ring(["a", "b"])
    ring.fail("a")
    with pytest.raises(ProtocolError):
        ring.fail("b")
    with pytest.raises(ProtocolError):
        ring.fail("nope")


def test_successors_are_where_a_device_goes_as_its_edges_fail() -> None:
    ring = Ring(EDGES[:4])
    ring.assign_all(DEVICES[:400])
    order = ring.successors("device-7")
    assert len(order) == 4 and sorted(order) == sorted(EDGES[:4])
    assert ring.edge_of("device-7") == order[0] and ring.live == tuple(EDGES[:4])  # untouched
    for i, edge in enumerate(order[:-1]):  # failing them for real moves it just so
        ring.fail(edge)
        assert ring.edge_of("device-7") == order[i + 1]
    with pytest.raises(ProtocolError):
        Ring(EDGES).successors("never-seen")
