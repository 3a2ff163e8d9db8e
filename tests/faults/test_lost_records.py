"""The coordinator's side of lost segments and replica reports, RPC by RPC.

Stubs from vas.v1 are called directly against a real coordinator and etcd (no agent:
this module registers node ids itself and so plays their agents), pinning the
contracts in coordinator.proto: RegisterNode with ``reconcile``, the lost mark and the
state it derives, DeleteSegment of a lost segment, replica reports (``copy``) and the
nodes named in ``copies``, FinishDelete's copies, CheckSegments, and the reply of
ReportAttachments. etcd is read directly where the storage matters.
"""
from __future__ import annotations

import grpc
import pytest

from vas.coordinator import keys
from vas.proto import coordinator_pb2 as pb, coordinator_pb2_grpc, types_pb2

MiB = 1 << 20
ALICE = types_pb2.Caller(uid=1000, gid=1000, pid=11, node="n1")
BOB = types_pb2.Caller(uid=1001, gid=1001, pid=12, node="n1")
READY, LOST = types_pb2.SEGMENT_STATE_READY, types_pb2.SEGMENT_STATE_LOST
DELETING = types_pb2.SEGMENT_STATE_DELETING


@pytest.fixture
def stub(coordinator):
    with grpc.insecure_channel(coordinator.address) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)


def register(stub, node_id: str, *, reconcile: bool = False, held=()) -> pb.RegisterNodeResponse:
    return stub.RegisterNode(pb.RegisterNodeRequest(
        node=types_pb2.NodeInfo(id=node_id, address=f"127.0.0.1:{7400 + len(node_id)}"),
        reconcile=reconcile, held=held), timeout=10)


def create(stub, name: str, lease: int, home: str = "n1") -> types_pb2.SegmentInfo:
    return stub.CreateSegment(pb.CreateSegmentRequest(
        caller=ALICE, name=name, size=MiB, mode=0o644, home=home, lease_id=lease), timeout=10)


def get(stub, name: str) -> types_pb2.SegmentInfo:
    return stub.GetSegment(pb.GetSegmentRequest(name=name), timeout=10)


def report(stub, node_id: str, lease: int, *counts) -> list[int]:
    """ReportAttachments of (name, id, count, copy) tuples; the reply's gone ids."""
    return list(stub.ReportAttachments(pb.ReportAttachmentsRequest(
        node_id=node_id, lease_id=lease, counts=[
            pb.AttachmentCount(name=name, id=segment_id, count=count, copy=copy)
            for name, segment_id, count, copy in counts]), timeout=10).gone)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_reconcile_marks_unheld_records_lost_and_removes_deleting_ones(stub, oracle):
    first = register(stub, "n1").lease_id
    n2 = register(stub, "n2").lease_id
    held, lost, doomed = (create(stub, f"rec/{n}", first) for n in ("held", "lost", "doomed"))
    other = create(stub, "rec/other", n2, home="n2")
    stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="rec/doomed"), timeout=10)
    report(stub, "n1", first, ("rec/held", held.id, 1, False))
    assert report(stub, "n2", n2, ("rec/lost", lost.id, 0, True),
                  ("rec/doomed", doomed.id, 1, True)) == [doomed.id]  # it is marked deleting

    again = register(stub, "n1", reconcile=True, held=[held.id])
    assert sorted((s.name, s.state, list(s.copies)) for s in again.lost) == [
        ("rec/doomed", DELETING, ["n2"]), ("rec/lost", LOST, ["n2"])]
    assert get(stub, "rec/held").state == READY
    assert (get(stub, "rec/lost").state, list(get(stub, "rec/lost").copies)) == (LOST, ["n2"])
    assert code_of(lambda: get(stub, "rec/doomed")) == grpc.StatusCode.NOT_FOUND
    assert get(stub, "rec/other").state == READY and other.home == "n2"
    assert keys.decode(oracle.kvs(keys.segment_key("rec/lost"))[0].value)["lost"] is True
    # The old incarnation is over: its lease, its reports and its creates.
    assert code_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(
        node_id="n1", lease_id=first), timeout=10)) == grpc.StatusCode.NOT_FOUND
    assert not oracle.kvs(keys.attach_key("rec/held", "n1"))
    assert code_of(lambda: create(stub, "rec/late", first)) == grpc.StatusCode.UNAVAILABLE
    # Registering again without reconcile changes no segment; reconciling twice is a no-op.
    register(stub, "n1")
    assert get(stub, "rec/held").state == READY
    assert not register(stub, "n1", reconcile=True, held=[held.id]).lost


def test_a_lost_segment_refuses_the_writer_lock_and_is_deleted_at_once(stub, oracle):
    lease = register(stub, "n1").lease_id
    n2 = register(stub, "n2").lease_id
    info = create(stub, "gone/seg", lease)
    report(stub, "n2", n2, ("gone/seg", info.id, 2, True))
    register(stub, "n1", reconcile=True)
    error = pytest.raises(grpc.RpcError, stub.AcquireWriter, pb.AcquireWriterRequest(
        caller=ALICE, name="gone/seg"), timeout=10).value
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "segment gone/seg was lost: its home node n1 restarted without it "
        "(delete it to free the name)")
    assert code_of(lambda: stub.DeleteSegment(pb.DeleteSegmentRequest(
        caller=BOB, name="gone/seg"), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    last = stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="gone/seg"),
                              timeout=10)
    assert (last.id, last.state, list(last.copies)) == (info.id, LOST, ["n2"])
    assert not oracle.kvs(keys.segment_key("gone/seg"))
    assert not oracle.kvs(keys.attach_prefix("gone/seg"), prefix=True)
    lease = register(stub, "n1").lease_id
    assert create(stub, "gone/seg", lease).state == READY


def test_replica_reports_name_copies_until_removed(stub, oracle):
    lease = register(stub, "n1").lease_id
    n2, n3 = register(stub, "n2").lease_id, register(stub, "n3").lease_id
    info = create(stub, "copy/seg", lease)
    assert report(stub, "n3", n3, ("copy/seg", info.id, 0, True)) == []
    assert report(stub, "n2", n2, ("copy/seg", info.id, 1, True)) == []
    report(stub, "n1", lease, ("copy/seg", info.id, 1, False))
    seen = get(stub, "copy/seg")
    assert (seen.attachments, list(seen.copies)) == (2, ["n2", "n3"])
    listed = stub.ListSegments(pb.ListSegmentsRequest(prefix="copy/"), timeout=10).segments
    assert list(listed[0].copies) == ["n2", "n3"]
    assert keys.decode(oracle.kvs(keys.attach_key("copy/seg", "n3"))[0].value) == {
        "id": info.id, "count": 0, "copy": True}
    report(stub, "n3", n3, ("copy/seg", info.id, 0, False))  # dropped: the report goes
    assert not oracle.kvs(keys.attach_key("copy/seg", "n3"))
    marked = stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="copy/seg"),
                                timeout=10)
    assert (marked.state, list(marked.copies)) == (DELETING, ["n2"])
    finished = stub.FinishDelete(pb.FinishDeleteRequest(name="copy/seg", id=info.id), timeout=10)
    assert list(finished.copies) == ["n2"]
    assert not oracle.kvs(keys.attach_prefix("copy/seg"), prefix=True)
    # A copy reported after the removal is answered gone (the delete could not name it).
    assert report(stub, "n3", n3, ("copy/seg", info.id, 0, True)) == [info.id]


def test_finish_delete_names_copies_of_a_record_already_gone(stub):
    """ttl expiry removes the record but not the reports: FinishDelete still names them."""
    lease = register(stub, "n1").lease_id
    n2 = register(stub, "n2").lease_id
    info = create(stub, "exp/seg", lease)
    report(stub, "n2", n2, ("exp/seg", info.id, 0, True))
    stub.FinishDelete(pb.FinishDeleteRequest(name="exp/seg", id=info.id), timeout=10)
    report(stub, "n2", n2, ("exp/seg", info.id, 0, True))  # a late report of that copy
    again = stub.FinishDelete(pb.FinishDeleteRequest(name="exp/seg", id=info.id), timeout=10)
    assert list(again.copies) == ["n2"]


def test_check_segments_names_the_gone(stub):
    lease = register(stub, "n1").lease_id
    live, deleting, lost = (create(stub, f"chk/{n}", lease) for n in ("live", "deleting", "lost"))
    stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="chk/deleting"), timeout=10)
    lease = register(stub, "n1", reconcile=True, held=[live.id, deleting.id]).lease_id
    assert get(stub, "chk/lost").state == LOST
    refs = [pb.SegmentRef(name=name, id=segment_id) for name, segment_id in (
        ("chk/live", live.id), ("chk/deleting", deleting.id), ("chk/lost", lost.id),
        ("chk/live", live.id + 1000), ("chk/absent", 7))]
    gone = stub.CheckSegments(pb.CheckSegmentsRequest(segments=refs), timeout=10).gone
    assert sorted(gone) == sorted([deleting.id, lost.id, live.id + 1000, 7])
    many = [pb.SegmentRef(name=f"chk/{i}", id=i + 1) for i in range(300)]  # three txns
    assert len(stub.CheckSegments(pb.CheckSegmentsRequest(segments=many), timeout=10).gone) == 300
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.CheckSegments(pb.CheckSegmentsRequest(
        segments=[pb.SegmentRef(name="chk/live")]), timeout=10)) == invalid
    assert code_of(lambda: stub.CheckSegments(pb.CheckSegmentsRequest(
        segments=[pb.SegmentRef(name="x", id=1)] * 1001), timeout=10)) == invalid
    assert code_of(lambda: register(stub, "n1", reconcile=True, held=[0])) == invalid
