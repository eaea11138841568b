"""A deployed gossip peer: a :class:`~shoal.gossip.node.GossipNode` behind gRPC, mutual TLS.

Every peer serves :class:`GossipService` (``gossip.proto``) and calls its neighbours through
:class:`PeerLinks`; :class:`GossipPeer` runs the steps: train, offer (push-pull to every
neighbour in parallel), wait until the node may mix, mix, checkpoint. The node decides
everything protocol-related (what to send, whom to wait for, when a neighbour is down, what
to refuse); this module moves bytes and keeps time.

Identity: with mutual TLS a caller is the peer its client certificate names (common name
``peer-0003``, from :func:`~shoal.transport.certs.make_client_cert`); an offer claiming
another sender is refused as ``identity``. Every peer on a host serves with the host's server
certificate (:func:`~shoal.transport.certs.make_local_pki`), so a caller authenticates the
host it dialled, not the process: the pulled model is as trustworthy as the host.

What a caller sends is checked before the node sees it: the declared size against the model's
(``too_large``, before any data is read), the payload in shoal's wire format (``malformed``,
``non_finite``); the node then checks the rest (``wrong_shape``, ``not_neighbour``, ``stale``,
``ahead``, ``conflict``). Every refusal travels back in the answer, with its reason.

Churn: a call that fails (the neighbour's process is gone: connection refused) is reported
to the node, which retries it and then passes the neighbour over; neighbours that left say so
(``Leave``); a restarted peer resumes from its checkpoint and catches up with its neighbours'
step (the node's jump). Addresses are resolved on every (re)connection, so a neighbour that
comes back on another port is found again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np

from shoal.codec import Chain, from_bytes, to_bytes
from shoal.errors import CodecError, ConfigError
from shoal.gossip.node import Answer, GossipNode, Leave, MixResult, Offer, Send
from shoal.transport.certs import client_identity
from shoal.transport.channel import backoff_delay, make_channel
from shoal.transport.proto import gossip_pb2 as pb
from shoal.transport.proto import gossip_pb2_grpc as pb_grpc

__all__ = ["peer_name", "GossipService", "serve_peer", "PeerLinks", "PeerTLS", "GossipPeer",
           "PeerTraffic", "encode_model"]

CHUNK_BYTES = 1 << 20
_SLACK = 4096  # wire header and descriptor room above 4 bytes per parameter


def peer_name(index: int) -> str:
    """The name (certificate common name) of peer ``index``: ``peer-0003``."""
    return f"peer-{index:04d}"


def encode_model(params: np.ndarray) -> bytes:
    """A model in shoal's wire format (raw float32, CRC-checked)."""
    return to_bytes(Chain([]).encode(np.asarray(params, np.float32),
                                     np.random.default_rng(0)))


def _chunks(payload: bytes) -> Iterator[bytes]:
    for start in range(0, len(payload), CHUNK_BYTES):
        yield payload[start:start + CHUNK_BYTES]


@dataclass
class PeerTraffic:
    """Bytes of model payloads a peer sent and received, and the calls that failed."""

    bytes_sent: int = 0
    bytes_received: int = 0
    failed_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: int = 0, received: int = 0, failed: int = 0) -> None:
        with self.lock:
            self.bytes_sent += sent
            self.bytes_received += received
            self.failed_calls += failed


class GossipService(pb_grpc.GossipPeerServicer):
    """The server side of one peer.

    Args:
        node: the peer's node (shared with :class:`GossipPeer`; guarded by ``cond``).
        cond: the lock (a condition, notified after every change) around the node.
        names: every peer's name, by index.
        clock: seconds, for the node's deadlines.
        mutual_tls: callers are who their certificate says; off only for plaintext tests,
            where the claimed sender is believed.
        tamper: applied to every model this peer sends (a Byzantine peer, for tests).
        traffic: where bytes are counted.
    """

    def __init__(self, node: GossipNode, cond: threading.Condition, names: Sequence[str], *,
                 clock: Callable[[], float] = time.monotonic, mutual_tls: bool = True,
                 tamper: Callable[[np.ndarray], np.ndarray] | None = None,
                 traffic: PeerTraffic | None = None) -> None:
        self.node, self.cond = node, cond
        self.index = {name: i for i, name in enumerate(names)}
        self.names = list(names)
        self.clock, self.mutual_tls, self.tamper = clock, mutual_tls, tamper
        self.traffic = traffic if traffic is not None else PeerTraffic()
        self.max_payload = 4 * node.dim + _SLACK

    def outgoing(self, params: np.ndarray) -> bytes:
        return encode_model(self.tamper(params) if self.tamper else params)

    def _caller(self, context: Any, claimed: str) -> tuple[int | None, str]:
        """The caller's peer index, or ``None`` and why not."""
        if not self.mutual_tls:
            return self.index.get(claimed), "not_neighbour"
        pems = (context.auth_context() or {}).get("x509_pem_cert") or [b""]
        certified = client_identity(pems[0]) if pems[0] else None
        if certified != claimed:
            return None, "identity"
        return self.index.get(certified), "not_neighbour"

    def _answer(self, answer: Answer) -> Iterator[pb.ExchangeChunk]:
        payload = self.outgoing(answer.params) if answer.params is not None else b""
        self.traffic.add(sent=len(payload))
        yield pb.ExchangeChunk(answer=pb.AnswerHeader(
            sender=self.names[self.node.peer], accepted=answer.accepted, reason=answer.reason,
            detail=answer.detail, step=answer.step, offered_step=max(answer.offered_step, 0),
            payload_size=len(payload)))
        for part in _chunks(payload):
            yield pb.ExchangeChunk(data=part)

    def _refuse(self, reason: str, detail: str, step: int = 0) -> Iterator[pb.ExchangeChunk]:
        with self.cond:
            self.node.stats.refused[reason] += 1
            current = self.node.step
        return self._answer(Answer(self.node.peer, current, step, False, reason, detail))

    def Exchange(self, request_iterator: Iterator[pb.ExchangeChunk], context: Any
                 ) -> Iterator[pb.ExchangeChunk]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "offer":
            yield from self._refuse("malformed", "an exchange starts with an offer header")
            return
        head = first.offer
        sender, why = self._caller(context, head.sender)
        if sender is None:
            detail = (f"the client certificate does not name {head.sender!r}"
                      if why == "identity" else f"{head.sender!r} is not a peer of this network")
            yield from self._refuse(why, detail, head.step)
            return
        if head.payload_size > self.max_payload:
            yield from self._refuse("too_large", f"{head.payload_size} bytes declared, a model "
                                                 f"is at most {self.max_payload}", head.step)
            return
        data = bytearray()
        for chunk in request_iterator:
            if chunk.WhichOneof("part") != "data" or \
                    len(data) + len(chunk.data) > head.payload_size:
                yield from self._refuse("malformed", "chunks do not match the declared size",
                                        head.step)
                return
            data += chunk.data
        self.traffic.add(received=len(data))
        try:
            params = from_bytes(bytes(data), max_elements=self.node.dim)
        except CodecError as exc:
            yield from self._refuse(exc.reason, str(exc), head.step)
            return
        with self.cond:
            answer = self.node.handle(Offer(sender, int(head.step), params,
                                            bool(head.wants_model)), self.clock())
            self.cond.notify_all()
        assert answer is not None
        yield from self._answer(answer)

    def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveReply:
        sender, _ = self._caller(context, request.sender)
        if sender is not None:
            with self.cond:
                self.node.handle(Leave(sender), self.clock())
                self.cond.notify_all()
        return pb.LeaveReply()


def serve_peer(service: GossipService, host: str = "127.0.0.1", port: int = 0, *,
               tls: tuple[bytes, bytes] | None = None, client_ca: bytes | None = None,
               workers: int = 16) -> tuple[int, Callable[[], None]]:
    """Start ``service`` on a gRPC server (a thread pool of ``workers``).

    Args:
        tls: ``(certificate chain PEM, key PEM)``; ``None`` serves plaintext (loopback tests).
        client_ca: the CA that signs peers' client certificates: mutual TLS, a connection
            without one of its certificates fails the handshake. Needs ``tls``.

    Returns:
        ``(port, stop)``.

    Raises:
        ConfigError: ``client_ca`` without ``tls``, or ``host:port`` cannot be bound.
    """
    if client_ca is not None and tls is None:
        raise ConfigError("mutual TLS needs the peer's server certificate and key", key="tls")
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gossip"),
                         options=[("grpc.max_receive_message_length", 4 << 20),
                                  ("grpc.max_send_message_length", 4 << 20)])
    pb_grpc.add_GossipPeerServicer_to_server(service, server)
    address = f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])], root_certificates=client_ca,
                                                require_client_auth=client_ca is not None)
            bound = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise ConfigError(f"could not bind the peer to {address}: {exc}", key="port") from exc
    server.start()
    return bound, lambda: server.stop(grace=1.0).wait(5)


class PeerLinks:
    """Calls to the neighbours.

    Args:
        names: every peer's name, by index.
        resolve: ``index -> "host:port"`` or ``None`` (not known yet), asked on every
            (re)connection.
        root_certificates: the CA of the peers' server certificates (``None``: plaintext).
        client_cert: ``(chain PEM, key PEM)`` of this peer's client certificate.
        timeout_s: longest exchange.
    """

    def __init__(self, names: Sequence[str], resolve: Callable[[int], str | None], *,
                 root_certificates: bytes | None = None,
                 client_cert: tuple[bytes, bytes] | None = None, timeout_s: float = 10.0,
                 tamper: Callable[[np.ndarray], np.ndarray] | None = None,
                 traffic: PeerTraffic | None = None) -> None:
        self.names, self.resolve = list(names), resolve
        self.root, self.cert, self.timeout_s, self.tamper = (root_certificates, client_cert,
                                                             timeout_s, tamper)
        self.traffic = traffic if traffic is not None else PeerTraffic()
        self._channels: dict[int, tuple[str, grpc.Channel]] = {}
        self._lock = threading.Lock()

    def _stub(self, to: int) -> pb_grpc.GossipPeerStub | None:
        address = self.resolve(to)
        if address is None:
            return None
        with self._lock:
            held = self._channels.get(to)
            if held is None or held[0] != address:
                if held is not None:
                    held[1].close()
                held = (address, make_channel(address, self.root, self.cert))
                self._channels[to] = held
        return pb_grpc.GossipPeerStub(held[1])

    def exchange(self, sender: str, to: int, offer: Offer) -> Answer | None:
        """Push ``offer`` to peer ``to``; its answer, or ``None`` if the call failed."""
        stub = self._stub(to)
        if stub is None:
            self.traffic.add(failed=1)
            return None
        params = self.tamper(offer.params) if self.tamper else offer.params
        payload = encode_model(params)
        head = pb.ExchangeChunk(offer=pb.OfferHeader(sender=sender, step=offer.step,
                                                     payload_size=len(payload),
                                                     wants_model=offer.wants))
        try:
            replies = stub.Exchange(iter([head, *(pb.ExchangeChunk(data=c)
                                                  for c in _chunks(payload))]),
                                    timeout=self.timeout_s)
            first = next(replies)
            data = b"".join(c.data for c in replies)
        except (grpc.RpcError, StopIteration):
            self.traffic.add(failed=1)
            return None
        self.traffic.add(sent=len(payload), received=len(data))
        a = first.answer
        if first.WhichOneof("part") != "answer" or a.sender != self.names[to] \
                or len(data) != a.payload_size:
            self.traffic.add(failed=1)
            return None
        model = None
        if data:
            try:
                model = from_bytes(data, max_elements=len(offer.params))
            except CodecError:
                model = None  # the node counts what it cannot use
        return Answer(to, int(a.step), int(a.offered_step), a.accepted, a.reason, a.detail,
                      model)

    def leave(self, sender: str, to: int) -> None:
        stub = self._stub(to)
        if stub is not None:
            try:
                stub.Leave(pb.LeaveRequest(sender=sender), timeout=self.timeout_s)
            except grpc.RpcError:
                pass  # gone already: nothing to tell

    def close(self) -> None:
        with self._lock:
            for _, channel in self._channels.values():
                channel.close()
            self._channels.clear()


@dataclass(frozen=True)
class PeerTLS:
    """A peer's credentials: the host's server certificate, the network's CA (which signed
    it and every peer's client certificate), and the peer's own client certificate."""

    server_cert: bytes
    server_key: bytes
    ca: bytes
    client_cert: bytes
    client_key: bytes

    @classmethod
    def from_dir(cls, certs: Path, name: str) -> PeerTLS:
        """From the files :func:`~shoal.transport.certs.make_local_pki` and
        :func:`~shoal.transport.certs.make_client_cert` write (``ca.pem``, ``server.pem``,
        ``server.key``, ``client-NAME.pem``, ``client-NAME.key``)."""
        def read(f: str) -> bytes:
            return (certs / f).read_bytes()

        return cls(read("server.pem"), read("server.key"), read("ca.pem"),
                   read(f"client-{name}.pem"), read(f"client-{name}.key"))


class GossipPeer:
    """One deployed peer: its node served over gRPC, calls to its neighbours, its steps
    (train, offer, wait, mix).

    Args:
        node: the peer's node.
        names: every peer's name, by index (:func:`peer_name`).
        resolve: ``index -> "host:port"`` of a peer, or ``None`` (not known yet).
        tls: mutual TLS credentials; ``None`` serves and calls in plaintext (loopback
            tests only).
        train: ``train(params, step) -> trained params`` (``None``: pure averaging).
        clock: seconds (the node's deadlines, the pacing).
        on_mix: called with each :class:`~shoal.gossip.node.MixResult` (checkpoint, trace).
        min_step_s: each step lasts at least this long.
        tamper: applied to every model this peer sends (fault injection: a Byzantine peer).
        timeout_s: longest call to a neighbour.
        rng: jitter of retry backoffs.
    """

    def __init__(self, node: GossipNode, names: Sequence[str],
                 resolve: Callable[[int], str | None], *, tls: PeerTLS | None,
                 train: Callable[[np.ndarray, int], np.ndarray] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_mix: Callable[[MixResult], None] | None = None,
                 min_step_s: float = 0.0,
                 tamper: Callable[[np.ndarray], np.ndarray] | None = None,
                 timeout_s: float = 10.0, rng: random.Random | None = None) -> None:
        self.node, self.train, self.tls = node, train, tls
        self.clock, self.on_mix, self.min_step_s = clock, on_mix, min_step_s
        self.name = names[node.peer]
        self.cond = threading.Condition()
        self.traffic = PeerTraffic()
        self.service = GossipService(node, self.cond, names, clock=clock,
                                     mutual_tls=tls is not None, tamper=tamper,
                                     traffic=self.traffic)
        self.links = PeerLinks(names, resolve, root_certificates=tls.ca if tls else None,
                               client_cert=(tls.client_cert, tls.client_key) if tls else None,
                               timeout_s=timeout_s, tamper=tamper, traffic=self.traffic)
        self.rng = rng if rng is not None else random.Random()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gossip-push")
        self._inflight = 0
        self._stop_server: Callable[[], None] | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve the node; returns the bound port.

        Raises:
            ConfigError: the address cannot be bound.
        """
        tls = self.tls
        port, self._stop_server = serve_peer(
            self.service, host, port,
            tls=(tls.server_cert, tls.server_key) if tls else None,
            client_ca=tls.ca if tls else None)
        return port

    def _dispatch(self, sends: list[Send]) -> None:
        with self.cond:
            self._inflight += len(sends)
        for send in sends:
            self._pool.submit(self._deliver, send, 0)

    def _deliver(self, send: Send, attempt: int) -> None:
        try:
            msg = send.message
            if isinstance(msg, Leave):
                self.links.leave(self.name, send.to)
                return
            answer = self.links.exchange(self.name, send.to, msg)
            with self.cond:
                if answer is not None:
                    self.node.answered(answer, self.clock())
                    retry: list[Send] = []
                else:
                    retry = self.node.delivery_failed(send.to, msg.step, self.clock())
                self.cond.notify_all()
            for again in retry:
                time.sleep(backoff_delay(attempt, self.rng, base_s=0.05, cap_s=1.0))
                with self.cond:
                    self._inflight += 1
                self._deliver(again, attempt + 1)
        finally:
            with self.cond:
                self._inflight -= 1
                self.cond.notify_all()

    def run(self, steps: int, stop: threading.Event | None = None) -> None:
        """Run until the node has mixed step ``steps - 1`` (or ``stop`` is set); wait for
        this peer's last pushes to land before returning."""
        stop = stop if stop is not None else threading.Event()
        while not stop.is_set():
            with self.cond:
                step, params = self.node.step, self.node.params.copy()
            if step >= steps:
                break
            started = self.clock()
            trained = self.train(params, step) if self.train is not None else params
            with self.cond:
                sends = self.node.offer(step, trained, self.clock())
            self._dispatch(sends)
            result = self._wait(step, stop)
            if result is not None and self.on_mix is not None:
                self.on_mix(result)
            rest = self.min_step_s - (self.clock() - started)
            if rest > 0:
                stop.wait(rest)
        with self.cond:
            self.cond.wait_for(lambda: self._inflight == 0, timeout=self.links.timeout_s * 4)

    def _wait(self, step: int, stop: threading.Event) -> MixResult | None:
        """Until the node may mix ``step`` (then mix), jumped ahead, or ``stop``."""
        while not stop.is_set():
            with self.cond:
                if self.node.step != step or not self.node.waiting:
                    return None  # jumped: train again at the new step
                if self.node.ready:
                    result = self.node.mix()
                    self.cond.notify_all()
                    return result
                probes = self.node.tick(self.clock())
                if not probes:
                    self.cond.wait(timeout=0.05)
            self._dispatch(probes)
        return None

    def leave(self) -> None:
        """Tell the neighbours this peer leaves, and wait for the calls."""
        with self.cond:
            sends = self.node.leave()
        self._dispatch(sends)
        with self.cond:
            self.cond.wait_for(lambda: self._inflight == 0, timeout=self.links.timeout_s)

    def close(self) -> None:
        """Stop calling and serving."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.links.close()
        if self._stop_server is not None:
            self._stop_server()
            self._stop_server = None
