"""Nodes, watches, status and the coordinator process (real gRPC, coordinator and etcd).

Register, heartbeat, list and lease expiry of nodes; attachment reports; Watch (puts,
deletes, replay, node liveness, ttl expiry); ClusterStatus; health and reflection; two
coordinators on one etcd, an etcd outage, and SIGTERM.
How these tests call the coordinator and check it: conftest.py beside this file.
"""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator_calls import (ALICE, ROOT, MiB, create, etcd_get, get, register, status_of,
                               status_of_safe)
from vas.cluster import CoordinatorProcess, EtcdProcess
from vas.proto import coordinator_pb2 as pb, coordinator_pb2_grpc, types_pb2
from waiting import wait_for


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

    # (A record asking for replicas would turn "degraded" instead: tests/unit/test_keys.py;
    # CreateSegment refuses replicas until they are built.)
    lost = create(stub, "home/short", home="short")
    assert lost.state == types_pb2.SEGMENT_STATE_READY
    # "short" stops heart-beating: its lease lapses and it leaves the list.
    wait_for(lambda: [n.id for n in stub.ListNodes(pb.ListNodesRequest()).nodes] == ["n1"],
             what="the node lease to expire")
    assert status_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(
        node_id="short", lease_id=short.lease_id))) == grpc.StatusCode.NOT_FOUND
    assert get(stub, "home/short").state == types_pb2.SEGMENT_STATE_LOST

    # Re-registering replaces the record and ends the old lease at once.
    again = register(stub, "n1")
    assert again.lease_id != first.lease_id
    assert status_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(
        node_id="n1", lease_id=first.lease_id))) == grpc.StatusCode.NOT_FOUND
    stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1", lease_id=again.lease_id))
    assert not stub.ListNodes(pb.ListNodesRequest()).nodes
    assert not etcd_get(etcd.url, b"/vas/nodes/n1")
    stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1", lease_id=again.lease_id))


def listed(stub, include_down=True) -> dict[str, types_pb2.NodeInfo]:
    nodes = stub.ListNodes(pb.ListNodesRequest(include_down=include_down)).nodes
    return {n.id: n for n in nodes}


def test_a_lapsed_node_is_listed_down_until_removed(stub, etcd):
    register(stub, "n1", ttl=60)  # stays up however slow the machine is
    short = register(stub, "short", ttl=2)
    beat = pb.HeartbeatRequest(node_id="short", lease_id=short.lease_id, memory_used=MiB,
                               segments=1, replicas=1, replica_bytes=MiB)
    stub.Heartbeat(beat)
    assert (listed(stub)["short"].replicas, listed(stub)["short"].replica_bytes) == (1, MiB)
    copied = create(stub, "down/copied")  # homed on n1, a replica reported by "short"
    stub.ReportAttachments(pb.ReportAttachmentsRequest(
        node_id="short", lease_id=short.lease_id,
        counts=[pb.AttachmentCount(name="down/copied", id=copied.id, copy=True)]))
    create(stub, "down/homed", home="short")
    stopped = time.time()  # its last heartbeat: the lease lapses 2 s after, not before
    stub.Heartbeat(beat)
    wait_for(lambda: listed(stub)["short"].state == types_pb2.NODE_STATE_DOWN,
             what="the lapsed node listed down", timeout=10)
    down = listed(stub)["short"]
    assert stopped < down.down_since <= time.time() and down.memory_used == 0
    assert list(listed(stub, include_down=False)) == ["n1"]  # what placement etc. read
    status = stub.ClusterStatus(pb.ClusterStatusRequest())
    assert [n.id for n in status.down_nodes] == ["short"] and [n.id for n in status.nodes] == ["n1"]
    assert [ref.name for ref in status.lost] == ["down/homed"]
    assert [(ref.name, ref.id) for ref in status.degraded] == [("down/copied", copied.id)]

    def remove(node_id, caller=ROOT, force=False):
        return stub.RemoveNode(pb.RemoveNodeRequest(caller=caller, node_id=node_id,
                                                    force=force))
    assert status_of(lambda: remove("short", caller=ALICE)) == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(lambda: remove("n1")) == grpc.StatusCode.ABORTED
    assert status_of(lambda: remove("nobody")) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: remove("bad/id")) == grpc.StatusCode.INVALID_ARGUMENT
    removed = remove("short")
    assert removed.node.state == types_pb2.NODE_STATE_DOWN
    assert [(s.name, s.state) for s in removed.lost] == [("down/homed",
                                                          types_pb2.SEGMENT_STATE_LOST)]
    assert list(listed(stub)) == ["n1"] and not etcd_get(etcd.url, b"/vas/members/short")
    status = stub.ClusterStatus(pb.ClusterStatusRequest())
    assert not status.down_nodes and not status.degraded
    assert status_of(lambda: remove("short")) == grpc.StatusCode.NOT_FOUND

    # --force removes a live node: lease revoked, record and member gone.
    assert remove("n1", force=True).node.state == types_pb2.NODE_STATE_READY
    assert not listed(stub) and not etcd_get(etcd.url, b"/vas/nodes/n1")


def test_a_deregistered_node_is_not_listed_down(stub, etcd):
    gone = register(stub, "leaving")
    stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="leaving", lease_id=gone.lease_id))
    assert not listed(stub) and not etcd_get(etcd.url, b"/vas/members/leaving")


def test_a_lease_that_lapsed_while_no_coordinator_watched_is_marked_by_the_next(tmp_path):
    """The DownWatch of a coordinator that starts sweeps first: a member without a node
    key and not marked is marked then (its own etcd: the module's coordinator would
    mark it itself)."""
    store = EtcdProcess(str(tmp_path)).start()
    try:
        first = CoordinatorProcess(str(tmp_path), store.url, name="c1").start()
        with grpc.insecure_channel(first.address) as channel:
            register(coordinator_pb2_grpc.CoordinatorStub(channel), "orphan", ttl=2)
        first.kill()  # nobody watches while its lease lapses
        wait_for(lambda: not etcd_get(store.url, b"/vas/nodes/orphan"),
                 what="the lease to lapse", timeout=10)
        assert etcd_get(store.url, b"/vas/members/orphan")
        second = CoordinatorProcess(str(tmp_path), store.url, name="c2").start()
        try:
            started = time.time()
            with grpc.insecure_channel(second.address) as channel:
                two = coordinator_pb2_grpc.CoordinatorStub(channel)
                wait_for(lambda: listed(two)["orphan"].down_since >= started - 1,
                         what="the sweep to mark the node down")
                assert listed(two)["orphan"].state == types_pb2.NODE_STATE_DOWN
        finally:
            second.stop()
    finally:
        store.stop()


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


# -------------------------------------------------------------------- watch and status

def test_open_watches_leave_threads_for_other_calls(stub, n1):
    """Each Watch stream holds a server thread while it lives (an agent's wait() keeps one
    open): forty of them must not starve unary calls such as heartbeats (with 32 threads
    the 33rd stream, and every call after it, waited for one to end)."""
    streams = [stub.Watch(pb.WatchRequest(prefix="busy/"), timeout=15) for _ in range(40)]
    try:
        for stream in streams:  # established: its handler holds a thread from now on
            assert next(stream).type == pb.WatchEvent.TYPE_CREATED
        status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
        assert [n.id for n in status.nodes] == ["n1"]
    finally:
        for stream in streams:
            stream.cancel()


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
        assert {"grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_reflection_v1_is_served_for_current_grpcurl(coordinator):
    """grpc.reflection.v1, called by its raw method path (as grpcurl does): the services,
    and the file defining vas.v1.Coordinator and the v1 reflection service itself."""
    v1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    with grpc.insecure_channel(coordinator.address) as channel:
        call = channel.stream_stream(v1, request_serializer=lambda raw: raw,
                                     response_deserializer=lambda raw: raw)
        # v1 and v1alpha messages are wire-identical: v1alpha classes write and read them.
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="vas.v1.Coordinator"),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="grpc.reflection.v1.ServerReflection")]
        answers = [reflection_pb2.ServerReflectionResponse.FromString(raw) for raw in
                   call(iter(r.SerializeToString() for r in requests), timeout=5)]
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"vas.v1.Coordinator", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"} <= names
    for answer, package in zip(answers[1:], ("vas.v1", "grpc.reflection.v1")):
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in answer.file_descriptor_response.file_descriptor_proto]
        assert package in {f.package for f in files}, answer


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
