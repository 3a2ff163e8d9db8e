"""Resource limits of the daemons' gRPC servers: message sizes and page streams per peer.

An oversized message is refused with RESOURCE_EXHAUSTED and the daemon keeps serving;
past ``--max-streams-per-peer`` a page stream is refused with RESOURCE_EXHAUSTED naming
the flag, and served again once one ends.
"""
from __future__ import annotations

import threading

import grpc
import pytest

import vas
from fuzzkit import CALL_TIMEOUT, CANARY, SENT
from vas.cluster import LocalCluster
from vas.core.defaults import MAX_GRPC_MESSAGE
from vas.proto import coordinator_pb2, node_pb2, node_pb2_grpc
from waiting import wait_for


def test_oversize_messages_are_resource_exhausted(fuzzed):
    too_big = MAX_GRPC_MESSAGE + 1024
    SENT["limits.oversize"] += 2
    with pytest.raises(grpc.RpcError) as to_coordinator:
        fuzzed.coordinator.GetSegment(coordinator_pb2.GetSegmentRequest(name="x" * too_big),
                                      timeout=CALL_TIMEOUT)
    assert to_coordinator.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    chunk = node_pb2.WritePagesChunk(header=node_pb2.WritePagesHeader(
        name=CANARY, id=fuzzed.canary.id, token=1), data=b"\0" * too_big)
    with pytest.raises(grpc.RpcError) as to_node:
        fuzzed.nodes[0].WritePages(iter([chunk]), timeout=CALL_TIMEOUT)
    assert to_node.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def limited(world_dir):
    """An agent with --max-streams-per-peer 2, over its own etcd: the session etcd's
    keyspace belongs to the shared fuzz cluster (whose agents are node1 and node2 too)."""
    with LocalCluster(world_dir, nodes=1, node_args=["--max-streams-per-peer", "2"]) as local:
        yield local.nodes[0]


def test_page_streams_per_peer_are_limited(limited):
    """Two WritePages streams held open (a header, then nothing) fill a limit of 2: a
    ReadPages is refused until one of them ends."""
    node = limited
    with vas.connect(node.socket) as client:
        info = client.create("held", 4096)
    hold = threading.Event()

    def stalled():
        yield node_pb2.WritePagesChunk(header=node_pb2.WritePagesHeader(
            name="held", id=info.id, token=1, lease_id=1))
        hold.wait(CALL_TIMEOUT)

    read = node_pb2.ReadPagesRequest(name="held", id=info.id, offset=0, length=4096)
    with grpc.insecure_channel(node.address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)

        def hold_one():
            return stub.WritePages.future(stalled(), timeout=CALL_TIMEOUT)

        def probe() -> grpc.RpcError | None:
            """A ReadPages: its error, or None when it was served."""
            try:
                list(stub.ReadPages(read, timeout=CALL_TIMEOUT))
            except grpc.RpcError as exc:
                return exc
            return None

        def refused() -> grpc.RpcError | None:
            for index, future in enumerate(held):
                if future.done():  # it arrived while a probe held a slot: again
                    assert future.exception().code() == \
                        grpc.StatusCode.RESOURCE_EXHAUSTED, future.exception()
                    held[index] = hold_one()
            return probe()

        held = [hold_one() for _ in range(2)]
        try:
            error = wait_for(refused, "both held streams to count")
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == ("peer 127.0.0.1 has 2 page streams (ReadPages, "
                                       "WritePages) open on this agent, the most allowed "
                                       "(--max-streams-per-peer)")
        finally:
            hold.set()
        for future in held:  # ended: the stale token 1 is refused once the stream ends
            assert future.exception(CALL_TIMEOUT) is not None
        wait_for(lambda: probe() is None, "a page stream to be served again")
