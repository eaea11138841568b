"""transport/chunks.py: a data chunk read as a view answers exactly as the protobuf parser
(the oracle) does, for every message shape a caller could send."""

import os

import pytest
from google.protobuf.message import DecodeError

from shoal.transport.chunks import DataChunk, data_chunks
from shoal.transport.proto import shoal_pb2 as pb

PARSERS = [(pb.UploadChunk, data_chunks(pb.UploadChunk.FromString)),
           (pb.SecAggChunk, data_chunks(pb.SecAggChunk.FromString))]


def _same(kind, parse, raw):
    try:
        ref = kind.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse(raw)
        return None
    got = parse(raw)
    assert got.WhichOneof("part") == ref.WhichOneof("part")
    if isinstance(got, DataChunk):  # the bytes received (the parser's re-encoded size
        assert got.ByteSize() == len(raw)  # differs only for a non-minimal length varint)
    if ref.WhichOneof("part") == "data":
        assert bytes(got.data) == ref.data
    return got


@pytest.mark.parametrize("kind,parse", PARSERS)
@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 65536, 262144, (1 << 21) + 3])
def test_a_data_chunk_is_a_view_of_its_bytes(kind, parse, n):
    raw = kind(data=os.urandom(n)).SerializeToString()
    got = _same(kind, parse, raw)
    assert isinstance(got, DataChunk) and got.data.obj is raw  # no copy


@pytest.mark.parametrize("kind,parse", PARSERS)
def test_anything_else_is_parsed_as_before(kind, parse):
    header = kind(header=kind.DESCRIPTOR.fields_by_name["header"].message_type._concrete_class(
        device_id="dev-a")).SerializeToString()
    data = kind(data=b"abc").SerializeToString()
    cases = {
        "header": header,
        "two data fields (the last wins)": data + kind(data=b"xy").SerializeToString(),
        "data then header": data + header,
        "header then data": header + data,
        "length past the end": b"\x12\x05abc",
        "length short of the end": b"\x12\x02abc",
        "truncated varint": b"\x12\x80",
        "non-minimal varint": b"\x12\x83\x00abc",
        "over-long varint": b"\x12" + b"\x80" * 9 + b"\x00",
        "unknown field": data + b"\x18\x01",
        "empty message": b"",
        "wrong wire type for field 2": b"\x10\x05",
    }
    views = {name for name, raw in cases.items()
             if isinstance(_same(kind, parse, raw), DataChunk)}
    assert views == {"non-minimal varint"}  # the rest parsed (or refused) by protobuf


def test_random_bytes_agree_with_the_parser():
    rng = __import__("random").Random(7)
    kind, parse = PARSERS[0]
    for _ in range(3000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        if rng.random() < 0.5:
            raw = b"\x12" + raw
        _same(kind, parse, raw)
