"""A CreateSegment made straight to the coordinator, not by the home's agent, cannot
make a ``ready`` record without memory behind it.

CreateSegment compares, in the same etcd transaction that claims the name, that the
home node is registered under the lease the request carries. The home's agent knows
its lease (RegisterNode gave it) and allocated the memory before calling; a tool
calling the coordinator does not know it (no RPC shows leases), and a call still in
flight from an agent incarnation killed since carries a revoked one. Each refusal
leaves nothing in etcd (read directly).
"""
from __future__ import annotations

import grpc
import pytest

import vas
from faultkit import restart
from vas.coordinator import keys
from vas.proto import coordinator_pb2 as pb, types_pb2

MiB = 1 << 20
#: The caller test_coordinator.py's stubs use, here naming a real agent's node.
ALICE = types_pb2.Caller(uid=1000, gid=1000, pid=11, node="node1")


def create(stub, name: str, home: str = "node1", lease_id: int = 0) -> types_pb2.SegmentInfo:
    return stub.CreateSegment(pb.CreateSegmentRequest(
        caller=ALICE, name=name, size=MiB, mode=0o644, home=home, lease_id=lease_id),
        timeout=10)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def lease_of(oracle, node_id: str) -> int:
    return oracle.kvs(keys.node_key(node_id))[0].lease


def test_a_create_without_the_home_agents_lease_stores_nothing(pair, oracle, coordinator_stub):
    stub = coordinator_stub
    for home in ("node1", ""):  # "" = the caller's node, as an agent would send
        error = refused(lambda: create(stub, "direct/a", home=home))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == ("CreateSegment needs the lease id of home node 'node1': "
                                   "segments are created by their home's agent")
    error = refused(lambda: create(stub, "direct/a", lease_id=12345))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "node 'node1' is not registered under lease 12345" in error.details()
    # Another live node's lease does not vouch for node1's memory.
    error = refused(lambda: create(stub, "direct/a", lease_id=lease_of(oracle, "node2")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    error = refused(lambda: create(stub, "direct/a", home="ghost", lease_id=1))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                               "unknown home node 'ghost'")
    assert not oracle.kvs(keys.SEGMENTS, prefix=True)
    assert not stub.ListSegments(pb.ListSegmentsRequest(), timeout=10).segments

    # The agent's own create carries the lease: ready, and memory is behind it.
    with vas.connect(pair.nodes[0].socket) as c1:
        assert c1.create("direct/a", MiB, mode=0o644).state == "ready"
    listed = stub.ListSegments(pb.ListSegmentsRequest(), timeout=10).segments
    assert [(s.name, s.state) for s in listed] == [("direct/a", types_pb2.SEGMENT_STATE_READY)]
    with vas.connect(pair.nodes[1].socket) as c2, c2.attach("direct/a", fetch="eager") as m:
        assert m.read(0, 4) == bytes(4)


def test_a_create_in_flight_from_a_killed_incarnation_is_refused(pair, oracle, coordinator_stub):
    """A CreateSegment of the old incarnation that reaches the coordinator after the
    agent was killed and restarted (here: sent afterwards with the old lease) fails:
    the restarted agent's reconciliation revoked that lease first."""
    old = lease_of(oracle, "node1")
    restart(pair.nodes[0])
    assert lease_of(oracle, "node1") != old
    error = refused(lambda: create(coordinator_stub, "direct/late", lease_id=old))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert not oracle.kvs(keys.segment_key("direct/late"))
