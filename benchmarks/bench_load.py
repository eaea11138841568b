"""Load on the aggregator: N simulated devices over real gRPC on loopback.

Starts `shoal serve` in its own process (2NN model, every device selected every round, so N
uploads of 0.8 MB compete in each round) and drives N devices from one asyncio process:
Hello, then check in, download the model in chunks, upload a 2NN-sized update in chunks,
repeat, for the configured rounds. Prints one JSON line per N: updates per second, MB/s
ingested, p50/p99 upload latency (from the first upload byte to the reply), errors (must be
0), and the aggregator's peak RSS (VmHWM), which should stay nearly flat as N grows because
aggregation streams and uploads beyond `deploy.max_active_uploads` wait under flow control.
The aggregator's CPU counts its child processes (shoal's model process, which evaluates
versions); its peak RSS is the serving process's (``aggregator_peak_rss_mb``), its children's
apart (``aggregator_children_peak_rss_mb``).

    .venv/bin/python benchmarks/bench_load.py --devices 100 1000 --rounds 5

Each line also gives the aggregator's CPU time (user + system, from the reaped process's
rusage), the CPU per accepted upload of the aggregator and of the load generator while
uploads flow (``*_cpu_ms_per_update_uploading``), and the machine's idle share meanwhile
(``idle_share_uploading``: near 0 when the two cores are the limit; above it, something
waits). ``--dashboard`` runs every N without and then with ``shoal serve --dashboard``,
an open page's traffic included (one event stream read to the end, the devices page fetched
every 2 s), ``--repeats`` times, and adds a ``load_dashboard`` line with the CPU ratio. As
that ratio is at the mercy of whatever else the machine runs, the runs with the dashboard
also measure its own share directly: the CPU time of its threads (named ``shoal-dashboard``
at the OS level) plus its hook calls (the state's change count) times their cost measured
here.

``--bare`` runs every N against shoal and then against a bare ``grpc.aio`` server
(``bare_aggregator.py``: the same protocol and TLS, no auth, validation or bookkeeping, only
``np.add``) driven by the same load generator, ``--repeats`` times, and adds a
``load_vs_bare`` line: shoal's uploads per second as a fraction of the bare server's, both
counted from the first accepted upload to the last (``updates_per_s_uploading``: the servers'
start-up, shoal's final evaluation and its exit are not ingestion). ``--bdp-probe`` runs shoal
with ``deploy.bdp_probe = true`` (HTTP/2 windows grown to the bandwidth-delay product, as
the bare server has them, instead of a fixed 64 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 199_210


def _config(path: Path, n: int, rounds: int, bdp_probe: bool = False) -> None:
    path.write_text(
        f"rounds = {rounds}\n[data]\nclients = {n}\n[sampling]\nper_round = {n}\n"
        f"[eval]\nevery = {rounds}\n"
        f"[deploy]\nover_selection = 1.0\nmin_fraction = 0.5\ndeadline_s = 600.0\n"
        f"checkin_interval_s = 1.0\nwait_timeout_s = 300.0\n"
        f"bdp_probe = {str(bdp_probe).lower()}\n"
        f"[output]\ndir = \"{path.parent / 'runs'}\"\n")


async def _come_back(come_back, stop: asyncio.Event) -> None:
    """Wait until the aggregator's come-back time (within 0.05-2 s) or the end of the run."""
    try:
        await asyncio.wait_for(stop.wait(),
                               timeout=min(max(come_back.at - time.time(), 0.05), 2.0))
    except asyncio.TimeoutError:
        pass


async def _device(stub, pb, dev: str, token: str, payload: bytes, sha: bytes, stats: dict,
                  stop: asyncio.Event, alive) -> None:
    import grpc

    md = (("authorization", f"Bearer {token}"),)
    await stub.Hello(pb.HelloRequest(device_id=dev), metadata=md, timeout=60)
    while not stop.is_set():
        try:
            reply = await stub.CheckIn(pb.CheckInRequest(device_id=dev), metadata=md,
                                       timeout=60)
            stats["checkins"] += 1
            if reply.WhichOneof("reply") == "come_back":
                await _come_back(reply.come_back, stop)
                continue
            task = reply.task
            async for chunk in stub.Download(pb.DownloadRequest(version=task.model_version),
                                             metadata=md, timeout=120):
                stats["bytes_down"] += len(chunk.data)
            stats["downloads"] += 1

            def parts():
                yield pb.UploadChunk(header=pb.UploadHeader(
                    device_id=dev, round=task.round, base_version=task.model_version,
                    upload_key=task.upload_key, idempotency_key="k", num_examples=10,
                    total_size=len(payload), sha256=sha))
                for off in range(0, len(payload), 256 << 10):
                    yield pb.UploadChunk(data=payload[off:off + (256 << 10)])

            t0 = time.perf_counter()
            res = await stub.Upload(parts(), metadata=md, timeout=600)
            stats["latency"].append(time.perf_counter() - t0)
            if res.accepted:
                stats["accepted"] += 1
                stats["bytes_up"] += len(payload)
                stats["last_accept"] = time.perf_counter()
                span = stats["rounds"].setdefault(task.round, [stats["last_accept"]] * 2)
                span[1] = stats["last_accept"]
                stats["first_accept"] = stats["first_accept"] or stats["last_accept"]
            elif res.reason == "late":
                stats["late"] += 1
            else:
                stats["errors"] += 1
                stats["reasons"][res.reason] = stats["reasons"].get(res.reason, 0) + 1
            if res.HasField("come_back"):  # as shoal's runtime: wait as told, then check in
                await _come_back(res.come_back, stop)
        except grpc.aio.AioRpcError as exc:
            if stop.is_set() or not alive():
                return  # the aggregator finished its rounds and exited
            stats["rpc_error_times"].append((time.perf_counter(), exc.code().name))
            await asyncio.sleep(0.5)


async def _drive(port: int, ca: bytes, tokens: dict[str, str], server: subprocess.Popen,
                 channels: int = 8) -> dict:
    import grpc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from shoal.codec import Chain, to_bytes
    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.proto import shoal_pb2_grpc as pb_grpc

    delta = (np.random.default_rng(0).standard_normal(DIM) * 1e-3).astype(np.float32)
    payload = to_bytes(Chain([]).encode(delta, np.random.default_rng(0)))
    sha = hashlib.sha256(payload).digest()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    channels = [grpc.aio.secure_channel(f"localhost:{port}", creds,
                                        options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(channels)]
    stubs = [pb_grpc.AggregatorStub(c) for c in channels]
    stats = {"accepted": 0, "errors": 0, "bytes_up": 0, "bytes_down": 0, "latency": [],
             "reasons": {}, "rpc_error_times": [], "last_accept": 0.0,
             "first_accept": 0.0, "checkins": 0, "rounds": {}, "late": 0, "downloads": 0}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_device(stubs[i % len(stubs)], pb, dev, tok, payload, sha,
                                         stats, stop, lambda: server.poll() is None))
             for i, (dev, tok) in enumerate(tokens.items())]
    t0 = time.perf_counter()
    while server.poll() is None:
        await asyncio.sleep(0.2)
    stats["seconds"] = time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    return stats


def _open_page(url: str, server: subprocess.Popen, last: dict) -> None:
    """What an open dashboard costs the aggregator: its event stream and devices page.
    ``last["changes"]`` is the state's change count in the last event received."""
    import threading
    import urllib.request

    def stream() -> None:
        while server.poll() is None:  # connect once the aggregator serves, like a browser
            try:
                with urllib.request.urlopen(url + "api/events", timeout=600) as r:
                    for line in r:
                        if line.startswith(b"data: "):
                            last["changes"] = json.loads(line[6:])["changes"]
            except OSError:
                time.sleep(0.5)  # not up yet, or finished and closed the stream

    threading.Thread(target=stream, daemon=True).start()
    while server.poll() is None:
        try:
            urllib.request.urlopen(url + "api/devices", timeout=10).read()
        except OSError:
            pass
        time.sleep(2.0)


def _hook_seconds() -> float:
    """CPU seconds of one dashboard hook call (a mix of the calls an upload makes)."""
    from shoal.dashboard.state import DashboardObserver, RunInfo, RunState

    obs = DashboardObserver(RunState(RunInfo(name="bench", mode="deployment")))
    n = 50_000
    t0 = time.thread_time()
    for _ in range(n):
        obs.checked_in("task")
        obs.uploads_active(1)
        obs.bytes_moved("up", 800_000)
        obs.uploads_active(-1)
        obs.update_accepted(1, 1, 0, 0.0)
    return (time.thread_time() - t0) / (5 * n)


def _cpu_s(stat: Path) -> float:
    """User + system CPU seconds in a /proc ``stat`` file (a process's or a thread's); 0
    once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_s(pid: int, name: str) -> float:
    """CPU seconds (user + system) of the threads of ``pid`` whose OS name is ``name``."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == name:
                total += _cpu_s(task / "stat")
        except OSError:
            pass  # the thread ended
    return total


def _children(pid: int) -> list[int]:
    """The process's children (e.g. shoal's model process), from /proc."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _hwm_kb(pid: int) -> int:
    """A process's peak resident memory (VmHWM) so far, in KiB (0 once it is gone)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _idle_seconds() -> float:
    """The machine's idle time so far, summed over its cores (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()  # cpu user nice system idle iowait ...
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, rounds: int, dashboard: bool = False, bare: bool = False,
        channels: int = 8, bdp_probe: bool = False) -> dict:
    import datetime as dt
    import resource
    import threading

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.tokens import issue_token
    from shoal.transport.certs import make_local_pki

    work = Path(tempfile.mkdtemp(prefix="shoal-load-"))
    pki = make_local_pki(work / "certs", days=1, now=dt.datetime.now(dt.timezone.utc))
    (work / "agg").mkdir()
    secret = load_or_create_secret(work / "agg" / "secret")
    tokens = {f"d{i:05d}": issue_token(secret, f"d{i:05d}", now=time.time(),
                                       ttl_seconds=7200) for i in range(n)}
    cfg = work / "c.toml"
    _config(cfg, n, rounds, bdp_probe)
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="1073741824",
               MALLOC_MMAP_THRESHOLD_="1073741824")
    port = _free_port()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    port_file = work / "agg" / "port"
    command = ([sys.executable, str(Path(__file__).with_name("bare_aggregator.py")),
                "--port-file", str(port_file), "--certs", str(work / "certs"),
                "--devices", str(n), "--rounds", str(rounds)] if bare else
               [sys.executable, "-m", "shoal.cli", "serve", str(cfg), "--dir",
                str(work / "agg"), "--certs", str(work / "certs"), "-q", "--json",
                *(["--dashboard", f"127.0.0.1:{port}"] if dashboard else [])])
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    last: dict = {"changes": 0}
    if dashboard:
        threading.Thread(target=_open_page, args=(f"http://127.0.0.1:{port}/", server, last),
                         daemon=True).start()
    while not port_file.exists() or not port_file.read_text():
        if server.poll() is not None:
            raise RuntimeError(server.stderr.read().decode())
        time.sleep(0.1)
    peak = {"kb": 0, "dashboard_cpu_s": 0.0}

    # (time, the aggregator's CPU seconds so far, this process's -- the load generator's --,
    # the machine's idle seconds, all cores)
    ticks: list[tuple[float, float, float, float]] = []

    def rss() -> None:
        try:
            # the server and its children (shoal's model process) count as the aggregator
            children = _children(server.pid)
            ticks.append((time.perf_counter(),
                          sum(_cpu_s(Path(f"/proc/{p}/stat")) for p in (server.pid, *children)),
                          time.process_time(), _idle_seconds()))
            peak["kb"] = max(peak["kb"], _hwm_kb(server.pid))
            peak["children_kb"] = max(peak.get("children_kb", 0),
                                      sum(_hwm_kb(p) for p in children))
            if dashboard:
                peak["dashboard_cpu_s"] = max(peak["dashboard_cpu_s"],
                                              _thread_cpu_s(server.pid, "shoal-dashboard"))
        except OSError:
            pass

    async def main() -> dict:
        async def watch() -> None:
            while server.poll() is None:
                rss()
                await asyncio.sleep(0.5)

        w = asyncio.create_task(watch())
        out = await _drive(int(port_file.read_text()), pki.ca_cert.read_bytes(), tokens, server,
                           channels)
        await w
        return out

    own0 = resource.getrusage(resource.RUSAGE_SELF)
    stats = asyncio.run(main())
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    out, err = server.communicate(timeout=60)
    if server.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lat = sorted(stats["latency"])
    spans = [stats["rounds"][r] for r in sorted(stats["rounds"])]  # (first, last) accepts
    # CPU per upload while uploads were flowing, the aggregator's and the load generator's
    # (both sampled every 0.5 s between the first and the last accepted upload, at the mean
    # upload rate), and the load generator's over its whole drive (which adds the devices'
    # Hello and the calls of the start-up and the end, when no upload flows)
    window = [w for w in ticks if stats["first_accept"] <= w[0] <= stats["last_accept"]]
    rate = stats["accepted"] / max(stats["last_accept"] - stats["first_accept"], 1e-9)

    def per_update(i: int) -> float | None:
        if len(window) < 2:
            return None
        return round(1e3 * (window[-1][i] - window[0][i])
                     / (rate * (window[-1][0] - window[0][0])), 3)

    extra = {"aggregator_cpu_ms_per_update_uploading": per_update(1),
             "loadgen_cpu_ms_per_update_uploading": per_update(2),
             # the cores' idle share meanwhile (0: the machine was the limit)
             "idle_share_uploading": round((window[-1][3] - window[0][3]) / (
                 (os.cpu_count() or 1) * (window[-1][0] - window[0][0])), 3)
             if len(window) > 1 else None,
             "loadgen_cpu_ms_per_update": round(1e3 * ((own1.ru_utime - own0.ru_utime)
                                                       + (own1.ru_stime - own0.ru_stime))
                                                / max(stats["accepted"], 1), 3)}
    if dashboard:
        hooks = last["changes"] * _hook_seconds()
        extra |= {"dashboard_threads_cpu_s": round(peak["dashboard_cpu_s"], 2),
                 "dashboard_hook_calls": last["changes"],
                 "dashboard_hooks_cpu_s": round(hooks, 3),
                 "dashboard_share": round((peak["dashboard_cpu_s"] + hooks) / cpu, 4)}
    summary = json.loads(out.decode().strip().splitlines()[-1])
    return {"bench": "load_bare" if bare else "load", "devices": n, "rounds": rounds,
            "channels": channels, "dashboard": dashboard,
            **({} if bare else {"bdp_probe": bdp_probe}),
            "aggregator_cpu_s": round(cpu, 2), **extra,
            "updates": stats["accepted"],
            "updates_per_s": round(stats["accepted"] / stats["seconds"], 1),
            # from the first accepted upload to the last: without start-up and final evaluation
            "updates_per_s_uploading": round((stats["accepted"] - 1) / max(
                stats["last_accept"] - stats["first_accept"], 1e-9), 1),
            # the time between a round's last accepted upload and the next one's first: the
            # round's commit, the next task, and devices coming back for it
            "round_gaps_s": [round(b[0] - a[1], 2) for a, b in zip(spans, spans[1:])],
            # calls besides the uploads (a device told to come back checks in again)
            "checkins_per_update": round(stats["checkins"] / max(stats["accepted"], 1), 2),
            # downloads and uploads refused as late (the round had closed), per accepted one:
            # transfers the devices made for nothing
            "downloads_per_update": round(stats["downloads"] / max(stats["accepted"], 1), 3),
            "late_per_update": round(stats["late"] / max(stats["accepted"], 1), 3),
            "mb_per_s_in": round(stats["bytes_up"] / stats["seconds"] / 1e6, 1),
            "upload_p50_s": round(statistics.median(lat), 3) if lat else None,
            "upload_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
            "errors": stats["errors"] + sum(1 for t, _ in stats["rpc_error_times"]
                                            if t <= stats["last_accept"]),
            "rpc_errors_after_last_round": len([1 for t, _ in stats["rpc_error_times"]
                                                if t > stats["last_accept"]]),
            "refusals": stats["reasons"],
            "aggregator_peak_rss_mb": round(peak["kb"] / 1024),
            # its child processes' (shoal's model process: PyTorch, the test set)
            "aggregator_children_peak_rss_mb": round(peak.get("children_kb", 0) / 1024),
            "seconds": round(stats["seconds"], 1),
            "summary": summary.get("final_accuracy", summary.get("model_sum"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", type=int, default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dashboard", action="store_true",
                    help="run each N without and with the dashboard (an open page), "
                         "alternating, and compare the aggregator's CPU per update")
    ap.add_argument("--bare", action="store_true",
                    help="run each N against shoal and a bare grpc.aio server, alternating, "
                         "and compare uploads per second")
    ap.add_argument("--bdp-probe", action="store_true",
                    help="run shoal with deploy.bdp_probe = true (HTTP/2 windows grown to "
                         "the bandwidth-delay product, not a fixed 64 KiB)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="pairs per N with --dashboard or --bare")
    ap.add_argument("--channels", type=int, default=8,
                    help="gRPC connections the devices share (8: 125 devices' calls "
                         "multiplexed on each at N = 1000; N: one per device)")
    args = ap.parse_args(argv)
    for n in args.devices:
        if args.bare:
            rates: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for bare in (True, False):
                    res = run(n, args.rounds, bare=bare, channels=args.channels,
                              bdp_probe=args.bdp_probe)
                    print(json.dumps(res), flush=True)
                    rates[bare].append(res["updates_per_s_uploading"])
            ratio = statistics.mean(rates[False]) / statistics.mean(rates[True])
            print(json.dumps({"bench": "load_vs_bare", "devices": n, "pairs": args.repeats,
                              "shoal_updates_per_s": round(statistics.mean(rates[False]), 1),
                              "bare_updates_per_s": round(statistics.mean(rates[True]), 1),
                              "shoal_over_bare": round(ratio, 3)}), flush=True)
            continue
        if not args.dashboard:
            print(json.dumps(run(n, args.rounds, channels=args.channels,
                                 bdp_probe=args.bdp_probe)), flush=True)
            continue
        per_update: dict[bool, list[float]] = {False: [], True: []}
        shares = []
        for _ in range(args.repeats):
            for with_it in (False, True):
                res = run(n, args.rounds, dashboard=with_it, channels=args.channels)
                print(json.dumps(res), flush=True)
                per_update[with_it].append(res["aggregator_cpu_s"] / res["updates"])
                if with_it:
                    shares.append(res["dashboard_share"])
        base, dash = statistics.mean(per_update[False]), statistics.mean(per_update[True])
        print(json.dumps({"bench": "load_dashboard", "devices": n, "pairs": args.repeats,
                          "cpu_ms_per_update_without": round(1e3 * base, 3),
                          "cpu_ms_per_update_with": round(1e3 * dash, 3),
                          "overhead": round(dash / base - 1, 4),
                          "dashboard_share_of_cpu": round(statistics.mean(shares), 4)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
