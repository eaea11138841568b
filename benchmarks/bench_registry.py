"""The Redis registry against the SQLite one, in one run: what a deployment's registry calls
cost (bulk enrolment, the columns selection reads, a cohort's outcomes, single reads).

Redis runs as a real ``redis-server`` on a free loopback port (append-only file, fsync every
write, as in the tests: the most cautious setting), SQLite as a file in a temporary
directory. One JSON line per registry and population size; a summary line with Redis / SQLite
ratios.

    .venv/bin/python benchmarks/bench_registry.py                  # 10,000 and 100,000 devices
    .venv/bin/python benchmarks/bench_registry.py --sizes 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's redis-server helper


def measure(registry, n: int) -> dict:
    from shoal.registry import sequential_ids

    ids = [i.decode() for i in sequential_ids(n)]
    out = {}
    t = time.perf_counter()
    registry.enroll_many(ids, now=1.0, attributes={"os": ["android", "ios"] * (n // 2)})
    out["enroll_many_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cols = registry.columns()
    out["columns_s"] = time.perf_counter() - t
    assert cols.size == n
    cohort = ids[:: max(1, n // 100)][:100]
    t = time.perf_counter()
    for rnd in range(10):
        registry.record_outcomes(cohort, rnd, "accepted", now=2.0 + rnd)
    out["record_100_ms"] = (time.perf_counter() - t) / 10 * 1000
    t = time.perf_counter()
    for device_id in cohort:
        registry.get(device_id)
    out["get_ms"] = (time.perf_counter() - t) / len(cohort) * 1000
    return {k: round(v, 4) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    args = ap.parse_args(argv)

    from redis_server import RedisServer

    from shoal.registry import SQLiteRegistry
    from shoal.registry.redis import RedisRegistry

    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    server = RedisServer(work)
    try:
        for n in args.sizes:
            rows = {}
            for kind in ("sqlite", "redis"):
                reg = SQLiteRegistry(work / f"r{n}.db") if kind == "sqlite" \
                    else RedisRegistry(server.url, prefix=f"bench{n}")
                rows[kind] = measure(reg, n)
                reg.close()
                print(json.dumps({"bench": "registry", "kind": kind, "devices": n,
                                  **rows[kind]}), flush=True)
            print(json.dumps({"bench": "registry_summary", "devices": n,
                              "redis_over_sqlite": {k: round(rows["redis"][k]
                                                             / rows["sqlite"][k], 2)
                                                    for k in rows["sqlite"]}}), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
