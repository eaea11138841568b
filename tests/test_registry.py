"""One conformance suite for every Registry (SQLite file, numpy columns, a real Redis), then
what is particular to each."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shoal.registry as registry_pkg
from shoal.errors import ShoalError
from shoal.registry import (
    MINUTES_PER_WEEK,
    Columns,
    Device,
    MemoryRegistry,
    Outcome,
    Registry,
    RegistryError,
    SQLiteRegistry,
    UnknownDevice,
    minute_of_week,
    sequential_ids,
)
from shoal.registry.redis import RedisRegistry, RegistryUnavailable
from redis_server import RedisServer

UTC = timezone.utc
# 2026-11-30 is a Monday.
MONDAY = datetime(2026, 11, 30, tzinfo=UTC)


def at(days: float = 0, hours: float = 0, minutes: float = 0) -> float:
    """UNIX time of Monday 2026-11-30 00:00 UTC plus an offset."""
    return (MONDAY + timedelta(days=days, hours=hours, minutes=minutes)).timestamp()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """One redis-server for the module; each registry on it has a prefix of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


_prefixes = itertools.count()


def redis_registry(server: RedisServer, **kw) -> RedisRegistry:
    """An empty registry on ``server`` (a fresh key prefix)."""
    return RedisRegistry(server.url, prefix=f"test{next(_prefixes)}", **kw)


@pytest.fixture(params=["sqlite", "memory", "redis"])
def make(request, tmp_path):
    """A factory of empty registries of the parametrized kind (closed after the test)."""
    made = []
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None

    def new(**kw):
        r = (SQLiteRegistry(tmp_path / f"registry{len(made)}.db", **kw)
             if request.param == "sqlite" else redis_registry(server, **kw)
             if request.param == "redis" else MemoryRegistry(**kw))
        made.append(r)
        return r

    yield new
    for r in made:
        r.close()


@pytest.fixture()
def reg(make):
    return make()


# --- time ----------------------------------------------------------------------------------


@given(st.integers(min_value=-10**10, max_value=4 * 10**10), st.sampled_from([0.0, 0.25, 0.75]))
@settings(max_examples=200, deadline=None)
def test_minute_of_week_matches_the_calendar(seconds, fraction):
    # Whole seconds plus an exact binary fraction: datetime's microsecond rounding is exact.
    t = seconds + fraction
    dt = datetime.fromtimestamp(t, UTC)
    assert minute_of_week(t) == dt.weekday() * 1440 + dt.hour * 60 + dt.minute


def test_windows_are_half_open_and_may_wrap_around_the_week():
    d = Device("d", windows=[(10000, 60)])  # Sunday 22:40 -> Monday 01:00
    assert not d.available_at(at(days=6, hours=22, minutes=39))
    assert d.available_at(at(days=6, hours=22, minutes=40))
    assert d.available_at(at(days=6, hours=23, minutes=59.9))
    assert d.available_at(at(minutes=0))
    assert d.available_at(at(minutes=59))
    assert not d.available_at(at(minutes=60))
    assert not d.available_at(at(days=3))
    office = Device("o", windows=[(9 * 60, 17 * 60), (1440 + 9 * 60, 1440 + 17 * 60)])
    assert office.available_at(at(hours=12)) and office.available_at(at(days=1, hours=9))
    assert not office.available_at(at(hours=17)) and not office.available_at(at(days=2, hours=12))
    assert Device("always", windows=[(0, MINUTES_PER_WEEK)]).available_at(at(days=6.99))
    assert Device("undeclared").available_at(at(days=4, hours=3))


# --- enrolment and records -----------------------------------------------------------------


def test_enroll_and_get_round_trip(reg):
    d = reg.enroll("phone-1", now=100.0, attributes={"os": "android", "sdk": 33, "score": 0.5},
                   capabilities={"ram_mb": 2048, "accel": ["nnapi"]}, windows=[(10000, 60)])
    assert d == reg.get("phone-1")
    assert d.device_id == "phone-1"
    assert dict(d.attributes) == {"os": "android", "sdk": 33, "score": 0.5}
    assert type(d.attributes["sdk"]) is int and type(d.attributes["score"]) is float
    assert dict(d.capabilities) == {"ram_mb": 2048, "accel": ["nnapi"]}
    assert d.windows == ((10000, 60),)
    assert (d.enrolled_at, d.last_seen, d.participation) == (100.0, 100.0, 0)
    with pytest.raises(TypeError):
        d.attributes["os"] = "ios"  # records are read-only


def test_reenroll_updates_given_fields_and_keeps_history(reg):
    reg.enroll("a", now=100.0, attributes={"os": "android"}, capabilities={"gpu": 1},
               windows=[(0, 60)])
    reg.record_outcome("a", 1, "accepted", now=150.0)
    d = reg.enroll("a", now=200.0, attributes={"os": "ios"})
    assert dict(d.attributes) == {"os": "ios"}
    assert dict(d.capabilities) == {"gpu": 1} and d.windows == ((0, 60),)  # None keeps
    assert (d.enrolled_at, d.last_seen, d.participation) == (100.0, 200.0, 1)
    d = reg.enroll("a", now=50.0, windows=[])  # an explicit empty list clears
    assert d.windows == () and d.last_seen == 200.0
    assert reg.count() == 1


def test_touch_only_moves_last_seen_forward(reg):
    reg.enroll("a", now=100.0)
    reg.touch("a", now=300.0)
    reg.touch("a", now=200.0)  # a late, out-of-order report
    assert reg.get("a").last_seen == 300.0
    with pytest.raises(UnknownDevice, match="'ghost' is not enrolled"):
        reg.touch("ghost", now=1.0)
    with pytest.raises(UnknownDevice) as exc:
        reg.get("ghost")
    assert exc.value.device_id == "ghost" and isinstance(exc.value, LookupError)


def test_outcomes_count_participation_and_replays_are_idempotent(reg):
    reg.enroll("a", now=0.0)
    assert reg.record_outcome("a", 1, "accepted", now=10.0) is True
    assert reg.record_outcome("a", 2, "rejected:non_finite", now=20.0) is True
    assert reg.record_outcome("a", 3, "dropped", now=30.0) is True
    assert reg.record_outcome("a", 4, "late", now=40.0) is True
    assert reg.record_outcome("a", 5, "accepted", now=50.0) is True
    assert reg.record_outcome("a", 5, "accepted", now=55.0) is False  # replayed report
    assert reg.get("a").participation == 2
    # accepted is final for its round: a later task of the same round (a retry) changes
    # nothing, and participation counts the round once
    assert reg.record_outcome("a", 5, "late", now=60.0) is False
    got = reg.outcomes("a")
    assert [(o.round, o.outcome, o.ts) for o in got] == [
        (1, "accepted", 10.0), (2, "rejected:non_finite", 20.0), (3, "dropped", 30.0),
        (4, "late", 40.0), (5, "accepted", 50.0)]
    assert [o.kind for o in got] == ["accepted", "rejected", "dropped", "late", "accepted"]
    assert reg.get("a").last_seen == 0.0  # outcomes do not count as contact
    with pytest.raises(UnknownDevice):
        reg.record_outcome("ghost", 1, "accepted", now=1.0)
    with pytest.raises(UnknownDevice):
        reg.outcomes("ghost")


def test_a_later_outcome_replaces_one_that_was_not_accepted(reg):
    # a device refused once may upload again in the same round; a retried round may ask a
    # device that timed out in the abandoned attempt: the round's outcome is the later one
    reg.enroll("a", now=0.0)
    assert reg.record_outcome("a", 3, "rejected:non_finite", now=1.0) is True
    assert reg.record_outcome("a", 3, "late", now=2.0) is True
    assert [(o.outcome, o.ts) for o in reg.outcomes("a")] == [("late", 2.0)]
    assert reg.get("a").participation == 0
    assert reg.record_outcome("a", 3, "accepted", now=3.0) is True
    assert reg.record_outcome("a", 3, "dropped", now=4.0) is False
    assert [(o.outcome, o.ts) for o in reg.outcomes("a")] == [("accepted", 3.0)]
    assert reg.get("a").participation == 1


def test_record_outcomes_records_a_cohort_at_once(reg):
    reg.enroll_many(["a", "b", "c", "d"], now=0.0)
    reg.record_outcome("b", 1, "accepted", now=1.0)
    reg.record_outcome("c", 1, "late", now=1.0)
    # b: a replay; c: replaced; a, d: new
    assert reg.record_outcomes(["d", "c", "b", "a"], 1, "accepted", now=2.0) == 3
    assert [reg.get(i).participation for i in "abcd"] == [1, 1, 1, 1]
    assert [o.ts for o in reg.outcomes("b")] == [1.0]
    assert reg.record_outcomes(np.array([b"a", b"d"]), 2, "dropped", now=3.0) == 2
    assert [o.outcome for o in reg.outcomes("d")] == ["accepted", "dropped"]
    assert reg.record_outcomes([], 3, "accepted", now=3.0) == 0
    for ids, error, match in [(["a", "ghost"], UnknownDevice, "'ghost' is not enrolled"),
                              (["ab"], UnknownDevice, "'ab' is not enrolled"),  # not "a"
                              (["a", "b", "a"], RegistryError, "'a' appears twice"),
                              (["a", ""], RegistryError, "device_id must have 1 to 128")]:
        with pytest.raises(error, match=match):
            reg.record_outcomes(ids, 4, "accepted", now=4.0)
    # a refused call recorded nothing
    assert [reg.get(i).participation for i in "abcd"] == [1, 1, 1, 1]
    assert all(o.round < 4 for i in "abcd" for o in reg.outcomes(i))
    with pytest.raises(RegistryError, match="outcome must be"):
        reg.record_outcomes(["a"], 4, "won", now=4.0)


@given(st.lists(st.tuples(st.integers(0, 5), st.sets(st.sampled_from("abcdef")),
                          st.sampled_from(["accepted", "late", "dropped", "rejected:x"])),
                max_size=25))
@settings(max_examples=60, deadline=None)
def test_record_outcomes_equals_recording_one_at_a_time(redis_server, steps):
    one, bulk = MemoryRegistry(history=3), MemoryRegistry(history=3)
    sql = SQLiteRegistry(":memory:", history=3)
    red = redis_registry(redis_server, history=3)
    for r in (one, bulk, sql, red):
        r.enroll_many(list("abcdef"), now=0.0)
    for t, (rnd, who, outcome) in enumerate(steps):
        singles = sum(one.record_outcome(d, rnd, outcome, now=float(t)) for d in sorted(who))
        for r in (bulk, sql, red):
            assert r.record_outcomes(sorted(who), rnd, outcome, now=float(t)) == singles
    for d in "abcdef":
        want = (one.get(d).participation, one.outcomes(d))
        for r in (bulk, sql, red):
            assert (r.get(d).participation, r.outcomes(d)) == want
    sql.close()
    red.close()


def test_memory_outcomes_cost_nothing_for_idle_devices_and_follow_removals():
    reg = MemoryRegistry(history=4)
    reg.enroll_many(sequential_ids(100_000), now=0.0)
    idle = reg.nbytes
    cohort = sequential_ids(100_000)[::1000]
    for rnd in range(10):
        reg.record_outcomes(cohort, rnd, "accepted", now=float(rnd))
    # 100 blocks of 4 slots (round, code, ts) at most double-allocated: no per-device cost
    assert reg.nbytes - idle <= 2 * 100 * 4 * (8 + 4 + 8) + 16 * 4 * 20
    assert reg.get("client-00000").participation == 10
    assert [o.round for o in reg.outcomes("client-01000")] == [6, 7, 8, 9]
    reg.remove("client-00000")  # its block is freed and reused, rows shift under the log
    reg.enroll("client-00000b", now=1.0)
    reg.record_outcome("client-00000b", 3, "late", now=1.0)
    assert [o.round for o in reg.outcomes("client-00000b")] == [3]
    assert [o.round for o in reg.outcomes("client-01000")] == [6, 7, 8, 9]
    assert reg.get("client-99000").participation == 10


def _same_columns(a: Columns, b: Columns) -> None:
    for name in ("size", "ids", "last_seen", "enrolled_at", "participation", "window_offsets",
                 "window_start", "window_end"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert sorted(a.attributes) == sorted(b.attributes)
    for name in a.attributes:
        got = [a.attributes[name].value_at(i) for i in range(a.size)]
        want = [b.attributes[name].value_at(i) for i in range(b.size)]
        assert got == want and [type(v) for v in got] == [type(v) for v in want], name


@given(st.lists(st.tuples(
    st.text("abcxyz-", min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(["os", "tier", "zone"]),
                    st.one_of(st.integers(-3, 3), st.sampled_from([0.5, 2.0, -1.25]),
                              st.text("ab", max_size=2)), max_size=3),
    st.lists(st.tuples(st.integers(0, 10079), st.integers(0, 10080))
             .filter(lambda w: w[0] != w[1]), max_size=3),
    st.integers(0, 3)), max_size=12, unique_by=lambda t: t[0]))
@settings(max_examples=60, deadline=None)
def test_columns_hold_what_the_records_hold(redis_server, devices):
    regs = [SQLiteRegistry(":memory:"), MemoryRegistry(), redis_registry(redis_server)]
    for reg in regs:
        for i, (name, attrs, windows, used) in enumerate(devices):
            reg.enroll(name, now=float(i), attributes=attrs, windows=windows)
            for rnd in range(used):
                reg.record_outcome(name, rnd, "accepted", now=1.0)
            reg.touch(name, now=10.0 + used)
        _same_columns(reg.columns(), Columns.from_devices(reg.list()))
    _same_columns(regs[0].columns(), regs[1].columns())
    _same_columns(regs[0].columns(), regs[2].columns())
    regs[0].close()
    regs[2].close()


def test_outcome_history_is_trimmed_to_the_last_rounds(make):
    with make(history=3) as reg:
        reg.enroll("a", now=0.0)
        reg.enroll("b", now=0.0)
        for rnd in (7, 1, 9, 3, 8):  # arrival order differs from round order
            reg.record_outcome("a", rnd, "accepted", now=float(rnd))
        reg.record_outcome("b", 1, "dropped", now=1.0)
        assert [o.round for o in reg.outcomes("a")] == [7, 8, 9]
        assert [o.round for o in reg.outcomes("b")] == [1]  # other devices untouched
        assert reg.get("a").participation == 5  # trimming never forgets the count
        # a round older than the kept ones is no longer known: recorded (and trimmed) again
        assert reg.record_outcome("a", 1, "accepted", now=1.0) is True
        assert [o.round for o in reg.outcomes("a")] == [7, 8, 9]
        assert reg.get("a").participation == 6


def test_sqlite_trims_outcome_rows_on_disk(tmp_path):
    with SQLiteRegistry(tmp_path / "r.db", history=3) as reg:
        reg.enroll("a", now=0.0)
        reg.enroll("b", now=0.0)
        for rnd in (7, 1, 9, 3, 8):
            reg.record_outcome("a", rnd, "accepted", now=float(rnd))
        reg.record_outcome("b", 1, "dropped", now=1.0)
        rows = sqlite3.connect(tmp_path / "r.db").execute(
            "SELECT count(*) FROM outcomes").fetchone()[0]
        assert rows == 4


def test_remove_forgets_device_and_its_outcomes(reg):
    reg.enroll("a", now=0.0)
    reg.record_outcome("a", 1, "accepted", now=1.0)
    assert reg.remove("a") is True and reg.remove("a") is False
    assert reg.count() == 0
    reg.enroll("a", now=5.0)
    assert reg.outcomes("a") == [] and reg.get("a").participation == 0


# --- queries -------------------------------------------------------------------------------


@pytest.fixture()
def population(reg):
    for i in range(10):
        reg.enroll(f"d{i:02d}", now=float(i * 10),
                   attributes={"region": "eu" if i < 6 else "us", "tier": i % 3},
                   windows=[(0, 60)] if i % 2 == 0 else None)
    return reg


def test_filters_on_attributes_last_seen_and_availability(population):
    reg = population
    ids = lambda ds: [d.device_id for d in ds]  # noqa: E731
    assert ids(reg.list()) == [f"d{i:02d}" for i in range(10)]
    assert ids(reg.list(where={"region": "us"})) == ["d06", "d07", "d08", "d09"]
    assert ids(reg.list(where={"region": "eu", "tier": 0})) == ["d00", "d03"]
    assert ids(reg.list(where={"tier": 2.0})) == ["d02", "d05", "d08"]  # 2 == 2.0
    assert reg.list(where={"tier": "2"}) == []  # but "2" != 2
    assert reg.list(where={"missing": "x"}) == []
    assert ids(reg.list(seen_since=70.0)) == ["d07", "d08", "d09"]
    # Odd devices declared no window (always available); even ones only Monday 00:00-01:00.
    assert ids(reg.list(available_at=at(hours=3))) == ["d01", "d03", "d05", "d07", "d09"]
    assert len(reg.list(available_at=at(minutes=30))) == 10
    assert ids(reg.list(where={"region": "eu"}, available_at=at(hours=3), limit=2)) == [
        "d01", "d03"]
    for kw in ({}, {"where": {"region": "us"}}, {"seen_since": 35.0},
               {"available_at": at(hours=3)}, {"where": {"tier": 1}, "available_at": at()}):
        assert reg.count(**kw) == len(reg.list(**kw))


def test_scan_pages_through_everything_once(population):
    got = [d.device_id for d in population.scan(batch_size=3)]
    assert got == [d.device_id for d in population.list()]
    got = [d.device_id for d in population.scan(where={"region": "eu"}, batch_size=2)]
    assert got == ["d00", "d01", "d02", "d03", "d04", "d05"]
    with pytest.raises(RegistryError, match="batch_size"):
        population.scan(batch_size=0)


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"device_id": ""}, "device_id"),
    ({"device_id": "x" * 129}, "device_id"),
    ({"device_id": 17}, "device_id"),
    ({"device_id": "bad\nid"}, "device_id"),
    ({"attributes": {"ok": True}}, "attributes.ok"),
    ({"attributes": {"ok": float("nan")}}, "attributes.ok"),
    ({"attributes": {"ok": [1, 2]}}, "attributes.ok"),
    ({"attributes": {"ok": "x" * 257}}, "attributes.ok"),
    ({"attributes": {"a.b": 1}}, "attributes"),
    ({"attributes": {"$": 1}}, "attributes"),
    ({"attributes": {'x"]': 1}}, "attributes"),
    ({"attributes": ["os", "android"]}, "attributes"),
    ({"capabilities": {"x": float("inf")}}, "capabilities"),
    ({"capabilities": {"x": object()}}, "capabilities"),
    ({"capabilities": {1: "int key"}}, "capabilities"),
    ({"capabilities": {"blob": "x" * 20_000}}, "capabilities"),
    ({"windows": [(10080, 5)]}, "windows[0]"),
    ({"windows": [(0, 60), (-1, 5)]}, "windows[1]"),
    ({"windows": [(5, 5)]}, "windows[0]"),
    ({"windows": [(1, 10081)]}, "windows[0]"),
    ({"windows": [(1.5, 30)]}, "windows[0]"),
    ({"windows": [(1, 2, 3)]}, "windows[0]"),
    ({"windows": "0-60"}, "windows"),
    ({"now": float("nan")}, "now"),
    ({"now": None}, "now"),
])
def test_invalid_enrolment_is_refused_and_changes_nothing(reg, kwargs, field):
    reg.enroll("keep", now=1.0, attributes={"os": "ios"})
    args = {"device_id": "new", "now": 2.0, **kwargs}
    device_id = args.pop("device_id")
    with pytest.raises(RegistryError) as exc:
        reg.enroll(device_id, **args)
    assert exc.value.field == field
    assert isinstance(exc.value, ShoalError)
    assert [d.device_id for d in reg.list()] == ["keep"]


def test_error_messages_name_the_field_and_the_bound(reg):
    with pytest.raises(RegistryError, match=r"windows\[0\]\.start = 10080 must be in \[0, 10080\)"):
        reg.enroll("a", now=0.0, windows=[(10080, 5)])
    with pytest.raises(RegistryError, match="device_id must have 1 to 128 characters, got 129"):
        reg.enroll("x" * 129, now=0.0)
    with pytest.raises(RegistryError, match="attributes.ok must be a str, int or float, got bool"):
        reg.enroll("a", now=0.0, attributes={"ok": True})


@pytest.mark.parametrize("outcome", ["ok", "rejected:", "accepted ", "Accepted", None,
                                     "rejected:" + "x" * 65, "rejected:bad\x00"])
def test_invalid_outcomes_are_refused_and_change_nothing(reg, outcome):
    reg.enroll("a", now=0.0)
    with pytest.raises(RegistryError, match="outcome must be"):
        reg.record_outcome("a", 1, outcome, now=1.0)
    with pytest.raises(RegistryError, match="round must be an int >= 0"):
        reg.record_outcome("a", -1, "accepted", now=1.0)
    assert reg.outcomes("a") == [] and reg.get("a").participation == 0


def test_records_validate_like_the_store():
    with pytest.raises(RegistryError, match="participation"):
        Device("a", participation=-1)
    with pytest.raises(RegistryError, match="outcome must be"):
        Outcome(round=1, outcome="maybe", ts=0.0)


def test_numpy_scalars_are_stored_as_python_numbers(reg):
    d = reg.enroll("a", now=np.float64(5.0), attributes={"sdk": np.int64(33),
                                                          "score": np.float32(0.5)})
    assert dict(d.attributes) == {"sdk": 33, "score": 0.5}
    assert type(d.attributes["sdk"]) is int and type(d.attributes["score"]) is float
    with pytest.raises(RegistryError, match="attributes.flag must be a str, int or float"):
        reg.enroll("b", now=0.0, attributes={"flag": np.bool_(True)})


def test_hostile_ids_are_stored_verbatim(reg):
    evil = "x'); DROP TABLE devices; --"
    reg.enroll(evil, now=0.0, attributes={"note": "'; DELETE FROM outcomes; --"})
    assert reg.get(evil).attributes["note"] == "'; DELETE FROM outcomes; --"
    assert reg.count(where={"note": "'; DELETE FROM outcomes; --"}) == 1


# --- the file ------------------------------------------------------------------------------


def test_file_layout_wal_schema_version_and_persistence(tmp_path):
    path = tmp_path / "r.db"
    with SQLiteRegistry(path) as reg:
        reg.enroll("a", now=1.0, attributes={"os": "android"})
        reg.record_outcome("a", 1, "accepted", now=2.0)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"schema_version", "devices", "outcomes"}
    raw.close()
    with SQLiteRegistry(path) as reg:
        assert reg.get("a").participation == 1 and dict(reg.get("a").attributes) == {
            "os": "android"}


def test_refuses_newer_schema_and_foreign_files(tmp_path):
    path = tmp_path / "r.db"
    SQLiteRegistry(path).close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE schema_version SET version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(RegistryError, match="schema version 99; this shoal reads version 1"):
        SQLiteRegistry(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="not a usable SQLite database"):
        SQLiteRegistry(junk)


def test_closed_registry_refuses_calls(make):
    reg = make()
    reg.close()
    reg.close()  # idempotent
    with pytest.raises(RegistryError, match="is closed"):
        reg.get("a")
    with pytest.raises(RegistryError, match="is closed"):
        reg.enroll("a", now=0.0)


def test_two_registries_on_one_file_see_each_other_and_do_not_lose_writes(tmp_path):
    path = tmp_path / "shared.db"
    a, b = SQLiteRegistry(path), SQLiteRegistry(path)
    a.enroll("dev", now=0.0)
    assert b.get("dev").device_id == "dev"
    errors = []

    def worker(reg, rounds):
        try:
            for r in rounds:
                reg.record_outcome("dev", r, "accepted", now=float(r))
                reg.touch("dev", now=float(r))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(a, range(0, 60, 2))),
               threading.Thread(target=worker, args=(b, range(1, 60, 2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert a.get("dev").participation == 60 and b.get("dev").last_seen == 59.0
    assert [o.round for o in b.outcomes("dev")] == list(range(40, 60))
    a.close()
    b.close()


def test_one_registry_can_be_shared_by_threads(reg):
    reg.enroll("dev", now=0.0)
    threads = [threading.Thread(target=lambda k=k: [reg.record_outcome(
        "dev", 100 * k + r, "accepted", now=0.0) for r in range(20)]) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.get("dev").participation == 60


def test_public_api(redis_server):
    assert isinstance(SQLiteRegistry(":memory:"), Registry)
    assert isinstance(MemoryRegistry(), Registry)
    assert isinstance(redis_registry(redis_server), Registry)
    assert issubclass(RegistryUnavailable, RegistryError)
    assert all(hasattr(registry_pkg, name) for name in registry_pkg.__all__)
    assert issubclass(RegistryError, ShoalError) and issubclass(UnknownDevice, RegistryError)
    with pytest.raises(RegistryError, match="history"):
        SQLiteRegistry(":memory:", history=0)
    with pytest.raises(RegistryError, match="history"):
        MemoryRegistry(history=0)


# --- Redis: a server that goes away ----------------------------------------------------------


def test_redis_going_away_is_a_clear_error_and_the_registry_recovers(tmp_path):
    server = RedisServer(tmp_path)
    try:
        reg = RedisRegistry(server.url, prefix="outage", timeout=1.0)
        reg.enroll("a", now=1.0, attributes={"os": "android"})
        reg.record_outcome("a", 1, "accepted", now=2.0)
        server.stop()
        for call in (lambda: reg.get("a"), lambda: reg.enroll("b", now=3.0),
                     lambda: reg.record_outcomes(["a"], 2, "accepted", now=3.0),
                     lambda: reg.columns(), lambda: reg.list()):
            t0 = time.monotonic()
            with pytest.raises(RegistryUnavailable, match="Redis is unreachable") as exc:
                call()
            assert time.monotonic() - t0 < 5  # within its timeout, not a hang
            assert exc.value.address == f"127.0.0.1:{server.port}"
            assert f"127.0.0.1:{server.port}" in str(exc.value)
        server.start()  # same port, same append-only file
        # the same object carries on: reconnected, the scripts loaded again on the new server
        assert reg.get("a").participation == 1 and dict(reg.get("a").attributes) == {
            "os": "android"}
        assert reg.record_outcome("a", 2, "accepted", now=4.0) is True
        reg.enroll("b", now=5.0)
        assert [d.device_id for d in reg.list()] == ["a", "b"]
        assert reg.columns().participation.tolist() == [2, 0]
        reg.close()
    finally:
        server.stop()
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        RedisRegistry(server.url, timeout=0.5)  # nothing listens there any more


def test_redis_registries_share_one_server_under_prefixes(redis_server):
    a, b = redis_registry(redis_server), redis_registry(redis_server)
    a.enroll("dev", now=1.0)
    assert b.count() == 0 and a.count() == 1
    again = RedisRegistry(redis_server.url, prefix=a.prefix)  # another process, same data
    assert again.get("dev").enrolled_at == 1.0
    for r in (a, b, again):
        r.close()


def test_redis_refuses_a_newer_schema(redis_server):
    import redis

    reg = redis_registry(redis_server)
    redis.Redis.from_url(redis_server.url).set(f"{reg.prefix}:schema", 99)
    with pytest.raises(RegistryError, match="schema version 99; this shoal reads version 1"):
        RedisRegistry(redis_server.url, prefix=reg.prefix)
    with pytest.raises(RegistryError, match="not a Redis URL"):
        RedisRegistry("http://example.invalid/")


def test_sqlite_touches_kept_in_memory_are_seen_by_reads_written_on_close_and_delay(tmp_path):
    # a check-in's touch costs no transaction once its device is known to be enrolled; what
    # a user relies on still holds: reads see it, another reader sees it soon, nothing lost
    import time

    from shoal.registry import sqlite as sqlite_registry
    path = tmp_path / "r.db"
    reg = SQLiteRegistry(path)
    other = SQLiteRegistry(path)
    reg.enroll_many(["a", "b"], now=10.0)
    reg.touch("a", now=20.0)  # first touch: written at once (it checks the device exists)
    assert other.get("a").last_seen == 20.0
    reg.touch("a", now=30.0)
    reg.touch("a", now=25.0)  # never backwards
    assert reg.get("a").last_seen == 30.0  # a read of the same object writes them first
    assert other.get("a").last_seen == 30.0
    reg.touch("a", now=40.0)
    reg.record_outcome("b", 1, "accepted", now=41.0)  # any write carries them
    assert other.get("a").last_seen == 40.0
    reg.touch("a", now=50.0)
    reg.touch("b", now=51.0)  # first touch of b: written at once, with a's
    assert other.get("a").last_seen == 50.0 and other.get("b").last_seen == 51.0
    reg.touch("a", now=52.0)
    assert other.get("a").last_seen == 50.0  # waiting in memory
    time.sleep(sqlite_registry.TOUCH_DELAY_S)
    reg.touch("b", now=53.0)  # the oldest waiting touch is past the delay: both written
    assert other.get("a").last_seen == 52.0 and other.get("b").last_seen == 53.0
    reg.touch("a", now=60.0)
    reg.close()  # written on close
    assert other.get("a").last_seen == 60.0
    # a device another process removed: its waiting touch finds out, the next one raises
    reg = SQLiteRegistry(path)
    reg.touch("a", now=70.0)
    reg.touch("a", now=71.0)
    assert other.remove("a")
    assert reg.count() == 1  # writes the waiting touch: no row, and a is forgotten
    with pytest.raises(UnknownDevice):
        reg.touch("a", now=72.0)
    # removed through the same object: the next touch raises at once
    reg.touch("b", now=80.0)
    assert reg.remove("b")
    with pytest.raises(UnknownDevice):
        reg.touch("b", now=81.0)
    reg.close()
    other.close()
