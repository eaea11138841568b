"""Gossip peers over real gRPC on loopback, with mutual TLS.

One peer served in this process answers a misbehaving caller: garbage of every kind is
refused with its reason and changes nothing; callers without a certificate of the network's CA
do not get past the handshake. Six peers in threads: a trimmed mean contains a Byzantine one.
Then networks of 6 peer processes: the consensus decay is the simulator's, step for step; a
peer killed mid-run leaves the others converging and catches up when restarted; ``shoal
launch --gossip`` reports on the network and ends with the simulator's models.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import threading
import time
import zlib

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from shoal.cli import main  # noqa: E402
from shoal.cli.gossip import PeerFiles, peer_command, prepare_network  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.gossip.build import initial_models  # noqa: E402
from shoal.gossip.metrics import consensus_distance  # noqa: E402
from shoal.gossip.mixing import StaticSchedule, metropolis_hastings  # noqa: E402
from shoal.gossip.node import GossipNode, Offer  # noqa: E402
from shoal.gossip.simulator import GossipSimulator  # noqa: E402
from shoal.gossip.state import load_state, read_trace  # noqa: E402
from shoal.gossip.topology import ring  # noqa: E402
from shoal.transport.certs import make_client_cert, make_local_pki  # noqa: E402
from shoal.transport.channel import make_channel  # noqa: E402
from shoal.transport.gossip_peer import (GossipService, PeerLinks, encode_model,  # noqa: E402
                                         peer_name, serve_peer)
from shoal.transport.proto import gossip_pb2 as pb  # noqa: E402
from shoal.transport.proto import gossip_pb2_grpc as pb_grpc  # noqa: E402

NOW = dt.datetime.now(dt.timezone.utc)
DIM = 16


@pytest.fixture()
def peer0(tmp_path):
    """Peer 0 of a 6-ring, waiting at step 0 with its model, served with mutual TLS."""
    pki = make_local_pki(tmp_path / "pki", days=1, now=NOW)
    certs = {name: make_client_cert(tmp_path / "pki", name=name, ca_cert=pki.ca_cert,
                                    ca_key=pki.ca_key, days=1, now=NOW)
             for name in [peer_name(i) for i in range(6)] + ["mallory"]}
    other = make_local_pki(tmp_path / "other", days=1, now=NOW)
    rogue = make_client_cert(tmp_path / "other", name=peer_name(1), ca_cert=other.ca_cert,
                             ca_key=other.ca_key, days=1, now=NOW)
    node = GossipNode(0, StaticSchedule(metropolis_hastings(ring(6))),
                      np.zeros(DIM, np.float32))
    own = np.arange(DIM, dtype=np.float32)
    node.offer(0, own, now=time.monotonic())
    cond = threading.Condition()
    service = GossipService(node, cond, [peer_name(i) for i in range(6)])
    port, stop = serve_peer(service, tls=(pki.server_cert.read_bytes(),
                                          pki.server_key.read_bytes()),
                            client_ca=pki.ca_cert.read_bytes())
    channels = []

    def stub(cert=None):
        pair = None if cert is None else (cert.cert.read_bytes(), cert.key.read_bytes())
        ch = make_channel(f"localhost:{port}", pki.ca_cert.read_bytes(), pair)
        channels.append(ch)
        return pb_grpc.GossipPeerStub(ch)

    try:
        yield {"node": node, "own": own, "stub": stub, "certs": certs, "rogue": rogue,
               "port": port, "ca": pki.ca_cert.read_bytes()}
    finally:
        for ch in channels:
            ch.close()
        stop()


def _exchange(stub, sender, step, payload, *, size=None, wants=True):
    head = pb.ExchangeChunk(offer=pb.OfferHeader(
        sender=sender, step=step, payload_size=len(payload) if size is None else size,
        wants_model=wants))
    replies = list(stub.Exchange(iter([head, pb.ExchangeChunk(data=payload)]), timeout=10))
    return replies[0].answer, b"".join(r.data for r in replies[1:])


def _nan_model():
    """A well-formed payload (valid CRC) whose values hold a NaN: the encoder refuses to
    make one, so the float bytes are patched and the checksum recomputed."""
    raw = bytearray(encode_model(np.zeros(DIM, np.float32)))
    values = len(raw) - 4 - 4 * DIM  # the raw float32 values end the payload, then the CRC
    assert raw[values:len(raw) - 4] == bytes(4 * DIM)
    raw[values + 12:values + 16] = np.array([np.nan], np.float32).tobytes()
    raw[-4:] = zlib.crc32(bytes(raw[:-4])).to_bytes(4, "little")
    return bytes(raw)


@pytest.mark.parametrize("who, claims, payload, size, reason", [
    (peer_name(1), peer_name(1), b"\x89SHC garbage", None, "malformed"),
    (peer_name(1), peer_name(1), "nan", None, "non_finite"),
    (peer_name(1), peer_name(1), encode_model(np.zeros(DIM - 1, np.float32)), None,
     "wrong_shape"),
    (peer_name(1), peer_name(2), encode_model(np.zeros(DIM, np.float32)), None, "identity"),
    (peer_name(3), peer_name(3), encode_model(np.zeros(DIM, np.float32)), None,
     "not_neighbour"),
    ("mallory", "mallory", encode_model(np.zeros(DIM, np.float32)), None, "not_neighbour"),
    (peer_name(1), peer_name(1), encode_model(np.zeros(DIM, np.float32)), 10**9, "too_large"),
])
def test_a_peer_sending_garbage_is_refused_with_a_reason(peer0, who, claims, payload, size,
                                                         reason):
    node = peer0["node"]
    payload = _nan_model() if payload == "nan" else payload
    answer, data = _exchange(peer0["stub"](peer0["certs"][who]), claims, 0, payload, size=size)
    assert (answer.accepted, answer.reason) == (False, reason)
    assert answer.detail and data == b""  # says why; leaks no model
    assert node.stats.refused[reason] == 1
    assert node.missing() == (1, 5) and node.step == 0  # nothing changed


def test_a_valid_offer_is_taken_and_answered_with_the_peers_model(peer0):
    answer, data = _exchange(peer0["stub"](peer0["certs"][peer_name(1)]), peer_name(1), 0,
                             encode_model(np.ones(DIM, np.float32)))
    assert answer.accepted and answer.sender == peer_name(0) and answer.step == 0
    from shoal.codec import from_bytes

    assert np.array_equal(from_bytes(data, max_elements=DIM), peer0["own"])
    assert peer0["node"].missing() == (5,)


@pytest.mark.parametrize("cert", [None, "rogue"])
def test_callers_without_a_certificate_of_the_network_fail_the_handshake(peer0, cert):
    stub = peer0["stub"](None if cert is None else peer0["rogue"])
    with pytest.raises(grpc.RpcError) as err:
        _exchange(stub, peer_name(1), 0, encode_model(np.ones(DIM, np.float32)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert peer0["node"].missing() == (1, 5)


def test_links_find_a_peer_that_moved_to_another_port(peer0, tmp_path):
    where = {"address": "localhost:1"}  # nothing listens there
    certs = peer0["certs"][peer_name(1)]
    links = PeerLinks([peer_name(i) for i in range(6)], lambda i: where["address"],
                      root_certificates=peer0["ca"],
                      client_cert=(certs.cert.read_bytes(), certs.key.read_bytes()),
                      timeout_s=5)
    offer = Offer(1, 0, np.ones(DIM, np.float32))
    assert links.exchange(peer_name(1), 0, offer) is None
    where["address"] = f"localhost:{peer0['port']}"
    answer = links.exchange(peer_name(1), 0, offer)
    assert answer is not None and answer.accepted and answer.params is not None
    assert links.traffic.failed_calls == 1
    links.close()


# -- networks of peer processes ------------------------------------------------------------

def _network(tmp_path, n=6, **overrides) -> PeerFiles:
    cfg = load_config(None, {
        "data.clients": n, "sampling.per_round": 1, "model.name": "logreg",
        "gossip.local_training": False, "gossip.init": "independent",
        "gossip.step_timeout_s": 10.0, **overrides})
    return prepare_network(tmp_path / "net", cfg, n)


def _start(files, i, *extra):
    home = files.peer_dir(peer_name(i))
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "log", "a")
    return subprocess.Popen(peer_command(files, i, *extra), stdout=log,
                            stderr=subprocess.STDOUT)


def _wait(procs, timeout=120):
    return [p.wait(timeout=timeout) for p in procs]


def _traces(files, n, dim):
    return [dict(read_trace(files.peer_dir(peer_name(i)) / "trace.shc", dim))
            for i in range(n)]


def _start_models(files, n):
    cfg = load_config(files.config)
    return initial_models(cfg, 784, 10, list(range(n))).astype(np.float32), cfg


def _simulated(x0, steps):
    sim = GossipSimulator(StaticSchedule(metropolis_hastings(ring(len(x0)))), x0)
    out = [x0]
    for _ in range(steps):
        sim.run_step()
        out.append(sim.params.copy())
    return out


@pytest.mark.slow
def test_six_processes_decay_as_simulated_survive_a_kill_and_take_the_peer_back(tmp_path):
    files = _network(tmp_path, rounds=150, **{"gossip.min_step_s": 0.1})
    procs = [_start(files, i, "--trace", *(["--die-at-step", "20"] if i == 3 else []))
             for i in range(6)]
    assert procs[3].wait(timeout=120) == -9  # SIGKILL, right after mixing step 20
    x0, _ = _start_models(files, 6)
    dim = x0.shape[1]
    survivors = [0, 1, 2, 4, 5]
    # let the five others go on without it, then bring it back from its checkpoint
    deadline = time.monotonic() + 60
    while min(len(read_trace(files.peer_dir(peer_name(i)) / "trace.shc", dim))
              for i in survivors) < 40:
        assert time.monotonic() < deadline, "the survivors stalled"
        time.sleep(0.2)
    procs[3] = _start(files, 3, "--trace")
    assert _wait(procs) == [0] * 6
    traces = _traces(files, 6, dim)

    # up to the kill: the very models of the simulator, so the same consensus decay
    simulated = _simulated(x0, 21)
    deployed = [x0] + [np.stack([traces[i][t] for i in range(6)]) for t in range(21)]
    for got, want in zip(deployed, simulated):
        assert np.abs(got - want).max() < 1e-6
    decay = [consensus_distance(m) for m in deployed]
    assert (decay[20] / decay[5]) ** (1 / 15) == pytest.approx(2 / 3, rel=0.01)  # lambda2

    # without peer 3 the others mix exactly as the simulator with peer 3 down (a path of
    # five, each of 3's neighbours keeping its weight), until 3 is back: it jumps to the
    # step of its furthest neighbour, and a survivor more than one step behind that (the
    # path's ends drift apart by a few steps) jumps too, skipping a few steps
    rejoined = min(s for s in traces[3] if s > 20)  # the first step mixed after the restart
    assert not set(range(21, rejoined)) & traces[3].keys()
    skipped = min([rejoined] + [s for i in survivors for s in range(21, 150)
                                if s not in traces[i]])
    assert skipped > 38  # it was restarted once every survivor had mixed step 39
    sim = GossipSimulator(StaticSchedule(metropolis_hastings(ring(6))), deployed[21])
    sim.set_down([3])
    for t in range(21, skipped):
        sim.run_step()
        got = np.stack([traces[i][t] for i in survivors])
        assert np.abs(got - sim.params[survivors]).max() < 1e-6
    # converging: by at least the path's lambda2 per step, their average kept
    path = sim.effective(21).to_dense()[np.ix_(survivors, survivors)]
    lam = np.sort(np.abs(np.linalg.eigvalsh(path)))[-2]  # 1/3 + 2/3 cos(pi/5) = 0.873
    start, end = deployed[21][survivors], sim.params[survivors]
    assert consensus_distance(end) <= lam ** (skipped - 21) * consensus_distance(start) + 1e-7
    assert np.abs(end.mean(0) - start.mean(0)).max() < 1e-6

    # peer 3 resumed from its checkpoint, caught up with the others' step, and rejoined
    stats = json.loads((files.peer_dir(peer_name(3)) / "stats.json").read_text())
    assert stats["resumed_at"] == 21 and stats["jumps"] >= 1
    final = consensus_distance(np.stack([traces[i][149] for i in range(6)]))
    assert final < 1e-4 * consensus_distance(x0)


def test_a_trimmed_mean_contains_a_byzantine_peer_over_grpc(tmp_path):
    """Six peers on real gRPC sockets with mutual TLS, in threads of this process; peer 0
    offers every model plus 1000."""
    n = 6
    names = [peer_name(i) for i in range(n)]
    pki = make_local_pki(tmp_path / "pki", days=1, now=NOW)
    for name in names:
        make_client_cert(tmp_path / "pki", name=name, ca_cert=pki.ca_cert, ca_key=pki.ca_key,
                         days=1, now=NOW)
    from shoal.gossip.mixing import StaticSchedule as Static
    from shoal.gossip.rules import TrimmedMean
    from shoal.gossip.topology import complete
    from shoal.transport.gossip_peer import GossipPeer, PeerTLS

    sched = Static(metropolis_hastings(complete(n)))
    x0 = np.random.default_rng(0).uniform(-1, 1, size=(n, 50)).astype(np.float32)
    ports: dict[int, str] = {}
    peers = [GossipPeer(GossipNode(i, sched, x0[i], rule=TrimmedMean(1), step_timeout_s=20),
                        names, ports.get, tls=PeerTLS.from_dir(tmp_path / "pki", names[i]),
                        tamper=(lambda p: p + np.float32(1000)) if i == 0 else None)
             for i in range(n)]
    for i, peer in enumerate(peers):
        ports[i] = f"localhost:{peer.start()}"
    threads = [threading.Thread(target=peer.run, args=(15,)) for peer in peers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert all(p.node.step == 15 for p in peers)
        honest = np.stack([p.node.params for p in peers[1:]])
        lo, hi = x0[1:].min(axis=0), x0[1:].max(axis=0)
        assert (honest >= lo - 1e-6).all() and (honest <= hi + 1e-6).all()
        assert consensus_distance(honest) < 1e-3 * consensus_distance(x0[1:])
        assert all(p.traffic.failed_calls == 0 for p in peers)
    finally:
        for peer in peers:
            peer.close()


@pytest.mark.slow
def test_launch_gossip_reports_the_network_and_ends_where_the_simulator_does(tmp_path, capsys):
    work = tmp_path / "l"
    code = main(["launch", "--gossip", "6", "--rounds", "20", "--dir", str(work), "--json",
                 "-q", "--set", 'model.name="logreg"', "--set", "gossip.local_training=false",
                 "--set", 'gossip.init="independent"'])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "deployment" and summary["exit_codes"] == [0] * 6
    assert summary["steps_reached"] == [20] * 6
    files = PeerFiles(work, work / "config.toml", work / "certs")
    x0, _ = _start_models(files, 6)
    want = _simulated(x0, 20)[-1]
    got = np.stack([load_state(files.peer_dir(peer_name(i)) / "state.shc", x0.shape[1])[1]
                    for i in range(6)])
    assert np.abs(got - want).max() < 1e-6
    assert summary["final_consensus"] == pytest.approx(consensus_distance(want), rel=1e-3)
    # push-pull: one model to each of the 2 neighbours per step
    wire = len(encode_model(x0[0]))
    assert summary["bytes_sent_per_peer_per_step"] == pytest.approx(2 * wire, rel=0.1)
    assert math.isfinite(summary["accuracy_average"])
