"""Every vas.v1.Coordinator RPC with random fields, over real gRPC.

Requests come from the message descriptors (strategies.message): any field present
or absent, edges of every integer width, bad names, random ``replicas``, modes and
owners, stale tokens and lease ids. Names are the victims' or made up, never the
canary's, and node ids never the real agents' (see strategies.py for why).
"""
from __future__ import annotations

import grpc
import pytest
from hypothesis import given, strategies as st

import strategies as s
from fuzzkit import CALL_TIMEOUT, examples, expect_precise
from vas.proto import coordinator_pb2 as pb, types_pb2

_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
_UNARY = sorted(m.name for m in _SERVICE.methods if not m.server_streaming)


def _request_class(method_name: str):
    return getattr(pb, _SERVICE.methods_by_name[method_name].input_type.name)


@examples(300)
@given(data=st.data())
def test_unary_rpcs(fuzzed, data):
    method = data.draw(st.sampled_from(_UNARY))
    request = data.draw(s.message(_request_class(method)))
    rpc = getattr(fuzzed.coordinator, method)
    expect_precise(f"coordinator.{method}", lambda: rpc(request, timeout=CALL_TIMEOUT))


#: A record of the writer-lock fuzzer's own (the other fuzzers may delete the victims).
_LOCKED = "fuzz-writer-lock"


@pytest.fixture(scope="module")
def locked(fuzz_cluster):
    """The record ``_LOCKED`` exists (created straight at the coordinator, homed on a
    registered node with no agent behind it: only its writer lock is used; its address is
    loopback's port 1, where nothing listens)."""
    stub = fuzz_cluster.coordinator
    node = stub.RegisterNode(pb.RegisterNodeRequest(
        node=types_pb2.NodeInfo(id="fuzz-lockhome", address="127.0.0.1:1"), ttl_seconds=3600),
        timeout=CALL_TIMEOUT)
    stub.CreateSegment(pb.CreateSegmentRequest(
        caller=types_pb2.Caller(node="fuzz-lockhome"), name=_LOCKED, size=4096, mode=0o600,
        lease_id=node.lease_id), timeout=CALL_TIMEOUT)
    return fuzz_cluster


@examples(40)
@given(data=st.data())
def test_writer_lock_with_stale_tokens(fuzzed, locked, data):
    """Take a writer lock, then renew and publish with tokens and lease ids off by a
    little or a lot: each gets a precise status; then release it."""
    name = _LOCKED
    caller = types_pb2.Caller(uid=0, gid=0, node="fuzz-lockhome")
    try:
        held = fuzzed.coordinator.AcquireWriter(
            pb.AcquireWriterRequest(caller=caller, name=name, ttl_seconds=5),
            timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:  # deleted by another fuzzer, or held: still precise
        assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.ABORTED), exc
        return
    delta = data.draw(st.sampled_from([-1, 1, 1 << 32, -(1 << 32)]))
    token = data.draw(st.sampled_from([held.token + delta, held.token]))
    lease = data.draw(st.sampled_from([held.lease_id + delta, held.lease_id, 0]))
    stub = fuzzed.coordinator
    for method, request in (
            ("RenewWriter", pb.RenewWriterRequest(name=name, token=token, lease_id=lease)),
            ("PublishVersion", pb.PublishVersionRequest(caller=caller, name=name,
                                                        id=data.draw(s.ids_hint()),
                                                        token=token, lease_id=lease))):
        expect_precise(f"coordinator.{method}(stale)",
                       lambda: getattr(stub, method)(request, timeout=CALL_TIMEOUT))
    stub.ReleaseWriter(pb.ReleaseWriterRequest(name=name, token=held.token,
                                               lease_id=held.lease_id), timeout=CALL_TIMEOUT)


@examples(20)
@given(request=s.message(pb.WatchRequest))
def test_watch(fuzzed, request):
    """A Watch either fails at once with a precise status or streams until cancelled."""
    s_call = fuzzed.coordinator.Watch(request, timeout=0.3)

    def drain():
        try:
            for _ in s_call:
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    expect_precise("coordinator.Watch", drain)


@pytest.mark.parametrize("method, request_", [
    ("FinishDelete", pb.FinishDeleteRequest(name="fuzz-victim", id=1 << 63)),
    ("CheckSegments", pb.CheckSegmentsRequest(segments=[pb.SegmentRef(name="a", id=1 << 63)])),
    ("DeleteSegment", pb.DeleteSegmentRequest(caller=types_pb2.Caller(), name="fuzz-victim",
                                              id=(1 << 64) - 1)),
    ("CreateSegment", pb.CreateSegmentRequest(caller=types_pb2.Caller(node="fuzz-node-r"),
                                              name="fuzz-r", size=4096,
                                              replicas=(1 << 32) - 1)),
])
def test_out_of_range_ids_and_replicas_are_invalid(fuzzed, method, request_):
    """Regressions of the fuzzer's finds: an id >= 2**63 (FinishDelete answered UNKNOWN)
    and replicas=2**32-1 (accepted and stored)."""
    with pytest.raises(grpc.RpcError) as caught:
        getattr(fuzzed.coordinator, method)(request_, timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert caught.value.details().startswith(("invalid segment id", "invalid replicas"))
