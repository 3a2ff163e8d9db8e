"""The node agent's local protocol, over its socket: real etcd, coordinator and agent processes.

Hello and the gRPC port beside the socket; create and its input checks; attach modes,
the busy writer, detach, and the attachment reports; permissions from the identity
seen on the socket; requests forwarded to the coordinator (list, nodes, status,
spaces); garbage on the socket; the attach+detach latency as a client process sees it.
The client is local_client.Local, a few lines over vas.core.wire and local_pb2, so these
tests pin the protocol itself; the cluster fixtures are in conftest.py beside this file.
"""
from __future__ import annotations

import math
import mmap
import os
import random
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from local_client import MiB, PS, WAIT, Local, child, connect, gone, wait_for
from vas import _native
from vas.core import errors, wire
from vas.proto import LOCAL_PROTOCOL, coordinator_pb2, local_pb2, types_pb2


# ---------------------------------------------------------------- basics

def test_hello_reports_the_node_and_the_caller_seen_on_the_socket(node1, client):
    hello = client.hello()
    assert hello.protocol == LOCAL_PROTOCOL
    assert hello.node.id == "node1" and hello.node.socket == node1.socket
    assert hello.node.address == node1.address and hello.node.memory_total == 64 * MiB
    assert (hello.caller.uid, hello.caller.gid, hello.caller.pid) == (
        os.getuid(), os.getgid(), os.getpid())
    assert hello.caller.node == "node1"
    with pytest.raises(errors.InvalidArgument, match="unsupported local protocol 99"):
        client.call(hello=local_pb2.HelloRequest(protocol=99))


def test_grpc_port_serves_health_and_reflection(node1):
    with grpc.insecure_channel(node1.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vas.v1.Node"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status \
                == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert {"vas.v1.Node", "grpc.health.v1.Health"} <= set(services)
        # grpc.reflection.v1 (what current grpcurl asks for), by its raw method path; the
        # v1 messages are wire-identical to the v1alpha ones that write and read them here.
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        answer = next(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                           timeout=10))
        assert {"vas.v1.Node", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} \
            <= {s.name for s in answer.list_services_response.service}


def test_socket_file_is_open_to_everyone(node1):
    assert os.stat(node1.socket).st_mode & 0o777 == 0o666


def test_create_then_write_and_read_from_other_processes(node1, client, name):
    info = client.create(name, 3 * PS + 1, mode=0o640)
    assert (info.name, info.size, info.mode, info.home) == (name, 4 * PS, 0o640, "node1")
    assert (info.uid, info.gid) == (os.getuid(), os.getgid())
    assert info.id > 0 and info.address > 0 and info.address % (2 * MiB) == 0
    assert info.state == types_pb2.SEGMENT_STATE_READY
    writer = child("""
        import json, sys
        from vas import _native
        c = Local(sys.argv[1])
        attach, fd = c.attach(sys.argv[2], "rw")
        m = _native.mmap(fd, attach.segment.size, writable=True)
        os.close(fd)
        memoryview(m)[:11] = b"hello world"
        memoryview(m)[-3:] = b"end"
        m.close()
        c.detach(attach.attachment_id)
        print(json.dumps({"writable": attach.writable, "token": attach.token,
                          "id": attach.segment.id}))
    """, node1.socket, name)
    assert writer["writable"] is True and writer["token"] > 0 and writer["id"] == info.id
    reader = child("""
        import json, mmap, sys
        c = Local(sys.argv[1])
        attach, fd = c.attach(sys.argv[2])
        with mmap.mmap(fd, attach.segment.size, prot=mmap.PROT_READ) as m:
            data = [m[:11].decode(), m[-3:].decode()]
        os.close(fd)
        print(json.dumps({"data": data, "writable": attach.writable, "token": attach.token}))
    """, node1.socket, name)
    assert reader == {"data": ["hello world", "end"], "writable": False, "token": 0}


def test_create_checks_its_input_before_anything_reaches_the_coordinator(client, name):
    client.create(name, PS)
    with pytest.raises(errors.AlreadyExists):
        client.create(name, PS)
    assert client.create(name, 2 * PS, exist_ok=True).size == PS  # the existing record
    for bad, message in [
            (dict(name="", size=PS), "invalid segment name"),
            (dict(name="/abs", size=PS), "must not start with '/'"),
            (dict(name="a/../b", size=PS), "'..' component"),
            (dict(name="sp ace", size=PS), "only A-Z"),
            (dict(name="x" * 256, size=PS), "longer than 255"),
            (dict(name="ok", size=0), "must be > 0"),
            (dict(name="ok", size=(1 << 64) - 1), "larger than the maximum"),
            (dict(name="ok", size=PS, mode=0o1777), "invalid mode"),
            (dict(name="ok", size=PS, mode=(1 << 32) - 1), "invalid mode"),
            (dict(name="ok", size=PS, ttl=-1.0), "invalid ttl"),
            (dict(name="ok", size=PS, ttl=math.nan), "invalid ttl"),
            (dict(name="ok", size=PS, ttl=math.inf), "invalid ttl")]:
        with pytest.raises(errors.InvalidArgument, match=message):
            client.create(**bad)
    assert gone(client, "ok")


# ---------------------------------------------------------------- attach modes and the busy writer

def test_r_attach_passes_a_read_only_fd(client, name):
    client.create(name, 2 * PS)
    attach, fd = client.attach(name, "r")
    try:
        assert not attach.writable and attach.token == 0 and attach.fd_offset == 0
        assert os.fstat(fd).st_size == 2 * PS
        with pytest.raises(PermissionError):
            _native.mmap(fd, 2 * PS, writable=True)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, 2 * PS, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError):
            os.write(fd, b"x")
        _native.mmap(fd, 2 * PS, writable=False).close()
    finally:
        os.close(fd)
        client.detach(attach.attachment_id)


def test_second_rw_attach_is_busy_until_the_first_detaches(node1, client, name):
    client.create(name, PS)
    first, fd = client.attach(name, "rw")
    os.close(fd)
    other = connect(node1)
    try:
        with pytest.raises(errors.Busy):
            other.attach(name, "rw")
        with pytest.raises(errors.Busy):
            client.attach(name, "rw")  # the same connection gets no second writer either
        reader, fd = other.attach(name, "r")  # readers are not blocked
        os.close(fd)
        other.detach(reader.attachment_id)
        client.detach(first.attachment_id)
        second, fd = other.attach(name, "rw")
        os.close(fd)
        assert second.token > first.token  # fencing tokens only grow
        other.detach(second.attachment_id)
    finally:
        other.close()


def test_detach_only_knows_this_connections_attachments(node1, client, name):
    client.create(name, PS)
    attach, fd = client.attach(name)
    os.close(fd)
    other = connect(node1)
    try:
        with pytest.raises(errors.NotFound, match=f"no attachment {attach.attachment_id} "):
            other.detach(attach.attachment_id)
    finally:
        other.close()
    client.detach(attach.attachment_id)
    with pytest.raises(errors.NotFound):
        client.detach(attach.attachment_id)


def test_a_detach_with_no_reply_gets_none_and_the_next_request_is_answered(client, name):
    client.create(name, PS)
    attach, fd = client.attach(name)
    os.close(fd)
    for attachment_id in (attach.attachment_id, attach.attachment_id):  # the 2nd: unknown
        wire.send_message(client.sock, local_pb2.LocalRequest(
            id=next(client.ids), detach=local_pb2.DetachRequest(
                attachment_id=attachment_id, no_reply=True)))
    assert client.stat(name).name == name  # the answer to this request, not to the detaches
    wait_for(lambda: client.stat(name).attachments == 0, "the detach counted")
    with pytest.raises(errors.NotFound):
        client.detach(attach.attachment_id)


def test_revalidate_says_which_attachments_a_fresh_attach_would_map(node1, client, name):
    client.create(name, PS)
    reader, fd = client.attach(name)
    os.close(fd)
    writer, fd = client.attach(name, "rw")
    os.close(fd)

    def revalidate(ids, space=""):
        return client.call(revalidate=local_pb2.RevalidateRequest(
            attachment_ids=ids, space=space))[0].revalidate

    answers = revalidate([reader.attachment_id, writer.attachment_id, 1 << 60]).attachments
    assert [(a.attachment_id, a.current, a.version) for a in answers] == [
        (reader.attachment_id, True, 0), (writer.attachment_id, False, 0), (1 << 60, False, 0)]
    assert "only \"r\" attachments" in answers[1].reason
    assert answers[2].reason == f"no attachment {1 << 60} on this connection"
    client.detach(writer.attachment_id)
    with pytest.raises(errors.InvalidArgument, match="at most 1024 per request"):
        revalidate(list(range(1, 1026)))
    with pytest.raises(errors.InvalidArgument):
        revalidate([], "/bad")
    with pytest.raises(errors.NotFound, match="space 'no/such' not found"):
        revalidate([reader.attachment_id], "no/such")

    # Asked for, the change counter page comes along: the answer about a home segment
    # holds at the counter read before it, which the page shows until a change.
    response, fds = client.call(revalidate=local_pb2.RevalidateRequest(
        attachment_ids=[reader.attachment_id], counter_page=True))
    assert len(fds) == 1
    page = _native.mmap(fds[0], PS, writable=False)
    os.close(fds[0])
    with memoryview(page) as raw, raw.cast("B") as octets, octets[:8].cast("Q") as counter:
        generation = response.revalidate.generation
        assert generation and counter[0] == generation
        client.delete(name)  # attached: deleting, so a fresh attach would fail
        assert counter[0] > generation  # moved before the delete was answered
        response, fds = client.call(revalidate=local_pb2.RevalidateRequest(
            attachment_ids=[reader.attachment_id]))
        assert fds == [] and generation < response.revalidate.generation <= counter[0]
    page.close()
    answer = response.revalidate.attachments[0]
    assert not answer.current and answer.reason == f"segment {name} is being deleted"
    client.detach(reader.attachment_id)


def test_attachments_are_reported_to_the_coordinator(client, name):
    client.create(name, PS)
    attachments = []
    for _ in range(3):
        attach, fd = client.attach(name)
        os.close(fd)
        attachments.append(attach.attachment_id)
    wait_for(lambda: client.stat(name).attachments == 3, "3 reported attachments")
    for attachment_id in attachments:
        client.detach(attachment_id)
    wait_for(lambda: client.stat(name).attachments == 0, "0 reported attachments")


# ---------------------------------------------------------------- permissions

def test_permissions_follow_mode_bits_of_the_socket_identity(node1, client, name):
    client.create(name, PS, mode=0o600)
    probe = """
        import json, sys
        from vas.core import errors
        os.setgroups([]); os.setgid(65534); os.setuid(65534)   # after the imports
        c = Local(sys.argv[1])
        out = {"uid": c.hello().caller.uid}
        for mode in ("r", "rw"):
            try:
                attach, fd = c.attach(sys.argv[2], mode)
                os.close(fd)
                c.detach(attach.attachment_id)
                out[mode] = "ok"
            except errors.VasError as exc:
                out[mode] = type(exc).__name__
        for what, call in [
                ("chmod", lambda: c.call(
                    chmod=local_pb2.ChmodRequest(name=sys.argv[2], mode=0o666))),
                ("delete", lambda: c.delete(sys.argv[2]))]:
            try:
                call()
                out[what] = "ok"
            except errors.VasError as exc:
                out[what] = type(exc).__name__
        print(json.dumps(out))
    """
    assert child(probe, node1.socket, name) == {
        "uid": 65534, "r": "PermissionDenied", "rw": "PermissionDenied",
        "chmod": "PermissionDenied", "delete": "PermissionDenied"}
    client.call(chmod=local_pb2.ChmodRequest(name=name, mode=0o644))
    assert child(probe, node1.socket, name) == {
        "uid": 65534, "r": "ok", "rw": "PermissionDenied",
        "chmod": "PermissionDenied", "delete": "PermissionDenied"}
    client.call(chown=local_pb2.ChownRequest(name=name, uid=65534, gid=65534))
    assert child(probe, node1.socket, name) == {
        "uid": 65534, "r": "ok", "rw": "ok", "chmod": "ok", "delete": "ok"}


def test_a_connection_serves_only_the_process_that_opened_it(node1, client, name):
    """Its opener's identity (SO_PEERCRED at connect) decides what a request may do:
    a connection handed to another process (here one that then became nobody) must
    not lend it. Every request names its sender (SCM_CREDENTIALS); another's is refused."""
    client.create(name, PS, mode=0o600)
    probe = """
        import json, socket, sys
        from vas.core import errors
        os.setgroups([]); os.setgid(65534); os.setuid(65534)   # after the imports
        c = Local.__new__(Local)
        c.sock, c.ids = socket.socket(fileno=int(sys.argv[1])), itertools.count(100)
        out = {"pid": os.getpid()}
        for what, call in [("hello", c.hello), ("delete", lambda: c.delete(sys.argv[2]))]:
            try:
                call()
                out[what] = "ok"
            except errors.VasError as exc:
                out[what] = [type(exc).__name__, exc.message]
        c.sock.detach()
        print(json.dumps(out))
    """
    fd = client.sock.fileno()
    out = child(probe, str(fd), name, pass_fds=[fd])
    refusal = ["PermissionDenied", f"request from pid {out['pid']} on a connection opened by "
               f"pid {os.getpid()}: a connection serves only the process that opened it; "
               "connect from this process"]
    assert out == {"pid": out["pid"], "hello": refusal, "delete": refusal}
    assert client.stat(name).name == name  # not deleted
    assert client.hello().caller.pid == os.getpid()  # the opener is still served


# ---------------------------------------------------------------- forwarding

def test_list_nodes_status_and_spaces_are_forwarded(node1, node2, client, name):
    for i in range(5):
        client.create(f"{name}/{i}", PS)
    names, token = [], ""
    while True:
        page = client.call(list=coordinator_pb2.ListSegmentsRequest(
            prefix=f"{name}/", page_size=2, page_token=token))[0].list
        assert len(page.segments) <= 2
        names += [s.name for s in page.segments]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"{name}/{i}" for i in range(5)]
    nodes = client.call(nodes=coordinator_pb2.ListNodesRequest())[0].nodes.nodes
    assert {"node1", "node2"} <= {n.id for n in nodes}
    status = client.call(status=coordinator_pb2.ClusterStatusRequest())[0].status
    assert status.segments >= 5 and status.revision > 0

    space = f"{name}-space"
    info = client.call(space=local_pb2.LocalSpaceRequest(
        create=coordinator_pb2.CreateSpaceRequest(name=space, mode=0o640)))[0].space_info
    assert (info.name, info.mode, info.uid) == (space, 0o640, os.getuid())
    info = client.call(space=local_pb2.LocalSpaceRequest(add=coordinator_pb2.SpaceAddRequest(
        space=space, segment=f"{name}/0", mode="rw")))[0].space_info
    assert [(m.segment, m.mode) for m in info.members] == [(f"{name}/0", "rw")]
    spaces = client.call(space=local_pb2.LocalSpaceRequest(
        list=coordinator_pb2.ListSpacesRequest(prefix=space)))[0].spaces.spaces
    assert [s.name for s in spaces] == [space]
    client.call(space=local_pb2.LocalSpaceRequest(remove=coordinator_pb2.SpaceRemoveRequest(
        space=space, segment=f"{name}/0")))
    client.call(space=local_pb2.LocalSpaceRequest(
        delete=coordinator_pb2.DeleteSpaceRequest(name=space)))
    with pytest.raises(errors.NotFound):
        client.call(space=local_pb2.LocalSpaceRequest(
            get=coordinator_pb2.GetSpaceRequest(name=space)))
    with pytest.raises(errors.VasError, match="unknown space operation"):
        client.call(space=local_pb2.LocalSpaceRequest())


# ---------------------------------------------------------------- robustness

def open_fds(pid: int) -> dict[str, str]:
    """fd -> what it points at, of process ``pid``."""
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            pass
    return fds


def test_garbage_never_crashes_the_agent(node1, client, name):
    client.hello()  # a round trip: the agent has accepted this connection
    fds_before = open_fds(node1.pid)
    raw = wire.new_socket()
    raw.connect(node1.socket)

    def exchange(data: bytes, fds=()):
        if fds:
            raw.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  __import__("array").array("i", fds))])
        else:
            raw.send(data)
        response, got = wire.recv_message(raw, local_pb2.LocalResponse)
        assert not got
        return response

    garbage = [b"\xff" * 64, b"\x08", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05hello",
               *(random.Random(seed).randbytes(n) for seed in range(50) for n in (7, 300, 4096))]
    for data in garbage:
        response = exchange(data)
        assert response.code in (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                 grpc.StatusCode.UNIMPLEMENTED.value[0]), (data, response)
    # fds sent with a request are closed, not kept
    pipe_r, pipe_w = os.pipe()
    exchange(b"\xff\xff", [pipe_r, pipe_w, pipe_r])
    os.close(pipe_r)
    os.close(pipe_w)
    # an unknown oneof member (field 99, as a newer client would send) and an empty body
    unknown = local_pb2.LocalRequest(id=7).SerializeToString() + b"\x9a\x06\x00"
    response = exchange(unknown)
    assert (response.id, response.code) == (7, grpc.StatusCode.UNIMPLEMENTED.value[0])
    response = exchange(local_pb2.LocalRequest(id=8).SerializeToString())
    assert (response.id, response.code) == (8, grpc.StatusCode.UNIMPLEMENTED.value[0])
    response = exchange(local_pb2.LocalRequest(
        hello=local_pb2.HelloRequest(protocol=1)).SerializeToString())
    assert (response.id, response.code, response.message) == (
        0, grpc.StatusCode.INVALID_ARGUMENT.value[0], "request id must not be 0")
    # a datagram over the 4 MiB limit
    big = local_pb2.LocalRequest(id=9, create=local_pb2.CreateRequest(
        name="x" * (wire.MAX_MESSAGE + 100)))
    try:
        raw.send(big.SerializeToString())
    except OSError:
        pass  # the kernel may refuse it on our side already
    else:
        response, _ = wire.recv_message(raw, local_pb2.LocalResponse)
        assert response.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "larger than" in response.message
    # extreme values in well-formed requests
    bad_requests = [
        local_pb2.LocalRequest(id=10, create=local_pb2.CreateRequest(name="\x00", size=PS)),
        local_pb2.LocalRequest(id=11, create=local_pb2.CreateRequest(name="é", size=PS)),
        local_pb2.LocalRequest(id=12, create=local_pb2.CreateRequest(name="z", size=(1 << 64) - 1)),
        local_pb2.LocalRequest(id=13, create=local_pb2.CreateRequest(
            name="z", size=PS, ttl_seconds=-1e308)),
        local_pb2.LocalRequest(id=14, attach=local_pb2.AttachRequest(name=name, mode="w")),
        local_pb2.LocalRequest(id=15, attach=local_pb2.AttachRequest(name=name, mode="r",
                                                                     fetch="never")),
        local_pb2.LocalRequest(id=16, detach=local_pb2.DetachRequest(attachment_id=(1 << 64) - 1)),
        local_pb2.LocalRequest(id=17, chmod=local_pb2.ChmodRequest(name=name, mode=(1 << 32) - 1)),
        local_pb2.LocalRequest(id=18, stat=coordinator_pb2.GetSegmentRequest(name="../x")),
        local_pb2.LocalRequest(id=(1 << 64) - 1, delete=local_pb2.DeleteRequest(name="")),
        local_pb2.LocalRequest(id=19, space=local_pb2.LocalSpaceRequest(
            add=coordinator_pb2.SpaceAddRequest(space="s", segment="x", mode="rwx"))),
    ]
    for request in bad_requests:
        response = exchange(request.SerializeToString())
        assert response.id == request.id
        assert response.code in (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                 grpc.StatusCode.NOT_FOUND.value[0]), (request, response)
        assert "\n" not in response.message
    # a client that sends and vanishes without reading
    for _ in range(20):
        s = wire.new_socket()
        s.connect(node1.socket)
        s.send(local_pb2.LocalRequest(id=1, hello=local_pb2.HelloRequest(
            protocol=LOCAL_PROTOCOL)).SerializeToString())
        s.close()
    raw.close()
    # still serving, and nothing leaked
    assert client.hello().protocol == LOCAL_PROTOCOL
    client.create(name, PS)
    attach, fd = client.attach(name)
    os.close(fd)
    client.detach(attach.attachment_id)
    client.delete(name)
    deadline = time.monotonic() + WAIT
    while len(open_fds(node1.pid)) > len(fds_before):
        now = open_fds(node1.pid)
        assert time.monotonic() < deadline, f"agent fds before {fds_before}, now {now}"
        time.sleep(0.05)


# ---------------------------------------------------------------- performance

def test_attach_detach_p50_is_under_300us(node1, name):
    """Measured from a separate client process, as users see it (r attach of a home segment).

    The machine may be busy with other work, so the best median of up to five runs
    counts (as timeit takes the best of its repeats); beside it, the same process
    measures two round trips to a trivial Python echo process over the same kind of
    socket, the floor any local protocol in Python pays.
    """
    c = Local(node1.socket)
    c.create(name, MiB)
    c.close()
    result = child("""
        import json, socket, statistics, sys, time

        def median_us(call, rounds=1200, warmup=200):
            samples = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                call()
                samples.append((time.perf_counter() - t0) * 1e6)
            samples = sorted(samples[warmup:])
            return statistics.median(samples), samples[int(0.99 * len(samples))]

        c = Local(sys.argv[1])
        def attach_detach():
            attach, fd = c.attach(sys.argv[2])
            os.close(fd)
            c.detach(attach.attachment_id)

        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.fork() == 0:
            here.close()
            while data := there.recv(65536):
                there.send(data)
            os._exit(0)
        def two_echoes():
            for _ in range(2):
                here.send(b"x" * 64)
                here.recv(65536)

        runs = []
        for _ in range(5):
            p50, p99 = median_us(attach_detach)
            floor, _ = median_us(two_echoes)
            runs.append({"p50": p50, "p99": p99, "echo_floor": floor})
            if p50 <= 200:
                break
        print(json.dumps(runs))
    """, node1.socket, name)
    for run in result:
        print(f"attach+detach p50 {run['p50']:.0f} us, p99 {run['p99']:.0f} us "
              f"(2 Python echo round trips: {run['echo_floor']:.0f} us)")
    assert min(run["p50"] for run in result) <= 300, result
