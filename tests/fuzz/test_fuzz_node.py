"""Every vas.v1.Node RPC with hostile fields, over real gRPC to both agents.

Precise statuses only (fuzzkit.EXPECTED_CODES); after each test the daemons serve and
the canary is intact. ReleaseSegment aims at the victims only: freeing another
agent's segment without credentials is issue 10's authorization item, not input
checking.
"""
from __future__ import annotations

import grpc
import pytest
from hypothesis import given, strategies as st

import strategies as s
from fuzzkit import CALL_TIMEOUT, CANARY, CANARY_SIZE, VICTIMS, examples, expect_precise
from vas.proto import node_pb2, types_pb2


def _node(cluster, index: int):
    return cluster.nodes[index % len(cluster.nodes)]


@examples(60)
@given(data=st.data(), index=st.integers(0, 1))
def test_unary_rpcs(fuzzed, data, index):
    node, ids = _node(fuzzed, index), s.ids(fuzzed.ids())
    rpc = data.draw(st.sampled_from(["SegmentChanged", "ReleaseReplica", "OpenBulk",
                                     "ChunkHashes", "ReleaseSegment"]))
    if rpc == "SegmentChanged":
        request = node_pb2.SegmentChangedRequest(name=data.draw(s.read_names), id=data.draw(ids))
    elif rpc == "ReleaseReplica":
        request = node_pb2.ReleaseReplicaRequest(name=data.draw(s.names), id=data.draw(s.u64))
    elif rpc == "OpenBulk":
        request = node_pb2.OpenBulkRequest(name=data.draw(s.read_names), id=data.draw(ids))
    elif rpc == "ChunkHashes":
        request = node_pb2.ChunkHashesRequest(
            name=data.draw(s.read_names), id=data.draw(ids),
            chunk_size=data.draw(st.one_of(s.u64, st.just(1 << 20))))
    else:
        request = node_pb2.ReleaseSegmentRequest(name=data.draw(s.names), id=data.draw(s.u64),
                                                 force=data.draw(st.booleans()))
    expect_precise(f"node.{rpc}", lambda: getattr(node, rpc)(request, timeout=CALL_TIMEOUT))


@examples(60)
@given(data=st.data(), index=st.integers(0, 1))
def test_read_pages(fuzzed, data, index):
    """Negative-as-u64, overflowing offset + length, huge lengths, unknown ids."""
    request = node_pb2.ReadPagesRequest(
        name=data.draw(s.read_names), id=data.draw(s.ids(fuzzed.ids())),
        offset=data.draw(st.one_of(s.u64, st.integers(0, CANARY_SIZE))),
        length=data.draw(st.one_of(s.u64, st.integers(0, CANARY_SIZE))))
    node = _node(fuzzed, index)
    expect_precise("node.ReadPages", lambda: node.ReadPages(request, timeout=CALL_TIMEOUT))


def _header(data, known):
    return node_pb2.WritePagesHeader(
        caller=types_pb2.Caller(uid=data.draw(s.u32), gid=data.draw(s.u32)),
        name=data.draw(s.names), id=data.draw(s.ids(known)), token=data.draw(s.i64),
        lease_id=data.draw(s.i64))


@examples(60)
@given(data=st.data(), index=st.integers(0, 1))
def test_write_pages(fuzzed, data, index):
    """Streams with no header, a header in the wrong place or twice (mismatched ids),
    pieces out of order, overlapping, oversize or outside the segment, stale tokens."""
    known = fuzzed.ids()
    chunks = []
    for _ in range(data.draw(st.integers(0, 6))):
        chunk = node_pb2.WritePagesChunk(offset=data.draw(s.u64), data=data.draw(s.data))
        if data.draw(st.booleans()):
            chunk.header.CopyFrom(_header(data, known))
        chunks.append(chunk)
    node = _node(fuzzed, index)
    expect_precise("node.WritePages",
                   lambda: node.WritePages(iter(chunks), timeout=CALL_TIMEOUT))


def test_write_pages_refuses_a_second_header(fuzzed):
    """A header in a later message (another segment's) is refused, not ignored: before
    the token is even checked, so the canary named first is never written."""
    first = node_pb2.WritePagesChunk(header=node_pb2.WritePagesHeader(
        name=CANARY, id=fuzzed.canary.id, token=1, lease_id=1), offset=0, data=b"x")
    second = node_pb2.WritePagesChunk(header=node_pb2.WritePagesHeader(
        name=VICTIMS[0], id=fuzzed.ids()[1], token=1, lease_id=1), offset=0, data=b"y")
    with pytest.raises(grpc.RpcError) as caught:
        fuzzed.nodes[0].WritePages(iter([first, second]), timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert caught.value.details() == "WritePages takes a header in its first message only"
