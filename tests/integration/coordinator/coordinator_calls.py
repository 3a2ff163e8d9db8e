"""Callers and one-line calls shared by the Coordinator API tests.

The tests call the vas.v1 stubs directly; these helpers only fill in the requests
(``create`` as ALICE on home "n1" unless told otherwise, with the lease ``register``
got for that home) and read a status code, or a key straight from etcd (the
independent oracle).
"""
from __future__ import annotations

import grpc
import pytest
from etcd3 import etcdrpc

from vas.proto import coordinator_pb2 as pb, types_pb2


MiB = 1 << 20
ALICE = types_pb2.Caller(uid=1000, gid=1000, pid=11, node="n1")
BOB = types_pb2.Caller(uid=1001, gid=1001, pid=12, node="n1")
CAROL = types_pb2.Caller(uid=1002, gid=1000, pid=13, node="n1")  # in alice's group
ROOT = types_pb2.Caller(uid=0, gid=0, pid=1, node="n1")


#: The lease each node id was last registered under here: these tests play the agents,
#: and CreateSegment takes the home's lease as proof that its agent makes the call.
LEASES: dict[str, int] = {}


def register(stub, node_id: str, ttl: int = 0) -> pb.RegisterNodeResponse:
    response = stub.RegisterNode(pb.RegisterNodeRequest(node=types_pb2.NodeInfo(
        id=node_id, address=f"127.0.0.1:{7400 + len(node_id)}", socket=f"/tmp/{node_id}.sock",
        memory_total=1 << 30), ttl_seconds=ttl))
    LEASES[node_id] = response.lease_id
    return response


def create(stub, name: str, size: int = MiB, *, mode=0o640, caller=ALICE, home="n1",
           replicas=0, ttl=0.0) -> types_pb2.SegmentInfo:
    """CreateSegment as the agent of ``home`` (its lease from ``register``) would make it."""
    return stub.CreateSegment(pb.CreateSegmentRequest(
        caller=caller, name=name, size=size, mode=mode, home=home, replicas=replicas,
        ttl_seconds=ttl, lease_id=LEASES.get(home, 0)))


def get(stub, name: str) -> types_pb2.SegmentInfo:
    return stub.GetSegment(pb.GetSegmentRequest(name=name))


def status_of(call) -> grpc.StatusCode:
    """The status code ``call()`` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def etcd_get(etcd_url: str, key: bytes):
    with grpc.insecure_channel(etcd_url.removeprefix("http://")) as channel:
        return etcdrpc.KVStub(channel).Range(etcdrpc.RangeRequest(key=key), timeout=5).kvs


def status_of_safe(call):
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
