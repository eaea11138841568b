"""Device traces: availability queries against brute force and FedScale's own rule, the
FedScale and .npz formats, refusals, the built-in generators' documented distributions, and
the ``shoal traces`` command."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from shoal.cli import main
from shoal.errors import ConfigError, DataError
from shoal.sim.devices import (BANDWIDTH_CLASSES, TIME_ZONES, builtin_trace, mobile,
                               summarize, trace_file, uniform)
from shoal.sim.traces import (FEDSCALE_TRAINING_FACTOR, Availability, Capacity, DeviceTrace,
                              from_fedscale, load_trace)


def _brute_until(rows: list[list[tuple[float, float]]], period: float, c: int, t: float
                 ) -> float:
    """When client ``c``'s session containing ``t`` ends (sessions repeat every period and
    merge where they touch), ``t`` if offline, ``inf`` without windows: walks the timeline."""
    spans = rows[c % len(rows)]
    if not spans:
        return math.inf
    k = math.floor(t / period)
    ivs = sorted((base + s, base + e) for base in ((k - 1) * period, k * period,
                                                   (k + 1) * period, (k + 2) * period)
                 for s, e in spans)
    merged: list[list[float]] = []
    for s, e in ivs:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    if any(e - s >= 2 * period for s, e in merged):
        return math.inf  # online the whole period: the session never ends
    for s, e in merged:
        if s <= t < e:
            return e
    return t


def _random_rows(rng, n, period):
    rows = []
    for _ in range(n):
        k = int(rng.integers(0, 4))
        cuts = np.sort(rng.uniform(0, period, 2 * k)).tolist()
        spans = list(zip(cuts[::2], cuts[1::2]))
        if rng.random() < 0.3 and spans:  # a session running through the end of the period
            spans = [(0.0, spans[0][1])] + spans[1:-1] + [(spans[-1][0], period)]
        rows.append(spans)
    return rows


def test_online_until_matches_a_brute_force_walk_of_the_windows():
    rng = np.random.default_rng(0)
    period = 50.0
    rows = _random_rows(rng, 200, period)
    av = Availability.from_windows(period, rows)
    for t in rng.uniform(0, 5 * period, 40).tolist():
        ids = np.arange(300)  # more clients than rows: client c uses row c % 200
        got = av.online_until(ids, t)
        want = [_brute_until(rows, period, c, t) for c in ids.tolist()]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(av.online(ids, t), np.array(want) > t)


def test_a_session_through_the_end_of_the_period_is_one_session():
    av = Availability.from_windows(100.0, [[(0.0, 10.0), (90.0, 100.0)]])
    assert av.online_until(np.array([0]), 95.0)[0] == 110.0  # on until 10 s into the next
    assert av.online_until(np.array([0]), 105.0)[0] == 110.0
    assert av.online_until(np.array([0]), 50.0)[0] == 50.0  # offline
    whole = Availability.from_windows(100.0, [[(0.0, 60.0), (60.0, 100.0)]])
    assert whole.online_until(np.array([0]), 12345.0)[0] == math.inf  # covers everything
    np.testing.assert_allclose(av.online_seconds(), [20.0])


def _fedscale_is_active(trace: dict, t: float) -> bool:
    """FedScale's rule (fedscale/cloud/internal/client_metadata.py, is_active): the time
    modulo finish_time lies in some [active[i], inactive[i]]."""
    norm = t % trace["finish_time"]
    return any(a <= norm <= b for a, b in zip(trace["active"], trace["inactive"]))


def _fedscale_files(tmp_path, rng, n=30):
    cap = {k + 1: {"computation": float(rng.uniform(10, 200)),
                   "communication": float(rng.uniform(100, 20000))} for k in range(n)}
    av = {}
    for k in range(n):
        finish = float(rng.integers(2, 5) * 3600)
        cuts = np.sort(rng.choice(np.arange(0, finish, 60.0), 2 * int(rng.integers(1, 5)),
                                  replace=False)).tolist()
        av[k + 1] = {"duration": finish, "finish_time": finish, "model": "x",
                     "active": cuts[::2], "inactive": cuts[1::2]}
    (tmp_path / "cap.pkl").write_bytes(pickle.dumps(cap))
    (tmp_path / "av.pkl").write_bytes(pickle.dumps(av))
    return cap, av


def test_fedscale_files_load_as_fedscale_reads_them(tmp_path):
    rng = np.random.default_rng(3)
    cap, av = _fedscale_files(tmp_path, rng)
    trace = from_fedscale(tmp_path / "cap.pkl", tmp_path / "av.pkl")
    keys = sorted(cap)  # rows in client-id order; client c uses row c % rows
    np.testing.assert_allclose(trace.capacity.compute_ms,
                               [cap[k]["computation"] * FEDSCALE_TRAINING_FACTOR for k in keys])
    ids = np.arange(len(keys))
    # FedScale's completion time: communication = (up + down) kbit / kbps
    np.testing.assert_allclose(trace.transfer_seconds(ids, np.full(ids.size, 125_000)),
                               [1000.0 / cap[k]["communication"] for k in keys])
    for t in rng.uniform(0, 20 * 3600, 60).tolist():
        t = math.floor(t) + 0.5  # off the whole-minute window edges (inclusive in FedScale)
        want = [_fedscale_is_active(av[k], t) for k in keys]
        np.testing.assert_array_equal(trace.online(ids, t), want)


def test_a_trace_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({1: Evil()}))
    with pytest.raises(DataError, match="plain"):
        from_fedscale(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("cap,msg", [
    ({1: {"computation": 5.0}}, "communication"),
    ({1: {"computation": 5.0, "communication": -1.0}}, "bandwidth"),
    ({1: {"computation": float("nan"), "communication": 1.0}}, "compute_ms"),
    ([1, 2], "dict"),
])
def test_malformed_capacity_is_refused_with_the_field(tmp_path, cap, msg):
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(cap))
    with pytest.raises(DataError, match=msg):
        from_fedscale(tmp_path / "c.pkl")


@pytest.mark.parametrize("rows,msg", [
    ([[(5.0, 3.0)]], "start <= end"),
    ([[(0.0, 10.0)], [(-1.0, 3.0)]], "row 1"),
    ([[(0.0, 200.0)]], "period"),
])
def test_impossible_windows_are_refused_naming_the_row(rows, msg):
    with pytest.raises(DataError, match=msg):
        Availability.from_windows(100.0, rows)


def test_availability_arrays_are_checked():
    with pytest.raises(DataError, match="overlap"):  # overlapping windows, given raw
        Availability(np.array([100.0]), np.array([0, 2]), np.array([0.0, 5.0]),
                     np.array([10.0, 20.0]))
    with pytest.raises(DataError, match="offsets"):
        Availability(np.array([100.0]), np.array([0, 3]), np.array([0.0]), np.array([1.0]))


def test_npz_round_trip_and_refusals(tmp_path):
    trace = mobile(500, seed=4)
    trace.save(tmp_path / "m.npz")
    back = load_trace(tmp_path / "m.npz")
    for a, b in ((trace.capacity.compute_ms, back.capacity.compute_ms),
                 (trace.capacity.bandwidth_kbps, back.capacity.bandwidth_kbps),
                 (trace.availability.start, back.availability.start),
                 (trace.availability.end, back.availability.end),
                 (trace.availability.offsets, back.availability.offsets)):
        np.testing.assert_array_equal(a, b)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not a shoal trace"):
        load_trace(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match="neither a built-in"):
        trace_file(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no built-in"):
        builtin_trace("bogus", 10)


def test_mobile_is_seeded_and_follows_its_documented_distributions():
    n = 200_000
    a, b = mobile(n, seed=1), mobile(n, seed=1)
    np.testing.assert_array_equal(a.capacity.compute_ms, b.capacity.compute_ms)
    np.testing.assert_array_equal(a.availability.start, b.availability.start)
    assert not np.array_equal(mobile(n, seed=2).capacity.compute_ms, a.capacity.compute_ms)
    # log-normal compute around the median, sigma 0.5
    logs = np.log(a.capacity.compute_ms / 2.0)
    assert abs(np.median(logs)) < 0.01 and abs(logs.std() - 0.5) < 0.01
    # bandwidth: the class medians' mixture -> the overall median lies between 4G and Wi-Fi
    kbps = a.capacity.bandwidth_kbps
    share_slow = (kbps < 3_000).mean()  # nearly all 3G, few 4G below 3 Mbit/s
    assert abs(share_slow - BANDWIDTH_CLASSES[0][2]) < 0.05
    # one daily session of ~8 h: the average online share is 8/24 (sessions clipped to 1-20 h)
    share = a.availability.online_seconds() / a.availability.period
    assert abs(share.mean() - 8 / 24) < 0.01
    # sessions at night in the device's time zone: the share online at each UTC hour is the
    # zone-weighted chance that a session (local start N(22 h, 1.5 h), length N(8 h, 2 h)
    # clipped to [1, 20] h) covers it, computed here by Monte Carlo from that law alone
    rng = np.random.default_rng(0)
    ids = rng.choice(n, 4000, replace=False)
    m = 200_000
    start = rng.normal(22.0, 1.5, m)
    length = np.clip(rng.normal(8.0, 2.0, m), 1.0, 20.0)
    zones = np.array([h for h, _ in TIME_ZONES])
    zone = zones[rng.choice(zones.size, m, p=[w for _, w in TIME_ZONES])]
    for h in range(24):
        local = (h + 0.5 + zone) % 24
        since = (local - start) % 24  # hours since the session's (daily) start
        want = (since < length).mean()
        got = a.online(ids, 3600.0 * h + 1800).mean()
        assert abs(got - want) < 0.035, (h, got, want)


def test_uniform_is_always_online_with_instant_transfers():
    t = uniform(ms_per_example=4.0)
    ids = np.arange(1000)
    assert t.online_until(ids, 1e9).tolist() == [math.inf] * 1000
    assert (t.transfer_seconds(ids, np.full(1000, 10**9)) == 0).all()
    assert t.compute_seconds(np.array([7]), np.array([250.0]))[0] == 1.0


def test_summary_quantiles_are_those_of_the_population():
    trace = DeviceTrace(Capacity(np.arange(1.0, 11.0), np.full(10, 8000.0)),
                        Availability.always(), "ten")
    out = summarize(trace, 10, model_bytes=1_000_000)
    np.testing.assert_allclose(out["compute_ms_per_example"],
                               np.quantile(np.arange(1.0, 11.0), out["quantiles"],
                                           method="nearest"))
    assert out["model_transfer_s"] == [1.0] * 5  # 8 Mbit over 8 Mbit/s
    assert out["online_by_hour"] == [1.0] * 24


def test_shoal_traces_summary_convert_generate(tmp_path, capsys):
    rng = np.random.default_rng(5)
    _fedscale_files(tmp_path, rng)
    assert main(["traces", "convert", str(tmp_path / "cap.pkl"), str(tmp_path / "av.pkl"),
                 "-o", str(tmp_path / "fs.npz")]) == 0
    assert main(["traces", "summary", str(tmp_path / "fs.npz"), "--clients", "30",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["capacity_rows"] == 30 and out["availability_rows"] == 30
    assert out["compute_ms_per_example"] == sorted(out["compute_ms_per_example"])
    assert len(out["online_by_hour"]) == 24 and all(0 <= f <= 1 for f in out["online_by_hour"])
    assert main(["traces", "generate", "mobile", "--clients", "50", "-o",
                 str(tmp_path / "m.npz")]) == 0
    assert load_trace(tmp_path / "m.npz").capacity.rows == 50
    assert main(["traces", "summary", "mobile", "--clients", "1000"]) == 0
    assert "online by hour" in capsys.readouterr().out
    assert main(["traces", "convert", str(tmp_path / "cap.pkl"), "-o", "x.csv"]) == 2
    assert main(["traces", "summary", str(tmp_path / "nope.pkl")]) == 2


def test_shoal_run_with_a_population_and_a_trace(tmp_path, capsys):
    """The README's hyperscale command, small: a run directory with the timeline, the
    time-to-accuracy curve and the participation histogram; simulated hours in the summary."""
    code = main(["run", "--population", "5000", "--per-round", "20", "--trace", "mobile",
                 "--rounds", "3", "--json", "-q", "--out", str(tmp_path),
                 "--set", "sim.round_rules=deploy"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sim_hours"] > 0 and out["client_updates"] == 60
    assert out["clients_trained"] <= 60 and "dropouts" in out
    run_dir = tmp_path / next(p.name for p in tmp_path.iterdir())
    rows = (run_dir / "timeline.csv").read_text().splitlines()
    assert rows[0].startswith("version,sim_seconds,wall_seconds,participants") and len(rows) == 5
    assert (run_dir / "time_to_accuracy.png").stat().st_size > 0
    assert (run_dir / "participation.png").stat().st_size > 0


def test_progress_bar_shows_simulated_time():
    import io

    from shoal.records import RoundRecord
    from shoal.telemetry.progress import ProgressBar, sim_time

    bar = ProgressBar(3, file=io.StringIO(), clock=lambda: 5400.0)
    bar.version_committed(RoundRecord(round=1, version=1, committed=True))
    assert "sim 90.0 min" in bar.text
    assert [sim_time(s) for s in (42.0, 600.0, 5 * 3600.0, 3 * 86400.0)] == \
        ["42.0 s", "10.0 min", "5.00 h", "3.00 d"]
