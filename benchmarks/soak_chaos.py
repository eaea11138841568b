"""The soak's fault injectors (benchmarks/soak.py): a chaos TCP proxy between the devices
and the aggregator, and a raw-protocol device that corrupts and replays its uploads."""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
import threading
import time
from collections import Counter

import numpy as np


class ChaosProxy:
    """Forwards TCP from a local port to the aggregator; a ``fault_rate`` of connections get
    one fault: cut after a random number of bytes (a device killed mid-call), throttled to
    2 KiB/s (a slow upload), frozen for 20 s (a stalled one), or one byte flipped (TLS then
    refuses the record and the connection dies)."""

    def __init__(self, upstream_port: int, rng: random.Random, fault_rate: float) -> None:
        self.upstream, self.rng, self.fault_rate = upstream_port, rng, fault_rate
        self.port = 0
        self.faults: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-proxy")

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        """Close the listening socket, cancel every connection's pipes and wait for them
        (pipes left pending when the loop stops were reported as unraisable exceptions),
        then stop the loop."""
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:  # the aggregator is down: the device sees a failed connection
            writer.close()
            return
        fault = "none"
        if self.rng.random() < self.fault_rate:
            fault = self.rng.choice(["cut", "slow", "stall", "corrupt"])
        self.faults[fault] += 1
        budget = self.rng.randint(200, 20000)
        await asyncio.gather(self._pipe(reader, up_w, fault, budget),
                             self._pipe(up_r, writer, fault if fault == "cut" else "none",
                                        budget), return_exceptions=True)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, fault: str,
                    budget: int) -> None:
        sent = 0
        try:
            while True:
                data = await src.read(4096)
                if not data:
                    break
                if fault == "cut" and sent + len(data) > budget:
                    break
                if fault == "corrupt" and sent <= budget < sent + len(data):
                    i = budget - sent
                    data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]
                if fault == "stall" and sent <= budget < sent + len(data):
                    await asyncio.sleep(20)
                if fault == "slow":
                    await asyncio.sleep(len(data) / 2048)
                dst.write(data)
                await dst.drain()
                sent += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


def raw_device(i: int, target: str, token: str, ca: bytes, dim: int, acks, stop, rng,
               events: list) -> None:
    """A device speaking the gRPC protocol directly: per task it uploads its payload with a
    bit flipped (the codec frame's CRC-32 refuses it) and one that is not the codec format
    (both must be refused), then its
    update ``e_i``, then replays it with the same idempotency key and with a fresh one (both
    answered like the first; the soak's model oracle checks it was counted once). Records its accepted uploads in ``acks`` and each
    task whose every answer was as expected as a ``raw_ok`` event."""
    import grpc

    from shoal.codec import Chain, to_bytes
    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.proto import shoal_pb2_grpc as pb_grpc

    name = f"device-{i:04d}"
    meta = (("authorization", f"Bearer {token}"),)
    delta = np.zeros(dim, np.float32)
    delta[i] = 1.0
    good = to_bytes(Chain([]).encode(delta, np.random.default_rng(0)))

    def upload(stub, task, payload, key, sha=None):
        header = pb.UploadHeader(device_id=name, round=task.round,
                                 base_version=task.model_version, upload_key=task.upload_key,
                                 idempotency_key=key, num_examples=1, total_size=len(payload),
                                 sha256=sha or hashlib.sha256(payload).digest())
        chunks = [pb.UploadChunk(header=header), pb.UploadChunk(data=payload)]
        return stub.Upload(iter(chunks), timeout=10, metadata=meta)

    while not stop.is_set():
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))
        stub = pb_grpc.AggregatorStub(channel)
        try:
            stub.Hello(pb.HelloRequest(device_id=name, runtime_version="soak-raw/1"),
                       timeout=10, metadata=meta)
            while not stop.is_set():
                reply = stub.CheckIn(pb.CheckInRequest(device_id=name), timeout=10,
                                     metadata=meta)
                if reply.WhichOneof("reply") != "task" or reply.task.kind != "train":
                    stop.wait(rng.uniform(0.5, 2.0))
                    continue
                task = reply.task
                for _ in stub.Download(pb.DownloadRequest(version=task.model_version),
                                       timeout=10, metadata=meta):
                    pass
                flipped = bytearray(good)
                flipped[len(good) // 2] ^= 0x01
                damaged = upload(stub, task, bytes(flipped), secrets.token_hex(16))
                garbage = upload(stub, task, secrets.token_bytes(len(good)),
                                 secrets.token_hex(16))
                key = secrets.token_hex(16)
                first = upload(stub, task, good, key)
                if first.accepted:
                    acks.add(name, int(task.round))
                again = upload(stub, task, good, key)
                fresh = upload(stub, task, good, secrets.token_hex(16))
                # a replay of the task's upload, whatever its idempotency key, is answered
                # like the first (the task's session de-duplicates); the model shows it was
                # counted once
                ok = (not damaged.accepted and not garbage.accepted
                      and again.accepted == first.accepted == fresh.accepted)
                events.append({"t": time.time(), "event": "raw_ok" if ok else "raw_unexpected",
                               "device": name, "round": int(task.round),
                               "answers": [damaged.reason, garbage.reason, first.reason,
                                           again.reason, fresh.reason]})
        except grpc.RpcError:
            stop.wait(rng.uniform(0.5, 2.0))  # the aggregator restarted, or the proxy cut
        finally:
            channel.close()
