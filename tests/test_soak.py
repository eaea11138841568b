"""The chaos soak, short: the real aggregator (its own process, TLS, SIGKILLed and restarted,
its store's disk filled for a while when running as root) with 30 DeviceClient devices and 3
raw-protocol devices behind a proxy that cuts, stalls, throttles and corrupts connections.
benchmarks/soak.py checks the invariants against the counting oracle (every device uploads
its own one-hot vector); the benchmark run lasts 10 minutes with 300 devices."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import soak  # noqa: E402


@pytest.mark.slow
def test_short_soak_keeps_every_invariant(tmp_path, capsys):
    rc = soak.main(["--minutes", "0.5", "--devices", "30", "--raw-devices", "3",
                    "--per-round", "8", "--kill-every", "20", "--fault-rate", "0.2",
                    "--dir", str(tmp_path / "soak")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["violations"] == [], summary
    assert summary["versions"] >= 3  # rounds committed between the faults
    assert summary["aggregator_lives"] >= 2  # it was killed and came back
    faults = summary["proxy_faults"]
    assert sum(v for k, v in faults.items() if k != "none") >= 1
    assert summary["counted_updates"] >= 3 * 4  # min_fraction 0.5 of 8 per version
    assert summary["raw_device_checks"] >= 1 and not summary["raw_device_surprises"]
