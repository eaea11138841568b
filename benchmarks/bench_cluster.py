"""The aggregator cluster's ingestion: the same load against 1 and 2 ingest nodes, one run.

For each node count: a redis-server on a free loopback port, the ingest nodes (``python -m
shoal.cli.cluster ingest``) and the committer (``python -m shoal.cli.cluster commit``) as
processes, and N simulated devices driven from this process by ``bench_load``'s load
generator (Hello, check in, download the 2NN in chunks, upload a 0.8 MB update in chunks,
repeat), device ``i`` calling node ``i mod nodes``. Every device is asked every round. One
JSON line per node count (uploads per second from the first accepted upload to the last,
errors, p50/p99 upload latency, each process's CPU seconds), then a ``cluster_ratio`` line:
2 nodes' rate over 1 node's.

    .venv/bin/python benchmarks/bench_cluster.py --devices 200 --rounds 4

Everything runs on this machine: the load generator, the nodes, the committer and Redis
share its cores, so the ratio says what a second node buys when nothing else is added, not
what a second machine would.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import DIM, _device  # noqa: E402  (one load generator for both benchmarks)


def _config(path: Path, n: int, rounds: int, url: str) -> None:
    path.write_text(
        f"rounds = {rounds}\n[data]\nclients = {n}\n[sampling]\nper_round = {n}\n"
        f"[eval]\nevery = {rounds}\n"
        f"[deploy]\nover_selection = 1.0\nmin_fraction = 0.5\ndeadline_s = 600.0\n"
        f"checkin_interval_s = 1.0\nwait_timeout_s = 300.0\nregistry = \"redis\"\n"
        f"redis_url = \"{url}\"\n[output]\ndir = \"{path.parent / 'runs'}\"\n")


async def _drive(ports: list[int], ca: bytes, tokens: dict[str, str],
                 committer: subprocess.Popen) -> dict:
    import grpc

    from shoal.codec import Chain, to_bytes
    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.proto import shoal_pb2_grpc as pb_grpc

    delta = (np.random.default_rng(0).standard_normal(DIM) * 1e-3).astype(np.float32)
    payload = to_bytes(Chain([]).encode(delta, np.random.default_rng(0)))
    sha = hashlib.sha256(payload).digest()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    channels = [[grpc.aio.secure_channel(f"localhost:{port}", creds,
                                         options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(4)] for port in ports]
    stubs = [[pb_grpc.AggregatorStub(c) for c in node] for node in channels]
    stats = {"accepted": 0, "errors": 0, "bytes_up": 0, "bytes_down": 0, "latency": [],
             "reasons": {}, "rpc_error_times": [], "last_accept": 0.0, "first_accept": 0.0}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_device(stubs[i % len(ports)][(i // len(ports)) % 4], pb, dev,
                                         tok, payload, sha, stats, stop,
                                         lambda: committer.poll() is None))
             for i, (dev, tok) in enumerate(tokens.items())]
    t0 = time.perf_counter()
    while committer.poll() is None:
        await asyncio.sleep(0.2)
    stats["seconds"] = time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for node in channels:
        for c in node:
            await c.close()
    return stats


def _cpu_s(pid: int) -> float:
    """User + system seconds of a running process (from /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(nodes: int, devices: int, rounds: int) -> dict:
    from shoal.cli.cluster import start_redis
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.certs import make_local_pki
    from shoal.transport.tokens import issue_token

    work = Path(tempfile.mkdtemp(prefix="shoal-cluster-bench-"))
    url, redis_proc = start_redis(work / "redis")
    procs: list[subprocess.Popen] = []
    try:
        pki = make_local_pki(work / "certs", days=1, now=dt.datetime.now(dt.timezone.utc))
        secret = load_or_create_secret(work / "secret")
        tokens = {f"d{i:05d}": issue_token(secret, f"d{i:05d}", now=time.time(),
                                           ttl_seconds=7200) for i in range(devices)}
        cfg = work / "c.toml"
        _config(cfg, devices, rounds, url)
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_TRIM_THRESHOLD_="1073741824",
                   MALLOC_MMAP_THRESHOLD_="1073741824")
        for i in range(nodes):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shoal.cli.cluster", "ingest", str(cfg), "--name",
                 f"ingest-{i}", "--secret", str(work / "secret"), "--certs",
                 str(work / "certs"), "--dir", str(work / f"ingest-{i}")], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        ports = []
        for i in range(nodes):
            port_file = work / f"ingest-{i}" / "port"
            while not (port_file.exists() and port_file.read_text().strip()):
                if procs[i].poll() is not None:
                    raise RuntimeError(procs[i].stderr.read().decode()[-2000:])
                time.sleep(0.1)
            ports.append(int(port_file.read_text()))
        committer = subprocess.Popen([sys.executable, "-m", "shoal.cli.cluster", "commit",
                                      str(cfg), "--dir", str(work)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(committer)
        cpu: dict[str, float] = {}

        async def main() -> dict:
            async def watch() -> None:  # CPU of the nodes and the committer, while they run
                while committer.poll() is None:
                    for name, p in [*((f"ingest-{i}", procs[i]) for i in range(nodes)),
                                    ("committer", committer), ("redis", redis_proc)]:
                        try:
                            cpu[name] = _cpu_s(p.pid)
                        except OSError:
                            pass
                    await asyncio.sleep(0.5)

            w = asyncio.create_task(watch())
            out = await _drive(ports, pki.ca_cert.read_bytes(), tokens, committer)
            await w
            return out

        self0 = resource.getrusage(resource.RUSAGE_SELF)
        stats = asyncio.run(main())
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        out, err = committer.communicate(timeout=120)
        if committer.returncode != 0:
            raise RuntimeError(err.decode()[-2000:])
        summary = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=30)
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
    lat = sorted(stats["latency"])
    return {"bench": "cluster", "ingest_nodes": nodes, "devices": devices, "rounds": rounds,
            "updates": stats["accepted"], "rounds_committed": summary["rounds"],
            "updates_per_s_uploading": round((stats["accepted"] - 1) / max(
                stats["last_accept"] - stats["first_accept"], 1e-9), 1),
            "updates_per_s": round(stats["accepted"] / stats["seconds"], 1),
            "upload_p50_s": round(statistics.median(lat), 3) if lat else None,
            "upload_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
            "errors": stats["errors"] + sum(1 for t, _ in stats["rpc_error_times"]
                                            if t <= stats["last_accept"]),
            "refusals": stats["reasons"],
            "cpu_s": {k: round(v, 1) for k, v in sorted(cpu.items())},
            "load_generator_cpu_s": round((self1.ru_utime - self0.ru_utime)
                                          + (self1.ru_stime - self0.ru_stime), 1),
            "seconds": round(stats["seconds"], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    rates: dict[int, list[float]] = {}
    for _ in range(args.repeats):
        for n in args.nodes:
            line = run(n, args.devices, args.rounds)
            print(json.dumps(line), flush=True)
            rates.setdefault(n, []).append(line["updates_per_s_uploading"])
    base = statistics.median(rates[args.nodes[0]])
    print(json.dumps({"bench": "cluster_ratio", "devices": args.devices,
                      "rounds": args.rounds, **{f"nodes_{n}_over_{args.nodes[0]}": round(
                          statistics.median(r) / base, 3) for n, r in rates.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
