"""Segments and spaces in the Coordinator API (real gRPC, coordinator and etcd).

Create, get and list in pages; input checks; address allocation; racing creates;
chmod/chown; delete (marked, then finished, or finished at once); ttl expiry; spaces.
How these tests call the coordinator and check it: conftest.py beside this file.
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from coordinator_calls import (ALICE, BOB, CAROL, MiB, ROOT, create, etcd_get, get,
                               status_of, status_of_safe)
from vas.proto import coordinator_pb2 as pb, coordinator_pb2_grpc, types_pb2
from waiting import wait_for

WINDOW = (0x2000_0000_0000, 0x3000_0000_0000)


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


def test_create_refuses_replicas_without_nodes_to_keep_them(stub, n1, etcd):
    """replicas=k needs k live nodes besides the home with room: refused, nothing stored."""
    with pytest.raises(grpc.RpcError) as info:
        create(stub, "replicated", replicas=1)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("replicas=1: only 0 of the live nodes other than "
                                           "the home 'n1' have ")
    assert not etcd_get(etcd.url, b"/vas/segments/replicated")
    assert status_of(lambda: create(stub, "replicated", replicas=17)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert create(stub, "replicated", replicas=0).replicas == 0


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
