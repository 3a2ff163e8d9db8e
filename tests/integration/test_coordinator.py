"""The Coordinator API over real gRPC, against a real coordinator process and a real etcd.

Stubs from vas.v1 are called directly, so each test pins one RPC's contract
(coordinator.proto); etcd itself is read as an independent oracle where the
storage matters. Waits are on conditions with deadlines, never bare sleeps.
"""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from etcd3 import etcdrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vas.cluster import CoordinatorProcess, EtcdProcess, free_port
from vas.coordinator.config import CoordinatorConfig
from vas.coordinator.server import serve
from waiting import wait_for
from vas.proto import coordinator_pb2 as pb, coordinator_pb2_grpc, types_pb2

MiB = 1 << 20
WINDOW = (0x2000_0000_0000, 0x3000_0000_0000)
ALICE = types_pb2.Caller(uid=1000, gid=1000, pid=11, node="n1")
BOB = types_pb2.Caller(uid=1001, gid=1001, pid=12, node="n1")
CAROL = types_pb2.Caller(uid=1002, gid=1000, pid=13, node="n1")  # in alice's group
ROOT = types_pb2.Caller(uid=0, gid=0, pid=1, node="n1")


# ------------------------------------------------------------------------------- helpers

@pytest.fixture
def stub(coordinator):
    with grpc.insecure_channel(coordinator.address) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)


@pytest.fixture
def n1(stub):
    """Node "n1" registered (lease id returned)."""
    return register(stub, "n1").lease_id


def register(stub, node_id: str, ttl: int = 0) -> pb.RegisterNodeResponse:
    return stub.RegisterNode(pb.RegisterNodeRequest(node=types_pb2.NodeInfo(
        id=node_id, address=f"127.0.0.1:{7400 + len(node_id)}", socket=f"/tmp/{node_id}.sock",
        memory_total=1 << 30), ttl_seconds=ttl))


def create(stub, name: str, size: int = MiB, *, mode=0o640, caller=ALICE, home="n1",
           replicas=0, ttl=0.0) -> types_pb2.SegmentInfo:
    return stub.CreateSegment(pb.CreateSegmentRequest(
        caller=caller, name=name, size=size, mode=mode, home=home, replicas=replicas,
        ttl_seconds=ttl))


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


# ----------------------------------------------------------------------------- segments

def test_create_get_and_list_in_pages(stub, n1, etcd):
    made = [create(stub, f"page/{i}", 5000) for i in (3, 1, 4, 0, 2)]
    create(stub, "other/x")
    info = get(stub, "page/1")
    assert info == made[1]
    assert (info.size, info.mode, info.uid, info.gid, info.home) == (8192, 0o640, 1000, 1000, "n1")
    assert info.state == types_pb2.SEGMENT_STATE_READY and info.version == 0
    assert info.expires == 0 and abs(info.created - time.time()) < 60
    assert etcd_get(etcd.url, b"/vas/segments/page/1")[0].create_revision == info.id

    names, token, pages = [], "", 0
    while True:
        page = stub.ListSegments(pb.ListSegmentsRequest(prefix="page/", page_size=2,
                                                        page_token=token))
        pages += 1
        assert len(page.segments) <= 2
        names += [s.name for s in page.segments]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"page/{i}" for i in range(5)] and pages == 3
    everything = stub.ListSegments(pb.ListSegmentsRequest())
    assert [s.name for s in everything.segments] == ["other/x"] + names
    assert not everything.next_page_token


def test_create_refuses_bad_input_and_taken_names(stub, n1):
    create(stub, "taken")
    assert status_of(lambda: create(stub, "taken")) == grpc.StatusCode.ALREADY_EXISTS
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: create(stub, "/abs")) == invalid
    assert status_of(lambda: create(stub, "a/../b")) == invalid
    assert status_of(lambda: create(stub, "sp ace")) == invalid
    assert status_of(lambda: create(stub, "x" * 256)) == invalid
    assert status_of(lambda: create(stub, "zero", size=0)) == invalid
    assert status_of(lambda: create(stub, "huge", size=(1 << 40) + 1)) == invalid
    assert status_of(lambda: create(stub, "mode", mode=0o1000)) == invalid
    assert status_of(lambda: create(stub, "nohome", home="ghost")) == invalid
    assert status_of(lambda: create(stub, "ttl", ttl=-1)) == invalid
    assert status_of(lambda: stub.CreateSegment(
        pb.CreateSegmentRequest(name="nocaller", size=1, home="n1"))) == invalid
    assert status_of(lambda: get(stub, "missing")) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: get(stub, "")) == invalid
    assert status_of(lambda: stub.ListSegments(
        pb.ListSegmentsRequest(page_token="!!notbase64"))) == invalid
    with pytest.raises(grpc.RpcError) as info:
        create(stub, "nohome2", home="ghost")
    assert "unknown home node 'ghost'" in info.value.details()


def test_addresses_are_unique_aligned_and_never_reused(stub, n1):
    sizes = [1, 4096, 2 * MiB - 1, 2 * MiB, 3 * MiB, 64 * MiB, 5000]
    infos = [create(stub, f"addr/{i}", size) for i, size in enumerate(sizes)]
    spans = sorted((i.address, i.address + i.size) for i in infos)
    for start, end in spans:
        assert start % (2 * MiB) == 0 and WINDOW[0] <= start < end <= WINDOW[1]
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end + 2 * MiB  # a guard gap after every segment
    assert len({i.id for i in infos}) == len(infos)
    # A deleted range is not handed out again; a re-created name gets a new id.
    stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="addr/0"))
    stub.FinishDelete(pb.FinishDeleteRequest(name="addr/0", id=infos[0].id))
    again = create(stub, "addr/0")
    assert again.id > max(i.id for i in infos)
    assert again.address > max(end for _, end in spans)


def test_eight_threads_race_to_create_one_name(coordinator, n1):
    barrier = threading.Barrier(8)
    results: list = [None] * 8

    def race(index: int) -> None:
        with grpc.insecure_channel(coordinator.address) as channel:
            own = coordinator_pb2_grpc.CoordinatorStub(channel)
            own.ListNodes(pb.ListNodesRequest())  # connect before the start line
            barrier.wait()
            try:
                results[index] = create(own, "race/one", caller=ALICE)
            except grpc.RpcError as exc:
                results[index] = exc.code()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [r for r in results if isinstance(r, types_pb2.SegmentInfo)]
    assert len(winners) == 1
    assert results.count(grpc.StatusCode.ALREADY_EXISTS) == 7


def test_concurrent_creates_of_different_names_all_succeed(coordinator, n1):
    errors: list = []

    def creator(index: int) -> None:
        with grpc.insecure_channel(coordinator.address) as channel:
            own = coordinator_pb2_grpc.CoordinatorStub(channel)
            for j in range(10):
                try:
                    create(own, f"many/{index}/{j}", 4096)
                except grpc.RpcError as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=creator, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    with grpc.insecure_channel(coordinator.address) as channel:
        listed = coordinator_pb2_grpc.CoordinatorStub(channel).ListSegments(
            pb.ListSegmentsRequest(prefix="many/")).segments
    spans = sorted((s.address, s.address + s.size) for s in listed)
    assert len(spans) == 80
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_chmod_and_chown_need_owner_or_root(stub, n1):
    create(stub, "perm/seg", mode=0o600)
    denied = grpc.StatusCode.PERMISSION_DENIED
    chmod = lambda caller, mode: stub.SetSegmentMode(  # noqa: E731
        pb.SetSegmentModeRequest(caller=caller, name="perm/seg", mode=mode))
    chown = lambda caller, uid, gid: stub.SetSegmentOwner(  # noqa: E731
        pb.SetSegmentOwnerRequest(caller=caller, name="perm/seg", uid=uid, gid=gid))
    assert chmod(ALICE, 0o644).mode == 0o644
    assert status_of(lambda: chmod(BOB, 0o666)) == denied
    assert status_of(lambda: chmod(CAROL, 0o666)) == denied  # group members are not owners
    assert status_of(lambda: chown(BOB, 1001, 1001)) == denied
    assert status_of(lambda: chmod(ALICE, 0o1777)) == grpc.StatusCode.INVALID_ARGUMENT
    moved = chown(ROOT, 1001, 1001)
    assert (moved.uid, moved.gid, moved.mode) == (1001, 1001, 0o644)
    assert status_of(lambda: chmod(ALICE, 0o600)) == denied  # alice no longer owns it
    assert chmod(BOB, 0o600).mode == 0o600
    assert get(stub, "perm/seg").mode == 0o600
    assert status_of(lambda: chmod(ALICE, 0o600)) == denied  # also when the record is cached
    assert status_of(lambda: stub.SetSegmentMode(pb.SetSegmentModeRequest(
        caller=ALICE, name="perm/missing", mode=0o600))) == grpc.StatusCode.NOT_FOUND


def test_delete_marks_then_finish_removes(stub, n1, etcd):
    info = create(stub, "del/seg")
    delete = lambda caller: stub.DeleteSegment(  # noqa: E731
        pb.DeleteSegmentRequest(caller=caller, name="del/seg"))
    assert status_of(lambda: delete(BOB)) == grpc.StatusCode.PERMISSION_DENIED
    marked = delete(ALICE)
    assert marked.state == types_pb2.SEGMENT_STATE_DELETING and marked.id == info.id
    assert delete(ALICE).state == types_pb2.SEGMENT_STATE_DELETING  # idempotent
    assert status_of(lambda: delete(BOB)) == grpc.StatusCode.PERMISSION_DENIED
    assert get(stub, "del/seg").state == types_pb2.SEGMENT_STATE_DELETING
    stub.FinishDelete(pb.FinishDeleteRequest(name="del/seg", id=info.id + 1000))  # another id
    assert get(stub, "del/seg").id == info.id
    stub.FinishDelete(pb.FinishDeleteRequest(name="del/seg", id=info.id))
    assert status_of(lambda: get(stub, "del/seg")) == grpc.StatusCode.NOT_FOUND
    assert not etcd_get(etcd.url, b"/vas/segments/del/seg")
    stub.FinishDelete(pb.FinishDeleteRequest(name="del/seg", id=info.id))  # idempotent
    assert status_of(lambda: delete(ALICE)) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: stub.FinishDelete(pb.FinishDeleteRequest(
        name="del/seg", id=0))) == grpc.StatusCode.INVALID_ARGUMENT


def test_segment_with_ttl_expires(stub, n1):
    info = create(stub, "ttl/seg", ttl=1.5)
    assert info.expires > info.created
    wait_for(lambda: status_of_safe(lambda: get(stub, "ttl/seg")) == grpc.StatusCode.NOT_FOUND,
             what="the ttl segment to expire")


def status_of_safe(call):
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# -------------------------------------------------------------------------------- nodes

def test_nodes_register_heartbeat_list_and_expire(stub, etcd):
    first = register(stub, "n1")
    assert first.ttl_seconds == 10
    short = register(stub, "short", ttl=2)
    nodes = stub.ListNodes(pb.ListNodesRequest()).nodes
    assert [n.id for n in nodes] == ["n1", "short"]
    assert nodes[0].state == types_pb2.NODE_STATE_READY and nodes[0].memory_total == 1 << 30

    beat = stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=first.lease_id,
                                              memory_used=3 * MiB, segments=2,
                                              state=types_pb2.NODE_STATE_DRAINING))
    assert beat.ttl_seconds > 0
    n1 = stub.ListNodes(pb.ListNodesRequest()).nodes[0]
    assert (n1.memory_used, n1.segments, n1.state) == (3 * MiB, 2,
                                                       types_pb2.NODE_STATE_DRAINING)

    lost = create(stub, "home/short", home="short")
    kept = create(stub, "home/short-replicated", home="short", replicas=1)
    assert lost.state == kept.state == types_pb2.SEGMENT_STATE_READY
    # "short" stops heart-beating: its lease lapses and it leaves the list.
    wait_for(lambda: [n.id for n in stub.ListNodes(pb.ListNodesRequest()).nodes] == ["n1"],
             what="the node lease to expire")
    assert status_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(
        node_id="short", lease_id=short.lease_id))) == grpc.StatusCode.NOT_FOUND
    assert get(stub, "home/short").state == types_pb2.SEGMENT_STATE_LOST
    assert get(stub, "home/short-replicated").state == types_pb2.SEGMENT_STATE_DEGRADED

    # Re-registering replaces the record and ends the old lease at once.
    again = register(stub, "n1")
    assert again.lease_id != first.lease_id
    assert status_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(
        node_id="n1", lease_id=first.lease_id))) == grpc.StatusCode.NOT_FOUND
    stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1", lease_id=again.lease_id))
    assert not stub.ListNodes(pb.ListNodesRequest()).nodes
    assert not etcd_get(etcd.url, b"/vas/nodes/n1")
    stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1", lease_id=again.lease_id))


def test_node_requests_are_validated(stub):
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: register(stub, "")) == invalid
    assert status_of(lambda: register(stub, "a/b")) == invalid
    assert status_of(lambda: stub.RegisterNode(pb.RegisterNodeRequest(
        node=types_pb2.NodeInfo(id="noaddr")))) == invalid
    assert status_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id="x"))) == invalid


def test_attachment_reports_are_summed_and_vanish_with_the_node(stub, n1):
    n2 = register(stub, "n2").lease_id
    info = create(stub, "att/seg")
    create(stub, "att/seg2")  # a longer name sharing the prefix is not counted
    def report(node, lease, count, seg_id=info.id, name="att/seg"):
        stub.ReportAttachments(pb.ReportAttachmentsRequest(
            node_id=node, lease_id=lease,
            counts=[pb.AttachmentCount(name=name, id=seg_id, count=count)]))
    report("n1", n1, 2)
    report("n2", n2, 3)
    report("n1", n1, 5, name="att/seg2", seg_id=get(stub, "att/seg2").id)
    assert get(stub, "att/seg").attachments == 5
    listed = {s.name: s.attachments
              for s in stub.ListSegments(pb.ListSegmentsRequest(prefix="att/")).segments}
    assert listed == {"att/seg": 5, "att/seg2": 5}
    report("n1", n1, 1)  # replaces n1's earlier report
    assert get(stub, "att/seg").attachments == 4
    report("n2", n2, 7, seg_id=info.id + 999)  # a report of another incarnation is ignored
    assert get(stub, "att/seg").attachments == 1
    report("n1", n1, 0)
    assert get(stub, "att/seg").attachments == 0
    report("n2", n2, 4)
    stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n2", lease_id=n2))
    assert get(stub, "att/seg").attachments == 0
    assert status_of(lambda: report("n2", n2, 1)) == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------------- writer lock

def test_writer_lock_is_exclusive_and_tokens_grow(stub, n1):
    create(stub, "w/seg", mode=0o664)
    acquire = lambda caller, ttl=0: stub.AcquireWriter(  # noqa: E731
        pb.AcquireWriterRequest(caller=caller, name="w/seg", ttl_seconds=ttl))
    first = acquire(ALICE)
    assert first.token > 0 and first.ttl_seconds == 10
    assert status_of(lambda: acquire(CAROL)) == grpc.StatusCode.ABORTED  # group may write
    assert status_of(lambda: acquire(BOB)) == grpc.StatusCode.PERMISSION_DENIED  # other: r--
    assert stub.RenewWriter(pb.RenewWriterRequest(
        name="w/seg", token=first.token, lease_id=first.lease_id)).ttl_seconds > 0
    stub.ReleaseWriter(pb.ReleaseWriterRequest(name="w/seg", token=first.token + 1))  # stale
    assert status_of(lambda: acquire(CAROL)) == grpc.StatusCode.ABORTED
    stub.ReleaseWriter(pb.ReleaseWriterRequest(name="w/seg", token=first.token,
                                               lease_id=first.lease_id))
    second = acquire(CAROL)
    assert second.token > first.token
    assert status_of(lambda: stub.RenewWriter(pb.RenewWriterRequest(
        name="w/seg", token=first.token, lease_id=first.lease_id))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    stub.ReleaseWriter(pb.ReleaseWriterRequest(name="w/seg", token=second.token,
                                               lease_id=second.lease_id))
    # A writer that stops renewing loses the lock when its lease lapses, and is fenced.
    short = acquire(ALICE, ttl=2)
    third = wait_for(lambda: try_acquire(acquire, CAROL), what="the writer lease to lapse")
    assert third.token > short.token
    assert status_of(lambda: stub.RenewWriter(pb.RenewWriterRequest(
        name="w/seg", token=short.token, lease_id=short.lease_id))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    # Deleting the segment drops its lock; a new segment of the name starts unlocked.
    info = get(stub, "w/seg")
    stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="w/seg"))
    assert status_of(lambda: acquire(ALICE)) == grpc.StatusCode.NOT_FOUND
    stub.FinishDelete(pb.FinishDeleteRequest(name="w/seg", id=info.id))
    create(stub, "w/seg", mode=0o664)
    assert acquire(ALICE).token > third.token


def try_acquire(acquire, caller):
    try:
        return acquire(caller)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.ABORTED
        return None


# ------------------------------------------------------------------------------ publish

def publish(stub, name: str, seg_id: int, token: int, lease_id: int = 0,
            caller=ALICE) -> types_pb2.SegmentInfo:
    return stub.PublishVersion(pb.PublishVersionRequest(
        caller=caller, name=name, id=seg_id, token=token, lease_id=lease_id))


def fenced_message(name: str, token: int) -> str:
    return (f"segment {name}: writer token {token} is no longer current "
            "(lease lapsed or lock taken over)")


def etcd_rewrite(etcd_url: str, key: bytes, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` in the value of ``key`` behind the coordinator's back
    (what another coordinator's read-modify-write looks like to this one's cache)."""
    with grpc.insecure_channel(etcd_url.removeprefix("http://")) as channel:
        kv = etcdrpc.KVStub(channel)
        kvs = kv.Range(etcdrpc.RangeRequest(key=key), timeout=5).kvs[0]
        assert old in kvs.value
        kv.Put(etcdrpc.PutRequest(key=key, value=kvs.value.replace(old, new),
                                  lease=kvs.lease), timeout=5)


def test_publish_bumps_the_version_with_a_valid_token(stub, n1, etcd):
    info = create(stub, "pub/seg", mode=0o664)
    lock = stub.AcquireWriter(pb.AcquireWriterRequest(caller=ALICE, name="pub/seg"))
    first = publish(stub, "pub/seg", info.id, lock.token, lock.lease_id)
    assert (first.id, first.version, first.state) == (info.id, 1, types_pb2.SEGMENT_STATE_READY)
    assert publish(stub, "pub/seg", info.id, lock.token).version == 2  # lease_id 0: unchecked
    assert get(stub, "pub/seg").version == 2
    record = etcd_get(etcd.url, b"/vas/segments/pub/seg")[0]
    assert b'"version":2' in record.value and record.create_revision == info.id

    # A chmod the coordinator has not seen (its cached record is stale) is not lost.
    etcd_rewrite(etcd.url, b"/vas/segments/pub/seg", b'"mode":%d' % 0o664,
                 b'"mode":%d' % 0o600)
    third = publish(stub, "pub/seg", info.id, lock.token, lock.lease_id)
    assert (third.version, third.mode) == (3, 0o600)

    # Wrong token or wrong lease: fenced, and nothing changes.
    for token, lease in ((lock.token + 1, lock.lease_id), (lock.token - 1, 0),
                         (lock.token, lock.lease_id + 1)):
        with pytest.raises(grpc.RpcError) as caught:
            publish(stub, "pub/seg", info.id, token, lease)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert caught.value.details() == fenced_message("pub/seg", token)
    assert get(stub, "pub/seg").version == 3

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: publish(stub, "pub/seg", 0, lock.token)) == invalid
    assert status_of(lambda: publish(stub, "pub/seg", info.id, 0)) == invalid
    assert status_of(lambda: publish(stub, "pub/seg", info.id, lock.token, -1)) == invalid
    assert status_of(lambda: publish(stub, "/bad", info.id, lock.token)) == invalid
    assert status_of(lambda: stub.PublishVersion(pb.PublishVersionRequest(
        name="pub/seg", id=info.id, token=lock.token))) == invalid
    assert get(stub, "pub/seg").version == 3

    # A segment marked DELETING still takes its writer's last publish.
    stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="pub/seg"))
    last = publish(stub, "pub/seg", info.id, lock.token, lock.lease_id)
    assert (last.version, last.state) == (4, types_pb2.SEGMENT_STATE_DELETING)


def test_publish_after_the_writer_lease_lapsed_is_fenced(stub, n1, etcd):
    info = create(stub, "lapse/seg", mode=0o664)
    acquire = lambda caller, ttl=0: stub.AcquireWriter(  # noqa: E731
        pb.AcquireWriterRequest(caller=caller, name="lapse/seg", ttl_seconds=ttl))
    # The shortest lease there is: etcd raises a TTL below its minimum (about 1.5 x the
    # election timeout, 2 s with default settings) to that minimum.
    old = acquire(ALICE, ttl=1)
    assert 1 <= old.ttl_seconds <= 5
    assert publish(stub, "lapse/seg", info.id, old.token, old.lease_id).version == 1
    wait_for(lambda: not etcd_get(etcd.url, b"/vas/writers/lapse/seg"),
             timeout=old.ttl_seconds + 15, what="the writer lease to lapse")

    with pytest.raises(grpc.RpcError) as caught:
        publish(stub, "lapse/seg", info.id, old.token, old.lease_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == fenced_message("lapse/seg", old.token)
    assert get(stub, "lapse/seg").version == 1  # the fenced publish changed nothing
    assert status_of(lambda: stub.RenewWriter(pb.RenewWriterRequest(
        name="lapse/seg", token=old.token, lease_id=old.lease_id))) \
        == grpc.StatusCode.FAILED_PRECONDITION

    new = acquire(CAROL)
    assert new.token > old.token
    assert publish(stub, "lapse/seg", info.id, new.token, new.lease_id,
                   caller=CAROL).version == 2
    # The old writer stays fenced while the new one holds the lock (taken over).
    assert status_of(lambda: publish(stub, "lapse/seg", info.id, old.token)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(lambda: publish(stub, "lapse/seg", info.id, old.token, new.lease_id)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    # ... and after the new writer releases it.
    stub.ReleaseWriter(pb.ReleaseWriterRequest(name="lapse/seg", token=new.token,
                                               lease_id=new.lease_id))
    assert status_of(lambda: publish(stub, "lapse/seg", info.id, new.token)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert get(stub, "lapse/seg").version == 2


def test_publish_on_a_deleted_or_recreated_segment_is_not_found(stub, n1):
    info = create(stub, "gone/seg", mode=0o664)
    lock = stub.AcquireWriter(pb.AcquireWriterRequest(caller=ALICE, name="gone/seg"))
    assert publish(stub, "gone/seg", info.id, lock.token).version == 1
    stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="gone/seg", finish=True))
    assert status_of(lambda: publish(stub, "gone/seg", info.id, lock.token)) \
        == grpc.StatusCode.NOT_FOUND

    again = create(stub, "gone/seg", mode=0o664)
    assert again.id != info.id and again.version == 0
    assert status_of(lambda: publish(stub, "gone/seg", info.id, lock.token)) \
        == grpc.StatusCode.NOT_FOUND
    fresh = stub.AcquireWriter(pb.AcquireWriterRequest(caller=ALICE, name="gone/seg"))
    # The old incarnation's id is NOT_FOUND even with the lock's current token ...
    assert status_of(lambda: publish(stub, "gone/seg", info.id, fresh.token)) \
        == grpc.StatusCode.NOT_FOUND
    # ... and the old token is fenced on the new segment.
    assert status_of(lambda: publish(stub, "gone/seg", again.id, lock.token)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert get(stub, "gone/seg").version == 0
    assert publish(stub, "gone/seg", again.id, fresh.token, fresh.lease_id).version == 1
    assert status_of(lambda: publish(stub, "never/seg", 1, fresh.token)) \
        == grpc.StatusCode.NOT_FOUND


def test_publishes_racing_chmods_all_land(coordinator, n1):
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        info = create(stub, "race/pub", mode=0o664)
        lock = stub.AcquireWriter(pb.AcquireWriterRequest(caller=ALICE, name="race/pub"))
    errors: list = []

    def chmods() -> None:
        with grpc.insecure_channel(coordinator.address) as channel:
            own = coordinator_pb2_grpc.CoordinatorStub(channel)
            for i in range(40):
                try:
                    own.SetSegmentMode(pb.SetSegmentModeRequest(
                        caller=ALICE, name="race/pub", mode=0o660 | (i % 2) * 4))
                except grpc.RpcError as exc:
                    errors.append(exc)

    def publishes(seen: list) -> None:
        with grpc.insecure_channel(coordinator.address) as channel:
            own = coordinator_pb2_grpc.CoordinatorStub(channel)
            for _ in range(40):
                try:
                    seen.append(publish(own, "race/pub", info.id, lock.token,
                                        lock.lease_id).version)
                except grpc.RpcError as exc:
                    errors.append(exc)

    seen: list = []
    threads = [threading.Thread(target=chmods), threading.Thread(target=publishes, args=(seen,))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert seen == list(range(1, 41))  # every publish landed once, versions only grow
    with grpc.insecure_channel(coordinator.address) as channel:
        final = get(coordinator_pb2_grpc.CoordinatorStub(channel), "race/pub")
    assert (final.version, final.mode) == (40, 0o664)


# ------------------------------------------------------------------------------- spaces

def test_spaces_create_add_remove_list_delete(stub, n1):
    create(stub, "sp/a")
    create(stub, "sp/b")
    space = stub.CreateSpace(pb.CreateSpaceRequest(caller=ALICE, name="job", mode=0o640))
    assert (space.name, space.mode, space.uid, list(space.members)) == ("job", 0o640, 1000, [])
    assert status_of(lambda: stub.CreateSpace(pb.CreateSpaceRequest(
        caller=BOB, name="job", mode=0o600))) == grpc.StatusCode.ALREADY_EXISTS
    add = lambda caller, seg, mode="r": stub.SpaceAdd(pb.SpaceAddRequest(  # noqa: E731
        caller=caller, space="job", segment=seg, mode=mode))
    add(ALICE, "sp/b", "rw")
    added = add(ALICE, "sp/a")
    assert [(m.segment, m.mode) for m in added.members] == [("sp/b", "rw"), ("sp/a", "r")]
    assert status_of(lambda: add(ALICE, "sp/a")) == grpc.StatusCode.ALREADY_EXISTS
    assert status_of(lambda: add(ALICE, "sp/missing")) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: add(ALICE, "sp/a", "x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: add(CAROL, "sp/a")) == grpc.StatusCode.PERMISSION_DENIED  # group r--
    assert stub.GetSpace(pb.GetSpaceRequest(name="job")) == added
    stub.CreateSpace(pb.CreateSpaceRequest(caller=BOB, name="jobs2", mode=0o600))
    stub.CreateSpace(pb.CreateSpaceRequest(caller=BOB, name="other", mode=0o600))
    assert [s.name for s in stub.ListSpaces(pb.ListSpacesRequest(prefix="job")).spaces] \
        == ["job", "jobs2"]
    assert len(stub.ListSpaces(pb.ListSpacesRequest()).spaces) == 3

    removed = stub.SpaceRemove(pb.SpaceRemoveRequest(caller=ALICE, space="job", segment="sp/b"))
    assert [m.segment for m in removed.members] == ["sp/a"]
    assert status_of(lambda: stub.SpaceRemove(pb.SpaceRemoveRequest(
        caller=ALICE, space="job", segment="sp/b"))) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: stub.DeleteSpace(pb.DeleteSpaceRequest(
        caller=BOB, name="job"))) == grpc.StatusCode.PERMISSION_DENIED
    stub.DeleteSpace(pb.DeleteSpaceRequest(caller=ALICE, name="job"))
    assert status_of(lambda: stub.GetSpace(pb.GetSpaceRequest(name="job"))) \
        == grpc.StatusCode.NOT_FOUND
    assert get(stub, "sp/a").name == "sp/a"  # members are not touched


# -------------------------------------------------------------------- watch and status

def test_watch_sees_puts_and_deletes_under_its_prefix(stub, n1):
    stream = stub.Watch(pb.WatchRequest(prefix="wa/"))
    try:
        first = next(stream)
        assert first.type == pb.WatchEvent.TYPE_CREATED and first.revision > 0
        info = create(stub, "wa/x")
        create(stub, "wb/ignored")
        stub.SetSegmentMode(pb.SetSegmentModeRequest(caller=ALICE, name="wa/x", mode=0o600))
        stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="wa/x"))
        stub.FinishDelete(pb.FinishDeleteRequest(name="wa/x", id=info.id))
        events = [next(stream) for _ in range(4)]
    finally:
        stream.cancel()
    kinds = [e.type for e in events]
    assert kinds == [pb.WatchEvent.TYPE_PUT] * 3 + [pb.WatchEvent.TYPE_DELETE]
    assert all(e.segment.name == "wa/x" and e.segment.id == info.id for e in events)
    assert events[0].segment.state == types_pb2.SEGMENT_STATE_READY
    assert events[1].segment.mode == 0o600
    assert events[2].segment.state == types_pb2.SEGMENT_STATE_DELETING
    assert events[3].segment.state == types_pb2.SEGMENT_STATE_DELETING  # the last record
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and revisions[0] > first.revision

    # Resumable: from an old revision the same events come again.
    replay = stub.Watch(pb.WatchRequest(prefix="wa/", start_revision=revisions[0]))
    try:
        assert next(replay).type == pb.WatchEvent.TYPE_CREATED
        assert [next(replay).revision for _ in range(4)] == revisions
    finally:
        replay.cancel()


def test_watch_event_state_follows_node_liveness(stub):
    short = register(stub, "brief", ttl=2)
    stream = stub.Watch(pb.WatchRequest(prefix="live/"))
    try:
        next(stream)
        create(stub, "live/a", home="brief")
        assert next(stream).segment.state == types_pb2.SEGMENT_STATE_READY
        stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="brief", lease_id=short.lease_id))
        wait_for(lambda: not stub.ListNodes(pb.ListNodesRequest()).nodes, what="deregistration")
        register(stub, "n1")
        # etcd sends both watches' events down one stream in revision order, so the
        # node's removal reaches the watch before the segment events below.
        create(stub, "live/b", home="n1")
        stub.SetSegmentMode(pb.SetSegmentModeRequest(caller=ALICE, name="live/a", mode=0o600))
        assert next(stream).segment.state == types_pb2.SEGMENT_STATE_READY  # live/b
        assert next(stream).segment.state == types_pb2.SEGMENT_STATE_LOST  # live/a
    finally:
        stream.cancel()


def test_watch_reports_ttl_expiry_as_delete(stub, n1):
    stream = stub.Watch(pb.WatchRequest(prefix="exp/"))
    try:
        next(stream)
        info = create(stub, "exp/seg", ttl=1)
        assert next(stream).type == pb.WatchEvent.TYPE_PUT
        gone = next(stream)  # blocks until etcd expires the lease
        assert gone.type == pb.WatchEvent.TYPE_DELETE and gone.segment.id == info.id
    finally:
        stream.cancel()


def test_cluster_status_fills_every_field(stub, n1, etcd):
    create(stub, "st/a", 4096)
    create(stub, "st/b", 3 * 4096)
    stub.CreateSpace(pb.CreateSpaceRequest(caller=ALICE, name="st", mode=0o600))
    status = stub.ClusterStatus(pb.ClusterStatusRequest())
    assert status.etcd == etcd.url and status.revision > 0
    assert [n.id for n in status.nodes] == ["n1"]
    assert (status.segments, status.segment_bytes, status.spaces) == (2, 4 * 4096, 1)


def test_health_and_reflection_are_served(coordinator):
    with grpc.insecure_channel(coordinator.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vas.v1.Coordinator"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        assert {"vas.v1.Coordinator", "grpc.health.v1.Health"} <= names


# --------------------------------------------------------------------- bounded retries

@pytest.fixture
def impatient(coordinator, etcd):
    """A second coordinator over the same etcd, served in a thread of this process with
    ``txn_attempts=1``: any compare that another coordinator's write made fail is final."""
    address, stop = f"127.0.0.1:{free_port()}", threading.Event()
    server = threading.Thread(target=serve, args=(CoordinatorConfig(
        etcd=etcd.url, listen=address, txn_attempts=1, shutdown_grace=0.5), stop))
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: status_of_safe(lambda: health.Check(
                health_pb2.HealthCheckRequest(), timeout=1)) == grpc.StatusCode.OK,
                what="the in-process coordinator to serve")
            yield coordinator_pb2_grpc.CoordinatorStub(channel)
    finally:
        stop.set()
        server.join(10)


def unavailable(call) -> str:
    """The details of the UNAVAILABLE that ``call()`` fails with."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    return info.value.details()


def test_a_conflict_in_the_last_attempt_is_unavailable(stub, n1, impatient, etcd):
    """Each read-modify-write gives up after ``txn_attempts`` failed compares with one
    message naming the operation; the failure branch's fresh record makes the next
    call succeed. ``stub`` plays the other coordinator that got there first."""
    busy = "too many concurrent changes"
    create(stub, "retry/first")  # moves /vas/alloc past what `impatient` has seen
    assert unavailable(lambda: create(impatient, "retry/seg", mode=0o664)) == \
        f"could not create segment 'retry/seg': {busy}"
    info = create(impatient, "retry/seg", mode=0o664)

    def chmod(coordinator, mode):
        return coordinator.SetSegmentMode(pb.SetSegmentModeRequest(
            caller=ALICE, name="retry/seg", mode=mode))

    chmod(stub, 0o666)  # `impatient`'s cached record is stale from here on
    assert unavailable(lambda: chmod(impatient, 0o660)) == \
        f"could not update segment 'retry/seg': {busy}"
    assert chmod(impatient, 0o660).mode == 0o660

    chmod(stub, 0o664)
    acquire = lambda: impatient.AcquireWriter(  # noqa: E731
        pb.AcquireWriterRequest(caller=ALICE, name="retry/seg"))
    assert unavailable(acquire) == f"could not lock segment 'retry/seg': {busy}"
    assert not etcd_get(etcd.url, b"/vas/writers/retry/seg")
    lock = acquire()

    chmod(stub, 0o660)
    assert unavailable(lambda: publish(impatient, "retry/seg", info.id, lock.token)) == \
        f"could not publish segment 'retry/seg': {busy}"
    assert get(stub, "retry/seg").version == 0
    assert publish(impatient, "retry/seg", info.id, lock.token).version == 1


# ------------------------------------------------------------------- process behaviour

def test_two_coordinators_share_one_etcd_and_survive_losing_one(coordinator, etcd, tmp_path):
    # `coordinator` only provides the empty keyspace; these two are this test's own.
    first = CoordinatorProcess(str(tmp_path), etcd.url, name="c1").start()
    second = CoordinatorProcess(str(tmp_path), etcd.url, name="c2").start()
    try:
        with grpc.insecure_channel(first.address) as a, \
                grpc.insecure_channel(second.address) as b, \
                grpc.insecure_channel(f"ipv4:{first.address},{second.address}") as both:
            one, two = (coordinator_pb2_grpc.CoordinatorStub(c) for c in (a, b))
            register(one, "n1")
            made = create(one, "two/a")
            assert get(two, "two/a") == made
            assert create(two, "two/b").address > made.address  # one allocator, in etcd
            assert status_of(lambda: create(one, "two/b")) == grpc.StatusCode.ALREADY_EXISTS

            # A client on both keeps creating while the first coordinator is SIGKILLed.
            either = coordinator_pb2_grpc.CoordinatorStub(both)
            created, uncertain, stop = [], [], threading.Event()

            def keep_creating() -> None:
                i = 0
                while not stop.is_set():
                    name, i = f"two/run/{i}", i + 1
                    try:
                        created.append(create(either, name, 4096).name)
                    except grpc.RpcError as exc:
                        # Only calls in flight on the dying connection fail; they may have
                        # committed before the kill.
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                        uncertain.append(name)

            worker = threading.Thread(target=keep_creating)
            worker.start()
            try:
                wait_for(lambda: len(created) >= 10, what="creates before the kill")
                first.kill()
                count = len(created)
                wait_for(lambda: len(created) >= count + 10, what="creates after the kill")
            finally:
                stop.set()
                worker.join(30)
            listed = [s.name for s in two.ListSegments(
                pb.ListSegmentsRequest(prefix="two/run/")).segments]
            assert set(created) <= set(listed) <= set(created) | set(uncertain)
            assert len(uncertain) <= 5  # calls that met the dying connection
            assert get(two, "two/a").id == made.id
    finally:
        first.stop()
        second.stop()


def test_etcd_outage_is_unavailable_and_recovers(tmp_path):
    store = EtcdProcess(str(tmp_path)).start()
    server = CoordinatorProcess(str(tmp_path), store.url).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            register(stub, "n1")
            store.stop()
            with pytest.raises(grpc.RpcError) as info:
                create(stub, "outage/a")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"etcd at {store.url} is unavailable" in info.value.details()
            store.start()  # same ports, same data
            wait_for(lambda: status_of_safe(lambda: stub.ListNodes(pb.ListNodesRequest()))
                     == grpc.StatusCode.OK, what="the coordinator to reach etcd again")
            register(stub, "n1")
            assert create(stub, "outage/a").name == "outage/a"
    finally:
        server.stop()
        store.stop()


def test_sigterm_ends_watches_and_exits_cleanly(etcd, tmp_path):
    server = CoordinatorProcess(str(tmp_path), etcd.url, name="doomed").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stream = coordinator_pb2_grpc.CoordinatorStub(channel).Watch(
                pb.WatchRequest(prefix="never/"))
            assert next(stream).type == pb.WatchEvent.TYPE_CREATED
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert list(stream) == []  # the stream ends cleanly, not with an error
            assert server.proc.wait(10) == 0
            assert time.monotonic() - started < 4  # watches did not hold up the stop
    finally:
        server.stop()


def test_delete_with_finish_removes_at_once(stub, n1, etcd):
    info = create(stub, "fin/seg")
    stub.AcquireWriter(pb.AcquireWriterRequest(caller=ALICE, name="fin/seg"))
    assert status_of(lambda: stub.DeleteSegment(pb.DeleteSegmentRequest(
        caller=BOB, name="fin/seg", finish=True))) == grpc.StatusCode.PERMISSION_DENIED
    last = stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="fin/seg",
                                                      finish=True))
    assert last.id == info.id and last.state == types_pb2.SEGMENT_STATE_DELETING
    assert status_of(lambda: get(stub, "fin/seg")) == grpc.StatusCode.NOT_FOUND
    assert not etcd_get(etcd.url, b"/vas/writers/fin/seg")
    # A marked segment can be finished the same way.
    create(stub, "fin/seg")
    stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="fin/seg"))
    stub.DeleteSegment(pb.DeleteSegmentRequest(caller=ALICE, name="fin/seg", finish=True))
    assert status_of(lambda: get(stub, "fin/seg")) == grpc.StatusCode.NOT_FOUND
