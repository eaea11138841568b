"""Soak of abuse: honest devices' commit rate and the aggregator's memory, without and with
abuse, in one run.

Starts `shoal serve` (2NN, TLS, its own process) for 2 x ROUNDS rounds and drives N honest
asyncio devices exactly as `bench_load.py` does (Hello, check in, chunked download, a 0.8 MB
chunked upload, repeat). The first ROUNDS rounds run undisturbed; from then on a second
process attacks the same aggregator until the run ends, with the abuses of issue 13, each
bounded in count and rate:

* ``idle_tcp``: IDLE sockets that never send a byte (reopened when the server closes them);
* ``unauth_streams``: Upload and CheckIn calls without a token that then send nothing;
* ``stalled``: enrolled attacker devices (valid tokens) that send an upload's header and
  then stall (each holds an upload slot until the idle timeout cuts it);
* ``oversized``: enrolled attacker devices uploading past the limit: a header declaring
  the limit and then more data, and a header declaring more than the limit;
* ``eval_spam``: 0.2 MB evaluation reports (10,000 metrics) no task asked for;
* ``bad_hello``: Hello with invalid attributes;
* ``burst`` (only when asked for, ``--abuses burst``): every attacker device starts one
  oversized upload at the same moment, once -- the peak a burst costs.

Prints one JSON line: per phase, the commit rate (versions per second between the phase's
first and last commit, from the model store's commit times) and the aggregator's RSS (max
and median of samples every 0.2 s); the ratios (with / without); the count and outcome of
every abuse; and the stated bound on what the attackers' concurrent uploads cost
(:func:`stated_bound`) beside the measured increase.

    .venv/bin/python benchmarks/bench_abuse.py --devices 20 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import DIM, _drive  # noqa: E402  (the honest devices: one definition)

IDLE_TIMEOUT_S = 5.0  # deploy.idle_timeout_s for the soak (default 20: cuts every 5 s here)


def _config(path: Path, n: int, rounds: int, max_active: int) -> None:
    path.write_text(
        f"rounds = {rounds}\n[data]\nclients = {n}\n[sampling]\nper_round = {n}\n"
        f"[eval]\nevery = {rounds}\n"
        f"[deploy]\nover_selection = 1.0\nmin_fraction = 0.5\ndeadline_s = 120.0\n"
        f"checkin_interval_s = 0.5\nwait_timeout_s = 300.0\n"
        f"idle_timeout_s = {IDLE_TIMEOUT_S}\nmax_active_uploads = {max_active}\n"
        f"[output]\ndir = \"{path.parent / 'runs'}\"\n")


# -- the attacker (its own process) -----------------------------------------------------------

def _attack(port: int, ca: bytes, tokens: dict[str, str], limit: int, idle: int,
            kinds: list[str], stop: mp.Event, out: mp.Queue) -> None:
    asyncio.run(_attacks(port, ca, tokens, limit, idle, kinds, stop, out))


async def _attacks(port: int, ca: bytes, tokens: dict[str, str], limit: int, idle: int,
                   kinds: list[str], stop: mp.Event, out: mp.Queue) -> None:
    import grpc

    from shoal.transport.channel import MAX_CHUNK_BYTES
    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.proto import shoal_pb2_grpc as pb_grpc

    counts: Counter[str] = Counter()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    channel = grpc.aio.secure_channel(f"localhost:{port}", creds,
                                      options=[("grpc.use_local_subchannel_pool", 1)])
    stub = pb_grpc.AggregatorStub(channel)
    halt = asyncio.Event()

    async def outcome(kind: str, call) -> None:
        try:
            reply = await call
            what = getattr(reply, "reason", "") or "ok"
        except grpc.aio.AioRpcError as exc:
            what = exc.code().name
        if not halt.is_set():  # not the calls cut short by the end of the soak
            counts[f"{kind}:{what}"] += 1
        if what == "UNAVAILABLE":
            await asyncio.sleep(0.5)

    async def never():
        await halt.wait()
        if False:  # an async generator that sends nothing until the soak ends
            yield None

    async def idle_tcp() -> None:
        async def closed(reader: asyncio.StreamReader) -> None:
            while await reader.read(1 << 16):
                pass

        async def hold() -> None:
            while not halt.is_set():
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.5)
                    continue
                counts["idle_tcp:opened"] += 1
                t0 = time.monotonic()
                waits = [asyncio.ensure_future(closed(reader)),
                         asyncio.ensure_future(halt.wait())]
                done, pending = await asyncio.wait(waits,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
                if waits[0] in done:  # the server closed it: how long it was held
                    counts["idle_tcp:closed_by_server"] += 1
                    counts["idle_tcp:held_s_total"] += round(time.monotonic() - t0)
                writer.close()
        await asyncio.gather(*(hold() for _ in range(idle)))

    async def unauth_streams() -> None:
        while not halt.is_set():
            await asyncio.gather(*(outcome("unauth_upload", stub.Upload(never(), timeout=30))
                                   for _ in range(50)),
                                 *(outcome("unauth_checkin", stub.CheckIn(
                                     pb.CheckInRequest(device_id="nobody"), timeout=30))
                                   for _ in range(50)))
            await asyncio.sleep(0.05)

    def md(dev: str):
        return (("authorization", f"Bearer {tokens[dev]}"),)

    def header(dev: str, total: int):
        return pb.UploadChunk(header=pb.UploadHeader(
            device_id=dev, round=1, base_version=0, upload_key="x", num_examples=10**7,
            total_size=total, sha256=b"\0" * 32))

    async def stalled(dev: str) -> None:
        async def parts():
            yield header(dev, limit)
            await halt.wait()
        while not halt.is_set():
            await outcome("stalled", stub.Upload(parts(), metadata=md(dev), timeout=60))

    async def oversized(dev: str) -> None:
        piece = b"\0" * MAX_CHUNK_BYTES  # the largest chunk the server reads

        async def past_limit():
            yield header(dev, limit)
            for _ in range(limit // len(piece) + 2):
                yield pb.UploadChunk(data=piece)

        async def declared_over():
            yield header(dev, limit + 1)
            yield pb.UploadChunk(data=piece)

        async def huge_chunk():
            yield header(dev, limit)
            yield pb.UploadChunk(data=b"\0" * (3 << 20))
        while not halt.is_set():
            await outcome("oversized_data", stub.Upload(past_limit(), metadata=md(dev),
                                                        timeout=60))
            await outcome("oversized_header", stub.Upload(declared_over(), metadata=md(dev),
                                                          timeout=60))
            await outcome("oversized_chunk", stub.Upload(huge_chunk(), metadata=md(dev),
                                                         timeout=60))
            await asyncio.sleep(0.05)

    async def burst(devs: list[str]) -> None:
        # every attacker device starts one oversized upload at the same moment (a header
        # declaring the limit, then chunks past it), once
        piece = b"\0" * MAX_CHUNK_BYTES

        async def past_limit(dev: str):
            yield header(dev, limit)
            for _ in range(limit // len(piece) + 2):
                yield pb.UploadChunk(data=piece)
        await asyncio.gather(*(outcome("burst", stub.Upload(past_limit(d), metadata=md(d),
                                                            timeout=60)) for d in devs))

    async def eval_spam(dev: str) -> None:
        report = pb.EvaluationResult(device_id=dev, round=1, model_version=1,
                                     metrics={f"m{i:07d}": 1.0 for i in range(10_000)})
        while not halt.is_set():
            await outcome("eval_spam", stub.ReportEvaluation(report, metadata=md(dev),
                                                             timeout=30))
            await asyncio.sleep(0.2)

    async def bad_hello(dev: str) -> None:
        while not halt.is_set():
            await outcome("bad_hello", stub.Hello(pb.HelloRequest(
                device_id=dev, attributes={"bad name!": "x"}), metadata=md(dev), timeout=30))
            await asyncio.sleep(0.2)

    devices = sorted(tokens)
    # the enrolled attackers are shared among the abuses that need one device each
    per_device = [k for k in ("stalled", "oversized", "burst") if k in kinds]
    share = {k: devices[i::len(per_device)] for i, k in enumerate(per_device)}
    jobs = {"idle_tcp": lambda: [idle_tcp()], "unauth_streams": lambda: [unauth_streams()],
            "stalled": lambda: [stalled(d) for d in share["stalled"]],
            "oversized": lambda: [oversized(d) for d in share["oversized"]],
            "burst": lambda: [burst(share["burst"])],
            "eval_spam": lambda: [eval_spam(devices[0])],
            "bad_hello": lambda: [bad_hello(devices[-1])]}
    running = [asyncio.create_task(j) for kind in kinds for j in jobs[kind]()]
    while not stop.is_set():
        await asyncio.sleep(0.2)
    halt.set()
    await asyncio.wait(running, timeout=30)
    await channel.close()
    out.put(dict(counts))


# -- the run ---------------------------------------------------------------------------------

WAITING_STREAM_BYTES = 512 << 10
"""What an upload waiting for a read slot costs the aggregator, at most: its HTTP/2 window
(64 KiB) and what gRPC and TLS hold of it (measured 0.39 MB, 256 streams over TLS)."""


def stated_bound(streams: int, max_active: int, limit: int) -> int:
    """The bound on the memory ``streams`` concurrent oversized uploads cost: the read ones
    (at most ``max_active``) their buffer (``limit``) and a chunk gRPC holds and its copy in
    Python; the others, waiting for a slot, :data:`WAITING_STREAM_BYTES` each."""
    from shoal.transport.channel import MAX_CHUNK_BYTES

    read = min(streams, max_active)
    return read * (limit + 2 * MAX_CHUNK_BYTES) + (streams - read) * WAITING_STREAM_BYTES


ABUSES = ("idle_tcp", "unauth_streams", "stalled", "oversized", "eval_spam", "bad_hello")
#: not in the default soak: one simultaneous oversized upload per attacker device
EXTRA = ("burst",)


def run(n: int, rounds: int, attackers: int, idle: int, kinds: list[str],
        max_active: int = 64, tuned_malloc: bool = False) -> dict:
    from shoal.codec import Chain
    from shoal.store import ModelStore
    from shoal.transport.channel import MAX_CHUNK_BYTES
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.certs import make_local_pki
    from shoal.transport.downloads import upload_limit
    from shoal.transport.tokens import issue_token

    work = Path(tempfile.mkdtemp(prefix="shoal-abuse-"))
    pki = make_local_pki(work / "certs", days=1, now=dt.datetime.now(dt.timezone.utc))
    (work / "agg").mkdir()
    secret = load_or_create_secret(work / "agg" / "secret")
    now = time.time()
    honest = {f"d{i:05d}": issue_token(secret, f"d{i:05d}", now=now, ttl_seconds=7200)
              for i in range(n)}
    bad = {f"atk{i:03d}": issue_token(secret, f"atk{i:03d}", now=now, ttl_seconds=7200)
           for i in range(attackers)}
    cfg = work / "c.toml"
    _config(cfg, n, 2 * rounds, max_active)
    env = dict(os.environ)
    if tuned_malloc:  # as bench_load does: faster, but freed memory is never returned
        env.update(MALLOC_TRIM_THRESHOLD_="1073741824", MALLOC_MMAP_THRESHOLD_="1073741824")
    # the aggregator's log goes to a file: a pipe nobody reads until the end would fill up
    # and block its writes (the refused calls are logged)
    log = open(work / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "shoal.cli", "serve", str(cfg), "--dir",
                               str(work / "agg"), "--certs", str(work / "certs"), "-q",
                               "--json"], stdout=subprocess.PIPE, stderr=log, env=env)
    port_file = work / "agg" / "port"
    while not port_file.exists():
        if server.poll() is not None:
            raise RuntimeError((work / "serve.log").read_text())
        time.sleep(0.1)
    port = int(port_file.read_text())
    limit = upload_limit(DIM, Chain([]))
    samples: list[tuple[float, int]] = []  # (time, VmRSS kB)
    commits: dict[int, float] = {}  # version -> commit time
    phase = {"abuse_from": None}
    spawn = mp.get_context("spawn")  # never fork a process that runs gRPC
    stop, queue = spawn.Event(), spawn.Queue()
    attacker = spawn.Process(target=_attack, args=(port, pki.ca_cert.read_bytes(), bad, limit,
                                                   idle, kinds, stop, queue), daemon=True)

    def watch() -> None:
        store_dir = work / "agg" / "models"
        while server.poll() is None:
            try:
                for line in open(f"/proc/{server.pid}/status"):
                    if line.startswith("VmRSS:"):
                        samples.append((time.time(), int(line.split()[1])))
            except OSError:
                pass
            if (store_dir / "models" / "index.json").exists():
                with ModelStore(store_dir, readonly=True) as store:
                    for v in store.list():
                        commits.setdefault(v.id, v.created)
            if phase["abuse_from"] is None and len(commits) >= rounds:
                phase["abuse_from"] = time.time()
                attacker.start()
            if len(commits) >= 2 * rounds:
                stop.set()  # the last version is in: the abuse ends, the run evaluates
            time.sleep(0.2)
        stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stats = asyncio.run(_drive(port, pki.ca_cert.read_bytes(), honest, server))
    out, _ = server.communicate(timeout=120)
    log.close()
    watcher.join(timeout=10)
    stop.set()
    abuse = queue.get(timeout=60) if attacker.is_alive() or attacker.exitcode == 0 else {}
    attacker.join(timeout=30)
    if server.returncode != 0:
        raise RuntimeError((work / "serve.log").read_text()[-2000:])
    with ModelStore(work / "agg" / "models", readonly=True) as store:
        for v in store.list():
            commits.setdefault(v.id, v.created)
    split = phase["abuse_from"] or float("inf")

    def rate(versions: list[int]) -> float:
        times = sorted(commits[v] for v in versions)
        return round((len(times) - 1) / (times[-1] - times[0]), 3)

    def gaps(versions: list[int]) -> list[float]:
        return [round(commits[v] - commits[v - 1], 2) for v in versions]

    def rss(lo: float, hi: float) -> dict:
        mb = [kb / 1024 for t, kb in samples if lo <= t < hi]
        return {"max_mb": round(max(mb)), "median_mb": round(statistics.median(mb))}

    # the uploads past their header at once: one per attacker device that sends them
    streams = attackers if {"stalled", "oversized", "burst"} & set(kinds) else 0
    quiet = list(range(2, rounds + 1))  # the first commit includes start-up
    loud = list(range(rounds + 1, 2 * rounds + 1))
    before, during = rate(quiet), rate(loud)
    # the windows end at the last commit: the run's final evaluation comes after it
    mem_quiet, mem_loud = rss(commits[1], split), rss(split, commits[2 * rounds] + 0.2)
    return {"bench": "abuse", "devices": n, "rounds_per_phase": rounds,
            "abuses": kinds, "attacker_devices": attackers, "idle_connections": idle,
            "idle_timeout_s": IDLE_TIMEOUT_S,
            "commits_per_s": {"without": before, "with": during,
                              "ratio": round(during / before, 3)},
            "commit_gaps_s": {"without": gaps(quiet), "with": gaps(loud)},
            "rss": {"without": mem_quiet, "with": mem_loud,
                    "max_increase_mb": mem_loud["max_mb"] - mem_quiet["max_mb"]},
            "max_active_uploads": max_active, "upload_limit_bytes": limit,
            "tuned_malloc": tuned_malloc,
            "stated_bound_mb": round(stated_bound(streams, max_active, limit) / 2**20),
            "honest": {"accepted": stats["accepted"], "errors": stats["errors"],
                       "refusals": stats["reasons"]},
            "abuse": dict(sorted(abuse.items())),
            "final_accuracy": json.loads(out.decode().strip().splitlines()[-1])
            ["final_accuracy"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10, help="rounds per phase")
    ap.add_argument("--attackers", type=int, default=64,
                    help="enrolled attacker devices (shared by 'stalled', 'oversized', "
                         "'burst')")
    ap.add_argument("--idle", type=int, default=300, help="idle TCP connections held")
    ap.add_argument("--max-active", type=int, default=64, dest="max_active",
                    help="deploy.max_active_uploads")
    ap.add_argument("--tuned-malloc", action="store_true", dest="tuned_malloc",
                    help="run the aggregator with bench_load's MALLOC_*_THRESHOLD_ settings")
    ap.add_argument("--abuses", default=",".join(ABUSES),
                    help=f"comma-separated subset of {','.join(ABUSES)}")
    args = ap.parse_args(argv)
    kinds = [k for k in args.abuses.split(",") if k]
    unknown = sorted(set(kinds) - set(ABUSES + EXTRA))
    if unknown:
        ap.error(f"unknown abuses {unknown}; known: {', '.join(ABUSES + EXTRA)}")
    print(json.dumps(run(args.devices, args.rounds, args.attackers, args.idle, kinds,
                         args.max_active, args.tuned_malloc)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
