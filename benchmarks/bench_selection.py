"""Choosing a cohort out of a million clients: each selector over registry columns, against
the bare uniform draw and against the Device-list path selection replaced.

For ``--clients`` n (default 1,000,000) and a cohort of ``--cohort`` k (default 100) it times,
median of ``--repeats`` calls after one warm-up, each in its own JSON line:

* ``uniform_sampler``: the simulator's ``UniformSampler`` (``Columns.of_size``: no registry);
  baseline ``np.sort(rng.choice(n, k, replace=False))``, the bare draw of wave 1 (the two
  must return the same cohort, which is checked).
* over a ``MemoryRegistry`` of n devices (``sequential_ids``; attribute ``os`` with 4 values
  of unequal shares; every 4th device declares a weekday window; participation recorded for
  20 vectorized rounds of 5% of the population): ``RegistrySampler.sample`` with each
  selector -- a fresh column view and the draw -- and ``record_outcomes`` of the cohort. The
  baseline is the same bare draw (the ratio is the price of the registry and of the rule).
* ``device_list`` (with ``--legacy-clients``, default 100,000): what selection cost before it
  read columns -- ``registry.list()`` builds one ``Device`` per enrolled device, then ids are
  sorted and drawn from -- reported per million devices by linear scaling (its cost is one
  Python object per device), against the column sampler at the same size.
* ``sqlite_columns`` (same size): a deployment's per-round read, ``SQLiteRegistry.columns()``,
  against building the same view from ``Device`` records (``Columns.from_devices(list())``).

    .venv/bin/python benchmarks/bench_selection.py
    .venv/bin/python benchmarks/bench_selection.py --clients 100000 --repeats 11
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shoal.registry import Columns, MemoryRegistry, SQLiteRegistry, sequential_ids
from shoal.sampling import RegistrySampler, UniformSampler
from shoal.selection import AvailabilityAware, FairnessAware, Selector, Stratified, Uniform

MONDAY_NOON = 1796040000.0  # 2026-12-07 12:00 UTC


def median_ms(fn: Callable[[int], object], repeats: int) -> float:
    fn(-1)  # warm-up, not counted
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def population(n: int) -> MemoryRegistry:
    g = np.random.default_rng(0)
    reg = MemoryRegistry(history=4)
    os_ = np.array(["android", "ios", "linux", "other"])[
        g.choice(4, size=n, p=[0.6, 0.3, 0.08, 0.02])]
    weekday_days = [(d * 1440 + 480, d * 1440 + 1080) for d in range(5)]  # 08:00-18:00
    windows = [weekday_days if i % 4 == 0 else () for i in range(n)]
    reg.enroll_many(sequential_ids(n), now=0.0, attributes={"os": os_}, windows=windows)
    ids = reg.columns().ids
    for r in range(20):
        picked = np.sort(g.choice(n, size=n // 20, replace=False))
        reg.record_outcomes(ids[picked], r, "accepted", now=float(r))
    return reg


def legacy_draw(reg: MemoryRegistry, k: int, rng: np.random.Generator) -> list[str]:
    """The Device-list path: a Python object per device, sorted by id, then a draw."""
    devices = sorted(reg.list(), key=lambda d: d.device_id)
    return sorted(devices[i].device_id for i in rng.choice(len(devices), k, replace=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1_000_000)
    ap.add_argument("--cohort", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--legacy-clients", dest="legacy", type=int, default=100_000,
                    help="population of the Device-list baseline (0 = skip it)")
    args = ap.parse_args(argv)
    n, k = args.clients, args.cohort

    def rng(r: int) -> np.random.Generator:
        return np.random.default_rng(1000 + r)

    def emit(case: str, ms: float, baseline_ms: float, baseline: str, **extra) -> None:
        print(json.dumps({"bench": "selection", "case": case, "clients": n, "cohort": k,
                          "ms": round(ms, 3), "baseline": baseline,
                          "baseline_ms": round(baseline_ms, 3),
                          "ratio": round(ms / baseline_ms, 2), **extra}), flush=True)

    bare = median_ms(lambda r: np.sort(rng(r).choice(n, size=k, replace=False)), args.repeats)
    sampler = UniformSampler(k)
    assert np.array_equal(sampler.sample(n, rng(0)),
                          np.sort(rng(0).choice(n, size=k, replace=False)))
    emit("uniform_sampler", median_ms(lambda r: sampler.sample(n, rng(r)), args.repeats),
         bare, "bare_draw")

    t = time.perf_counter()
    reg = population(n)
    print(json.dumps({"bench": "selection", "case": "setup", "clients": n,
                      "seconds": round(time.perf_counter() - t, 2),
                      "registry_mb": round(reg.nbytes / 2**20, 1)}), flush=True)
    selectors: dict[str, Selector] = {
        "uniform": Uniform(), "stratified_os": Stratified("os"),
        "availability": AvailabilityAware(),
        "availability_stratified": AvailabilityAware(Stratified("os")),
        "fairness_least": FairnessAware("least"), "fairness_weighted": FairnessAware("weighted"),
    }
    for name, selector in selectors.items():
        s = RegistrySampler(selector, k, registry=lambda: reg, clock=lambda: MONDAY_NOON)
        got = s.sample(n, rng(0))
        assert len(got) == k and np.array_equal(got, np.unique(got))
        emit(f"registry_{name}", median_ms(lambda r: s.sample(n, rng(r)), args.repeats), bare,
             "bare_draw")
    ids = reg.columns().ids
    record_ms = median_ms(lambda r: reg.record_outcomes(
        ids[np.sort(rng(r).choice(n, size=k, replace=False))], 100 + r, "accepted",
        now=1.0), args.repeats)
    emit("record_outcomes", record_ms, bare, "bare_draw")

    if args.legacy:
        m = args.legacy
        small = population(m)
        columns = RegistrySampler(Uniform(), k, registry=lambda: small)
        ours = median_ms(lambda r: columns.sample(m, rng(r)), args.repeats)
        legacy = median_ms(lambda r: legacy_draw(small, k, rng(r)), 3)
        print(json.dumps({"bench": "selection", "case": "device_list", "clients": m,
                          "cohort": k, "ms": round(ours, 3), "baseline": "device_list",
                          "baseline_ms": round(legacy, 1),
                          "ratio": round(ours / legacy, 5),
                          "device_list_ms_per_million": round(legacy * 1e6 / m)}), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            sql = SQLiteRegistry(Path(tmp) / "registry.db")
            cols = small.columns()
            os_ = cols.attributes["os"]
            sql.enroll_many([i.decode() for i in cols.ids.tolist()], now=0.0,
                            attributes={"os": np.array(os_.values)[os_.codes].tolist()})
            view = median_ms(lambda r: sql.columns(), 3)
            records = median_ms(lambda r: Columns.from_devices(sql.list()), 3)
            sql.close()
        print(json.dumps({"bench": "selection", "case": "sqlite_columns", "clients": m,
                          "ms": round(view, 1), "baseline": "from_device_records",
                          "baseline_ms": round(records, 1),
                          "ratio": round(view / records, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
