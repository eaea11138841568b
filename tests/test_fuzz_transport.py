"""Fuzzing what the transport decodes from the network: uploads (the aggregator's decode),
chunked model downloads (the device's reassembly and decode), and secure-aggregation
messages both ways (plus the masked input's ring unpacking). Any input gives a result or a
ShoalError -- never another exception, a hang or an allocation beyond the bound."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import fuzz_targets as ft

SETTINGS = ft.fuzz_settings()


@SETTINGS
@given(ft.mutated_payloads())
def test_uploads(data):
    ft.upload(data)


@SETTINGS
@given(st.binary(max_size=2000))
def test_download_streams(data):
    ft.download_stream(data)


def _replies():
    """Well-formed SecAggReply protobufs with arbitrary field values."""
    from shoal.transport.proto import shoal_pb2 as pb

    u64 = st.integers(0, 2**64 - 1)
    u32 = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1))
    ids = st.lists(u64, max_size=6)
    blobs = st.dictionaries(u64, st.binary(max_size=40), max_size=4)
    setup = st.builds(lambda r, n, t, b, l, c, v, w, clip: pb.SecAggReply(
        setup=pb.SecAggSetup(session=b"s" * 16, roster=r, graph_seed=b"g", neighbours=n,
                             threshold=t, bits=b, length=l, client_id=c, clip=clip,
                             value_bits=v, max_weight=w)),
        ids, u32, u32, u32, st.one_of(st.integers(0, 200), u64), u64, u32,
        st.one_of(st.integers(0, 5000), u64),
        st.floats(allow_nan=True, allow_infinity=True))
    keys = st.builds(lambda d: pb.SecAggReply(key_directory=pb.SecAggKeyDirectory(
        session=b"s", keys={k: pb.SecAggKeys(enc_public=v, mask_public=v)
                            for k, v in d.items()})), blobs)
    shares = st.builds(lambda d: pb.SecAggReply(share_delivery=pb.SecAggShares(
        session=b"s", ciphertexts=d)), blobs)
    unmask = st.builds(lambda a, b: pb.SecAggReply(unmask_request=pb.SecAggUnmaskRequest(
        session=b"s", survivors=a, dropped=b)), ids, ids)
    return st.one_of(setup, keys, shares, unmask).map(lambda m: m.SerializeToString())


@SETTINGS
@given(st.one_of(_replies(), st.binary(max_size=400)))
def test_secagg_replies(data):
    ft.secagg_reply(data)


def _headers():
    from shoal.transport.proto import shoal_pb2 as pb

    u64 = st.integers(0, 2**64 - 1)
    blobs = st.dictionaries(u64, st.binary(max_size=40), max_size=4)
    bodies = st.one_of(
        st.builds(lambda: pb.SecAggHeader(poll=True)),
        st.builds(lambda a, b: pb.SecAggHeader(keys=pb.SecAggKeys(enc_public=a,
                                                                   mask_public=b)),
                  st.binary(max_size=70), st.binary(max_size=70)),
        st.builds(lambda d: pb.SecAggHeader(shares=pb.SecAggShares(session=b"x",
                                                                   ciphertexts=d)), blobs),
        st.builds(lambda n: pb.SecAggHeader(masked=pb.SecAggMaskedHeader(
            session=b"x", total_size=n, sha256=b"h")), u64),
        st.builds(lambda a, b: pb.SecAggHeader(unmasking=pb.SecAggUnmasking(
            session=b"x", self_mask_shares=a, mask_key_shares=b)), blobs, blobs),
        st.builds(pb.SecAggHeader),
    )
    return st.tuples(st.integers(0, 255), bodies).map(
        lambda t: bytes([t[0]]) + t[1].SerializeToString())


@SETTINGS
@given(st.one_of(_headers(), st.binary(max_size=1200)))
def test_secagg_headers_and_masked_inputs(data):
    ft.secagg_header(data)
