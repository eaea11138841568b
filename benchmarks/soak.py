"""Chaos soak: the real aggregator, a few hundred devices, faults for N minutes, invariants.

The aggregator runs in its own process (:func:`shoal.deploy.run_aggregator`, TLS, its model
store on a small tmpfs when this runs as root). Devices are :class:`DeviceClient` threads of
this process reaching it through a chaos proxy, plus a few raw-protocol devices. Faults:

* devices killed at every protocol stage: the proxy cuts connections mid check-in, download
  or upload; a device dies while training (its runtime is restarted later);
* slow and stalled uploads (the proxy throttles or freezes a connection), stragglers;
* corrupted bytes (the proxy flips one: TLS refuses the record and the connection dies),
  corrupted uploads (a wrong SHA-256, a payload that is not the codec format) and replayed
  uploads (the same idempotency key again; the same task with a fresh key);
* aggregator SIGKILL and restart on the same port; a full disk (the store's tmpfs filled
  with ballast for a while: commits fail, the aggregator dies, it is restarted).

Every device ``i`` uploads ``e_i`` (one-hot at coordinate ``i``) with one example, so the
difference of two consecutive committed models is ``(1/n) sum e_i`` over exactly the updates
counted: the invariants are checked against that oracle, independently of the aggregator's
own bookkeeping.

1. every committed version loads (checksums) and versions 1..K are contiguous, each the
   parent of the next;
2. no update counted twice: every coordinate of a version's delta is 0 or 1/n, and the
   1/n's add up to the n the store recorded;
3. no accepted update lost without a recorded reason: an upload a device saw accepted for
   round r is in version r, unless round r was abandoned (the aggregator's log) or the
   aggregator died (killed, disk full) before committing it;
4. memory bounded: the aggregator's resident memory levels off (last quarter of its longest
   life within 25 % + 40 MB of its second quarter) and stays under ``--max-rss-mb``.

    .venv/bin/python benchmarks/soak.py --minutes 10 --devices 300

Prints one JSON summary line; exits 1 on any invariant violation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from soak_chaos import ChaosProxy, raw_device  # noqa: E402  (beside this file)

ROOT = Path(__file__).resolve().parents[1]


class KillDevice(Exception):
    """Raised by a device's training function: the device dies mid-task."""


# --------------------------------------------------------------------------- the aggregator


def aggregator_main(cfg_path: str, work: str) -> int:
    """The aggregator process: run_aggregator with a log of the coordinator's events."""
    from shoal.config import load_config
    from shoal.deploy import AggregatorPaths, run_aggregator
    from shoal.telemetry import LogObserver, configure_json_logging

    w = Path(work)
    configure_json_logging(open(w / "aggregator.log", "a", buffering=1))
    paths = AggregatorPaths(secret=w / "secret", registry=w / "registry.db",
                            store=w / "models", tls_dir=w / "certs", port_file=w / "port")
    run_aggregator(load_config(cfg_path), paths, observers=[LogObserver()])
    return 0


class Supervisor:
    """Starts, kills and restarts the aggregator process; samples its memory."""

    def __init__(self, work: Path, cfg: Path, events: list) -> None:
        self.work, self.cfg, self.events = work, cfg, events
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.rss: list[tuple[int, float, float]] = []  # (life, t, MB)
        self.life = 0
        self.lock = threading.Lock()

    def start(self) -> None:
        args = [sys.executable, __file__, "--aggregator", str(self.cfg), str(self.work)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT / "src"))
        with self.lock:
            self.life += 1
            log = open(self.work / f"aggregator-{self.life}.out", "w")
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
            self.events.append({"t": time.time(), "event": "start", "life": self.life})

    def kill(self, why: str) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                self.events.append({"t": time.time(), "event": "died", "why": why,
                                    "life": self.life})

    def check(self) -> None:
        """Restart the aggregator if it exited (e.g. a commit failed on a full disk)."""
        with self.lock:
            p = self.proc
            if p is None or p.poll() is None:
                return
            self.events.append({"t": time.time(), "event": "died", "life": self.life,
                                "why": f"exited with {p.returncode}"})
        self.start()

    def sample(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss.append((self.life, time.time(), int(line.split()[1]) / 1024))
        except OSError:
            pass


# --------------------------------------------------------------------------- devices


class AckLog(logging.Handler):
    """Records every upload a device runtime saw accepted or refused (from its log)."""

    def __init__(self) -> None:
        super().__init__()
        self.acks: list[dict] = []
        self.guard = threading.Lock()  # not ``lock``: logging.Handler holds that in emit

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("round %d: update accepted"):
            with self.guard:
                self.acks.append({"device": record.name.rsplit(".", 1)[-1],
                                  "round": int(record.args[0]), "t": record.created})

    def add(self, device: str, rnd: int) -> None:
        with self.guard:
            self.acks.append({"device": device, "round": rnd, "t": time.time()})


def device_thread(i: int, target: str, token: str, ca: bytes, dim: int, acks: AckLog,
                  stop: threading.Event, rng: random.Random, faults: dict) -> None:
    """One device: a DeviceClient whose update is ``e_i``; it may die mid-training (then it
    comes back with a fresh runtime) or straggle."""
    from shoal.transport.client import DeviceClient
    from shoal.transport.device_api import TrainResult

    name = f"device-{i:04d}"
    log = logging.getLogger(f"soak.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(acks)
    delta = np.zeros(dim, np.float32)
    delta[i] = 1.0

    def train(params, settings, round):
        roll = rng.random()
        if roll < faults["die_training"]:
            raise KillDevice()
        if roll < faults["die_training"] + faults["straggle"]:
            stop.wait(rng.uniform(5, 12))  # past the deadline
        return TrainResult(delta=delta, num_examples=1)

    while not stop.is_set():
        client = DeviceClient(target, token, name, root_certificates=ca, train=train,
                              rng=rng, max_backoff_s=2.0, min_wait_s=0.3, max_wait_s=4.0,
                              timeout_s=8.0, transfer_timeout_s=15.0, log=log)
        try:
            client.run(stop=stop)
        except KillDevice:
            stop.wait(rng.uniform(1, 5))  # dead for a while, then a fresh runtime
        except Exception as exc:  # noqa: BLE001 - a soak device reports and restarts
            log.warning("device runtime ended: %r", exc)
            stop.wait(1.0)
        finally:
            client.close()


# --------------------------------------------------------------------------- invariants


def check_invariants(work: Path, cfg, devices: int, acks: list[dict], events: list,
                     rss: list, max_rss_mb: float) -> tuple[dict, list[str]]:
    from shoal.build import load_data
    from shoal.frameworks.torch import FlatModule
    from shoal.models import build_model
    from shoal.store import ModelStore

    violations: list[str] = []
    data = load_data(cfg)
    init = FlatModule(build_model(cfg["model"]["name"], int(np.prod(data.train.x.shape[1:])),
                                  data.train.num_classes, cfg.seed)).get()
    counted: dict[int, set[str]] = {}
    with ModelStore(work / "models", readonly=True) as store:
        versions = store.list()
        prev, prev_params = None, init.astype(np.float64)
        for v in versions:
            try:
                ckpt = store.load(v.id)
            except Exception as exc:  # noqa: BLE001 - any failure to load is a violation
                violations.append(f"version {v.id} does not load: {exc!r}")
                continue
            r = ckpt.state.version
            if r != (prev + 1 if prev is not None else 1) or v.round != r:
                violations.append(f"version {v.id} is round {r} after round {prev}")
            if prev is not None and v.parent != versions[versions.index(v) - 1].id:
                violations.append(f"version {v.id}'s parent is {v.parent}")
            n = int(round(v.metrics.get("accepted", 0)))
            params = ckpt.state.params.astype(np.float64)
            c = (params - prev_params) * max(n, 1)
            ids = np.flatnonzero(np.abs(c) > 0.5)
            if not np.allclose(c, np.round(c), atol=2e-3) or (np.round(c) > 1).any() \
                    or (np.round(c) < 0).any():
                twice = np.flatnonzero(np.round(c) > 1)
                violations.append(f"round {r}: counts not 0/1 (devices {twice.tolist()} "
                                  f"counted more than once?)")
            if len(ids) != n:
                violations.append(f"round {r}: {len(ids)} updates in the model, the store "
                                  f"says {n}")
            if (ids >= devices).any():
                violations.append(f"round {r}: coordinates no device owns moved")
            counted[r] = {f"device-{i:04d}" for i in ids}
            prev, prev_params = r, params
    last = prev or 0
    # reasons an accepted update may be lost: the round was abandoned, the aggregator died
    abandoned: list[tuple[int, float]] = []
    log = work / "aggregator.log"
    for line in (log.read_text().splitlines() if log.exists() else []):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "round_abandoned":
            abandoned.append((int(rec["round"]), float(rec["ts"])))
    deaths = [e["t"] for e in events if e["event"] == "died"]
    commit_time = {}
    with ModelStore(work / "models", readonly=True) as store:
        for v in store.list():
            commit_time[v.round] = v.created
    lost = {"abandoned": 0, "aggregator_died": 0, "run_ended": 0}
    for a in acks:
        r, t = a["round"], a["t"]
        if a["device"] in counted.get(r, ()):
            continue
        end = commit_time.get(r, float("inf"))
        if any(rr == r and ts >= t - 30 for rr, ts in abandoned):
            lost["abandoned"] += 1
        elif any(t - 30 <= d <= end for d in deaths):
            lost["aggregator_died"] += 1
        elif r > last:
            lost["run_ended"] += 1
        else:
            violations.append(f"{a['device']}'s update for round {r} was accepted at "
                              f"{t:.1f} but is not in version {r} and no reason is recorded")
    by_life: dict[int, list[float]] = {}
    for life, _, mb in rss:
        by_life.setdefault(life, []).append(mb)
    longest = max(by_life.values(), key=len) if by_life else []
    peak = max((mb for _, _, mb in rss), default=0.0)
    if peak > max_rss_mb:
        violations.append(f"aggregator RSS reached {peak:.0f} MB > {max_rss_mb:.0f} MB")
    growth = None
    if len(longest) >= 8:
        q = len(longest) // 4
        early, late = float(np.mean(longest[q:2 * q])), float(np.mean(longest[-q:]))
        growth = late - early
        if late > 1.25 * early + 40:
            violations.append(f"aggregator RSS grew from {early:.0f} to {late:.0f} MB")
    summary = {"versions": last, "accepted_uploads_seen": len(acks),
               "counted_updates": sum(len(s) for s in counted.values()),
               "lost_with_reason": lost, "abandoned_rounds": len(abandoned),
               "aggregator_lives": max((e.get("life", 0) for e in events), default=0),
               "peak_rss_mb": round(peak, 1),
               "rss_growth_mb": None if growth is None else round(growth, 1)}
    return summary, violations


# --------------------------------------------------------------------------- the run


def write_config(work: Path, devices: int, per_round: int) -> Path:
    cfg = work / "soak.toml"
    cfg.write_text(f"""rounds = 1000000
[data]
dataset = "synthetic"
clients = {devices}
[model]
name = "logreg"
[sampling]
per_round = {per_round}
[deploy]
over_selection = 1.3
min_fraction = 0.5
deadline_s = 6.0
checkin_interval_s = 2.0
max_active_uploads = 32
[eval]
every = 1000000
[output]
dir = "{work / 'runs'}"
""")
    return cfg


def mount_small_disk(path: Path, mb: int) -> bool:
    """A tmpfs of ``mb`` MiB at ``path`` (root only); False if it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def run(args: argparse.Namespace) -> int:
    from shoal.config import load_config
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.certs import make_local_pki
    from shoal.transport.tokens import issue_token

    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    cfg_path = write_config(work, args.devices, args.per_round)
    cfg = load_config(cfg_path)
    dim = 61 * 10  # logreg on Synthetic: 60 features + bias, 10 classes
    assert args.devices + args.raw_devices <= dim, "every device needs its own coordinate"
    pki = make_local_pki(work / "certs", days=1, now=dt.datetime.now(dt.timezone.utc),
                         overwrite=True)
    ca = pki.ca_cert.read_bytes()
    secret = load_or_create_secret(work / "secret")
    disk = mount_small_disk(work / "models", 48) if args.full_disk else False
    try:
        events: list[dict] = []
        sup = Supervisor(work, cfg_path, events)
        sup.start()
        port_file = work / "port"
        deadline = time.time() + 120
        while not port_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text())
        # later lives listen on the same port, so the proxy's upstream stays valid
        cfg_text = cfg_path.read_text().replace("[deploy]\n", f"[deploy]\nport = {port}\n")
        cfg_path.write_text(cfg_text)
        proxy = ChaosProxy(port, random.Random(args.seed + 1), args.fault_rate)
        proxy.start()
        target = f"localhost:{proxy.port}"
        stop = threading.Event()
        acks = AckLog()
        faults = {"die_training": 0.03 * args.fault_rate / 0.1, "straggle": 0.03}
        threads = []
        total = args.devices + args.raw_devices
        for i in range(total):
            name = f"device-{i:04d}"
            token = issue_token(secret, name, now=time.time(), ttl_seconds=86400)
            if i < args.devices:
                fn, fargs = device_thread, (i, target, token, ca, dim, acks, stop,
                                            random.Random(args.seed * 7919 + i), faults)
            else:
                fn, fargs = raw_device, (i, target, token, ca, dim, acks, stop,
                                         random.Random(args.seed * 7919 + i), events)
            th = threading.Thread(target=fn, args=fargs, daemon=True, name=name)
            th.start()
            threads.append(th)
        end = time.time() + args.minutes * 60
        next_kill = time.time() + rng.uniform(0.3, 0.6) * args.kill_every
        next_disk = time.time() + rng.uniform(0.4, 0.7) * args.minutes * 60 if disk else None
        ballast = work / "models" / "ballast"
        disk_until = None
        while time.time() < end:
            time.sleep(0.5)
            sup.sample()
            sup.check()
            now = time.time()
            if now >= next_kill:
                sup.kill("SIGKILL")
                time.sleep(rng.uniform(0.5, 3.0))
                sup.start()
                next_kill = now + rng.uniform(0.7, 1.3) * args.kill_every
            if next_disk is not None and now >= next_disk:
                with open(ballast, "wb") as f:  # fill the store's disk to the last byte
                    try:
                        while True:
                            f.write(b"\0" * (1 << 20))
                    except OSError:
                        pass
                events.append({"t": now, "event": "disk_full"})
                disk_until, next_disk = now + 15, None
            if disk_until is not None and now >= disk_until:
                ballast.unlink(missing_ok=True)
                events.append({"t": now, "event": "disk_freed"})
                disk_until = None
        stop.set()
        for th in threads:
            th.join(timeout=30)
        sup.kill("soak ended")
        proxy.stop()
        ballast.unlink(missing_ok=True)
        summary, violations = check_invariants(work, cfg, total, acks.acks, events, sup.rss,
                                               args.max_rss_mb)
    finally:  # a failed soak must not leave its small disk mounted
        if disk:
            subprocess.run(["umount", "-l", str(work / "models")], capture_output=True)
    summary.update({"minutes": args.minutes, "devices": args.devices,
                    "raw_devices": args.raw_devices, "full_disk": disk,
                    "proxy_faults": dict(proxy.faults),
                    "raw_device_checks": sum(1 for e in events if e["event"] == "raw_ok"),
                    "raw_device_surprises": [e for e in events
                                             if e["event"] == "raw_unexpected"][:5],
                    "violations": violations})
    print(json.dumps(summary), flush=True)
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--aggregator", nargs=2, metavar=("CONFIG", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--devices", type=int, default=300)
    p.add_argument("--raw-devices", dest="raw_devices", type=int, default=8)
    p.add_argument("--per-round", dest="per_round", type=int, default=30)
    p.add_argument("--kill-every", dest="kill_every", type=float, default=90.0,
                   help="seconds between aggregator SIGKILLs (on average)")
    p.add_argument("--fault-rate", dest="fault_rate", type=float, default=0.1,
                   help="fraction of proxied connections given a fault")
    p.add_argument("--no-full-disk", dest="full_disk", action="store_false")
    p.add_argument("--max-rss-mb", dest="max_rss_mb", type=float, default=1500.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="work directory (default: a new temporary)")
    args = p.parse_args(argv)
    if args.aggregator:
        return aggregator_main(*args.aggregator)
    if args.dir is None:
        import tempfile

        args.dir = tempfile.mkdtemp(prefix="shoal-soak-")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
