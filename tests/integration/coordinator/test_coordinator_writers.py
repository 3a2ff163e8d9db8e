"""The writer lock and publishing in the Coordinator API (real gRPC, coordinator and etcd).

Acquire, renew, release and fencing tokens; PublishVersion with valid, stale and lapsed
tokens, on deleted and re-created segments, racing chmods; and the bounded retries of
every read-modify-write (a second, in-process coordinator with ``txn_attempts=1``).
How these tests call the coordinator and check it: conftest.py beside this file.
"""
from __future__ import annotations

import threading

import grpc
import pytest
from etcd3 import etcdrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator_calls import (ALICE, BOB, CAROL, create, etcd_get, get, status_of,
                               status_of_safe)
from vas.cluster import free_port
from vas.coordinator.config import CoordinatorConfig
from vas.coordinator.server import serve
from vas.proto import coordinator_pb2 as pb, coordinator_pb2_grpc, types_pb2
from waiting import wait_for


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


def test_publish_on_a_base_is_a_compare_and_set(stub, n1, etcd):
    """With base_version, PublishVersion bumps only a record at that version (else
    ABORTED, nothing changes), decided on the record itself: a version moved behind the
    coordinator's back (its cached record stale) is neither refused nor taken on a guess."""
    info = create(stub, "pub/cas", mode=0o664)
    lock = stub.AcquireWriter(pb.AcquireWriterRequest(caller=ALICE, name="pub/cas"))

    def on(base: int):
        return stub.PublishVersion(pb.PublishVersionRequest(
            caller=ALICE, name="pub/cas", id=info.id, token=lock.token,
            lease_id=lock.lease_id, base_version=base))

    assert on(0).version == 1
    with pytest.raises(grpc.RpcError) as caught:
        on(0)
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.ABORTED, "segment pub/cas: publish based on version 0 refused: the "
        "segment is at version 1 (an earlier sync of this writer was published since)")
    etcd_rewrite(etcd.url, b"/vas/segments/pub/cas", b'"version":1', b'"version":5')
    assert on(5).version == 6  # cached 1, really 5: read again, not refused
    etcd_rewrite(etcd.url, b"/vas/segments/pub/cas", b'"version":6', b'"version":8')
    assert status_of(lambda: on(6)) == grpc.StatusCode.ABORTED  # cached 6, really 8
    assert get(stub, "pub/cas").version == 8


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
