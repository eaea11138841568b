"""The baseline `bench_load.py` compares shoal's aggregator with: a bare `grpc.aio` server.

It speaks the same protocol to the same load generator over the same TLS, and does only what
any aggregator must: hand every device a task once per round, stream the model down in 256 KiB
chunks (a device that already reported is told to come back in 1 s, as `bench_load.py`'s
`deploy.checkin_interval_s` tells shoal's), read the uploaded chunks into one buffer, parse shoal's payload framing (the load
generator sends shoal's wire format: `shoal.codec.from_bytes`, a CRC and a float32 view for an
uncompressed update) and `np.add` it into the round's sum; once
every device has uploaded, the sum becomes the next model (divided by the count) and the next
round opens. No authentication, registry, validation, idempotency, decoding, checkpoint or
evaluation: it is the ceiling an aggregator's own work is measured against.

    python benchmarks/bare_aggregator.py --port-file F --certs DIR --devices N --rounds R

Writes the bound port to ``--port-file`` when it serves, exits when the rounds are done and
prints one JSON line (rounds, uploads, the model's checksum).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

DIM = 199_210
CHUNK = 256 << 10  # shoal's default download chunk (AggregatorSettings.chunk_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port-file", type=Path, required=True)
    ap.add_argument("--certs", type=Path, required=True)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import grpc

    from shoal.codec import from_bytes
    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.proto import shoal_pb2_grpc as pb_grpc

    class Bare(pb_grpc.AggregatorServicer):
        def __init__(self) -> None:
            self.model = np.zeros(DIM, np.float32)
            self.blob = self.model.tobytes()
            self.sum = np.zeros(DIM, np.float32)
            self.round, self.count = 1, 0
            self.reported: set[str] = set()
            self.done = asyncio.Event()

        async def Hello(self, request, context):
            return pb.HelloReply(server_id="bare", model_version=self.round - 1,
                                 server_time=time.time())

        async def CheckIn(self, request, context):
            if self.done.is_set() or request.device_id in self.reported:
                return pb.CheckInReply(come_back=pb.ComeBack(at=time.time() + 1.0,
                                                             reason="already_reported"))
            return pb.CheckInReply(task=pb.Task(round=self.round,
                                                model_version=self.round - 1,
                                                upload_key="k", kind="train"))

        async def Download(self, request, context):
            blob = self.blob
            for off in range(0, len(blob), CHUNK):
                yield pb.ModelChunk(version=request.version, total_size=len(blob),
                                    offset=off, data=blob[off:off + CHUNK])

        async def Upload(self, request_iterator, context):
            header, buf = None, bytearray()
            async for chunk in request_iterator:
                if chunk.WhichOneof("part") == "header":
                    header = chunk.header
                else:
                    buf += chunk.data
            if header is None or header.round != self.round:
                return pb.UploadReply(accepted=False, reason="late")
            np.add(self.sum, from_bytes(buf, max_elements=DIM), out=self.sum)
            self.reported.add(header.device_id)
            self.count += 1
            if self.count == args.devices:
                self.model = self.sum / np.float32(self.count)
                self.blob = self.model.tobytes()
                self.sum[:] = 0
                self.count = 0
                self.reported.clear()
                if self.round == args.rounds:
                    self.done.set()
                self.round += 1
            return pb.UploadReply(accepted=True)

    async def serve() -> dict:
        service = Bare()
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 << 20)])
        pb_grpc.add_AggregatorServicer_to_server(service, server)
        creds = grpc.ssl_server_credentials([((args.certs / "server.key").read_bytes(),
                                              (args.certs / "server.pem").read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        args.port_file.write_text(str(port))
        await service.done.wait()
        await server.stop(grace=1.0)
        return {"rounds": args.rounds, "uploads": args.rounds * args.devices,
                "model_sum": float(service.model.sum(dtype=np.float64))}

    print(json.dumps(asyncio.run(serve())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
