"""The node agent over its local socket: real etcd, coordinator and agent processes.

The client here is a few lines over vas.core.wire and local_pb2 (``LOCAL_CLIENT``), so
these tests pin the local protocol itself; child processes run the same code.
Children that must act as another uid import everything first and then drop
privileges: SO_PEERCRED records the identity at connect().
"""
from __future__ import annotations

import functools
import json
import math
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import etcd3
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

import waiting
from vas import _native
from vas.cluster import CoordinatorProcess, EtcdProcess, NodeProcess
from vas.core import errors, wire
from vas.proto import LOCAL_PROTOCOL, coordinator_pb2, coordinator_pb2_grpc, local_pb2, types_pb2

MiB = 1 << 20
PS = _native.PAGE_SIZE
WAIT = 20.0  # seconds: bound of every wait for a condition
wait_for = functools.partial(waiting.wait_for, timeout=WAIT)
PYTHON = [sys.executable]

# The tiny local-protocol client used by the tests and by their child processes.
LOCAL_CLIENT = textwrap.dedent('''
    import itertools, os, socket
    from vas.core import errors, wire
    from vas.proto import LOCAL_PROTOCOL, local_pb2, coordinator_pb2

    class Local:
        """One connection to an agent; ``call`` raises the vas exception of a failed request."""

        def __init__(self, path):
            self.sock = wire.new_socket()
            self.sock.connect(path)
            self.ids = itertools.count(1)

        def close(self):
            self.sock.close()

        def call(self, **body):
            request = local_pb2.LocalRequest(id=next(self.ids), **body)
            wire.send_message(self.sock, request)
            response, fds = wire.recv_message(self.sock, local_pb2.LocalResponse)
            assert response is not None, "agent closed the connection"
            assert response.id == request.id, (response.id, request.id)
            if response.code:
                for fd in fds:
                    os.close(fd)
                raise errors.from_status(errors.status_code(response.code), response.message)
            return response, fds

        def hello(self):
            return self.call(hello=local_pb2.HelloRequest(protocol=LOCAL_PROTOCOL))[0].hello

        def create(self, name, size, mode=0o600, ttl=0.0, exist_ok=False):
            return self.call(create=local_pb2.CreateRequest(
                name=name, size=size, mode=mode, ttl_seconds=ttl, exist_ok=exist_ok))[0].segment

        def attach(self, name, mode="r"):
            """-> (AttachResponse, fd). Claims write-protect support for "rw" (a home
            "rw" attach is refused without) but never registers a mapping
            (RegisterFaults): these tests exercise the lock, not its revocation."""
            response, fds = self.call(attach=local_pb2.AttachRequest(
                name=name, mode=mode, write_protect_support=mode == "rw"))
            assert len(fds) == 1, fds
            return response.attach, fds[0]

        def detach(self, attachment_id):
            self.call(detach=local_pb2.DetachRequest(attachment_id=attachment_id))

        def stat(self, name):
            return self.call(stat=coordinator_pb2.GetSegmentRequest(name=name))[0].segment

        def delete(self, name, force=False):
            return self.call(delete=local_pb2.DeleteRequest(name=name, force=force))[0].segment
''')
namespace: dict = {}
exec(LOCAL_CLIENT, namespace)
Local = namespace["Local"]


# ---------------------------------------------------------------- processes

def start_node(coordinator: str, directory: str, node_id: str, memory: int) -> NodeProcess:
    return NodeProcess(directory, coordinator, node_id=node_id, memory=memory).start()


def connect(node: NodeProcess) -> Local:
    return Local(node.socket)


@pytest.fixture(scope="module")
def workdir(module_dir):
    return module_dir  # world-traversable: children that drop to another uid reach sockets


@pytest.fixture(scope="module")
def etcd(workdir):
    process = EtcdProcess(workdir).start()
    yield process.url
    process.stop()


@pytest.fixture(scope="module")
def etcd_kv(etcd):
    """A direct etcd client: an oracle independent of the coordinator (coordinator/keys.py)."""
    client = etcd3.client("127.0.0.1", int(etcd.rsplit(":", 1)[1]))
    yield client
    client.close()


@pytest.fixture(scope="module")
def coordinator(etcd, workdir):
    process = CoordinatorProcess(workdir, etcd).start()
    yield process.address
    process.stop()


@pytest.fixture(scope="module")
def node1(coordinator, workdir):
    node = start_node(coordinator, workdir, "node1", 64 * MiB)
    yield node
    assert node.stop() == 0


@pytest.fixture(scope="module")
def node2(coordinator, workdir):
    node = start_node(coordinator, workdir, "node2", 64 * MiB)
    yield node
    assert node.stop() == 0


@pytest.fixture
def client(node1):
    c = connect(node1)
    yield c
    c.close()


@pytest.fixture
def name(request):
    """A segment name unique to the test."""
    return "t/" + request.node.name.replace("[", ".").replace("]", "")


@pytest.fixture
def coordinator_stub(coordinator):
    with grpc.insecure_channel(coordinator) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)


def child(code: str, *args: str, timeout: float = 60) -> dict:
    """Run LOCAL_CLIENT + ``code`` in a new Python; it prints one JSON line, returned parsed."""
    proc = subprocess.run([*PYTHON, "-c", LOCAL_CLIENT + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/")
    assert proc.returncode == 0, f"child failed ({proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gone(client, name: str) -> bool:
    try:
        client.stat(name)
    except errors.NotFound:
        return True
    return False


def used(client) -> int:
    return client.hello().node.memory_used


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


def test_capacity_is_enforced_by_the_agent(coordinator, workdir):
    small = start_node(coordinator, workdir, "small", 8 * MiB)
    try:
        c = connect(small)
        c.create("cap/a", 6 * MiB)
        assert used(c) == 6 * MiB
        with pytest.raises(errors.CapacityExceeded) as err:
            c.create("cap/b", 3 * MiB)
        assert str(err.value) == (f"node small has no room for segment cap/b of {3 * MiB} bytes: "
                                  f"{2 * MiB} of {8 * MiB} bytes free")
        assert gone(c, "cap/b")  # refused before the coordinator saw it
        c.create("cap/b", 2 * MiB)
        c.delete("cap/a")
        c.create("cap/c", 6 * MiB)
        assert used(c) == 8 * MiB
    finally:
        small.stop()


# ---------------------------------------------------------------- attach modes and the writer lock

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


def test_a_dead_client_releases_its_writer_lock_at_once(node1, client, name):
    client.create(name, PS)
    holder = subprocess.Popen(
        [*PYTHON, "-c", LOCAL_CLIENT + textwrap.dedent("""
            import sys
            c = Local(sys.argv[1])
            attach, fd = c.attach(sys.argv[2], "rw")
            print("held", flush=True)
            sys.stdin.readline()
        """), node1.socket, name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(errors.Busy):
            client.attach(name, "rw")
        holder.kill()
        holder.wait(10)
        started = time.monotonic()

        def attach_rw():
            try:
                return client.attach(name, "rw")
            except errors.Busy:
                return None
        attach, fd = wait_for(attach_rw, "the writer lock of a killed client", timeout=3)
        # Well inside the 10 s writer lease: the agent saw the socket close.
        assert time.monotonic() - started < 3
        os.close(fd)
        client.detach(attach.attachment_id)
    finally:
        holder.kill()
        holder.wait(10)


def test_the_agent_keeps_a_writer_lease_alive_while_attached(etcd_kv, node1, client, name):
    client.create(name, PS)
    attach, fd = client.attach(name, "rw")
    os.close(fd)
    assert attach.keepalive_seconds == 10 / 3  # a third of the writer lease
    _, meta = etcd_kv.get(f"/vas/writers/{name}")
    assert meta.create_revision == attach.token  # the fencing token is the lock's revision
    # Longer than the 10 s writer lease: it lives only if renewed, which the agent
    # does while the client shows it is alive (as vas.Client's keepalive thread does).
    end = time.monotonic() + 11
    while time.monotonic() < end:
        client.call(keepalive=local_pb2.KeepAliveRequest())
        time.sleep(1)
    lease = etcd_kv.get_lease_info(meta.lease_id)
    assert lease.grantedTTL == 10 and lease.TTL >= 5, lease  # renewed every ttl/3
    assert etcd_kv.get(f"/vas/writers/{name}")[1].create_revision == attach.token
    other = connect(node1)
    with pytest.raises(errors.Busy):
        other.attach(name, "rw")
    other.close()
    client.detach(attach.attachment_id)
    assert etcd_kv.get(f"/vas/writers/{name}")[0] is None  # released at detach, not at expiry


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


# ---------------------------------------------------------------- deletion and lifetime

def test_delete_while_attached_frees_at_the_last_detach(client, name):
    client.create(name, 4 * MiB)
    before = used(client)
    first, fd1 = client.attach(name)
    second, fd2 = client.attach(name)
    deleted = client.delete(name)
    assert deleted.state == types_pb2.SEGMENT_STATE_DELETING
    assert client.stat(name).state == types_pb2.SEGMENT_STATE_DELETING
    with pytest.raises(errors.NotFound, match="being deleted"):
        client.attach(name)
    client.detach(first.attachment_id)
    assert not gone(client, name) and used(client) == before
    with mmap.mmap(fd2, PS, prot=mmap.PROT_READ) as m:  # still mapped and readable
        assert m[:1] == b"\0"
    client.detach(second.attachment_id)
    wait_for(lambda: gone(client, name), "the record to go at the last detach")
    assert used(client) == before - 4 * MiB
    assert os.fstat(fd1).st_blocks == 0  # pages given back though this process holds an fd
    os.close(fd1)
    os.close(fd2)
    client.create(name, 4 * MiB)  # the name is free again
    client.delete(name)


def test_a_deleted_name_is_free_when_delete_returns(node2, client, name):
    """Whether the delete is made at the home or through another node (which asks the
    home with Node.ReleaseSegment), it returns only once the record is gone."""
    other = connect(node2)
    try:
        for i in range(20):
            client.create(name, PS)
            (client if i % 2 else other).delete(name)
    finally:
        other.close()
    client.create(name, PS)


def test_force_delete_frees_at_once(client, name):
    client.create(name, 4 * MiB)
    before = used(client)
    attach, fd = client.attach(name, "rw")
    with mmap.mmap(fd, 4 * MiB) as m:
        m[:4] = b"live"
        client.delete(name, force=True)
        assert gone(client, name)
        assert used(client) == before - 4 * MiB
        assert m[:4] == b"\0\0\0\0"  # revoked: the pages were punched out
    os.close(fd)
    client.detach(attach.attachment_id)  # the stale attachment detaches cleanly
    client.create(name, PS)  # and the writer lock went with it
    attach, fd = client.attach(name, "rw")
    os.close(fd)
    client.detach(attach.attachment_id)


def test_ttl_expiry_frees_the_segment(client, name):
    before = used(client)
    info = client.create(name, 2 * MiB, ttl=2.0)
    assert info.expires > info.created
    assert used(client) == before + 2 * MiB
    wait_for(lambda: gone(client, name), "ttl expiry", timeout=30)
    wait_for(lambda: used(client) == before, "the agent to free the expired segment")


def test_a_killed_client_releases_its_attachments(node1, client, name):
    client.create(name, PS)
    holder = subprocess.Popen(
        [*PYTHON, "-c", LOCAL_CLIENT + textwrap.dedent("""
            import sys
            c = Local(sys.argv[1])
            held = [c.attach(sys.argv[2]) for _ in range(5)]
            print("held", flush=True)
            sys.stdin.readline()
        """), node1.socket, name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert holder.stdout.readline().strip() == "held"
        wait_for(lambda: client.stat(name).attachments == 5, "5 reported attachments")
        holder.kill()
        holder.wait(10)
        wait_for(lambda: client.stat(name).attachments == 0, "no attachments after the kill")
    finally:
        holder.kill()
        holder.wait(10)
    client.delete(name)
    assert gone(client, name)  # unattached: freed at once


# ---------------------------------------------------------------- two nodes

def test_remote_rw_attach_takes_the_lock_and_delete_reaches_the_home(node1, node2, name):
    c1, c2 = connect(node1), connect(node2)
    try:
        c1.create(name, 2 * MiB)
        before = used(c1)
        attach, fd = c2.attach(name, "rw")
        os.close(fd)
        assert attach.writable and attach.token > 0 and attach.segment.home == "node1"
        with pytest.raises(errors.Busy):
            c1.attach(name, "rw")
        c2.detach(attach.attachment_id)
        assert c2.stat(name).home == "node1"
        c2.delete(name)  # node2 asks node1 (Node.ReleaseSegment) to free it
        assert gone(c1, name)
        assert used(c1) == before - 2 * MiB
    finally:
        c1.close()
        c2.close()


def test_chmod_and_chown_elsewhere_reach_the_home_cache_at_once(node1, node2, client, name):
    """node2 tells the home (Node.SegmentChanged) before its chmod/chown returns."""
    client.create(name, PS, mode=0o600)
    probe = """
        import json, sys
        from vas.core import errors
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        c = Local(sys.argv[1])
        result = {}
        for mode in ("r", "rw"):
            try:
                attach, fd = c.attach(sys.argv[2], mode)
                c.detach(attach.attachment_id)
                result[mode] = "ok"
            except errors.VasError as exc:
                result[mode] = type(exc).__name__
        print(json.dumps(result))
    """
    c2 = connect(node2)
    try:
        assert child(probe, node1.socket, name) == {"r": "PermissionDenied",
                                                    "rw": "PermissionDenied"}
        assert c2.call(chmod=local_pb2.ChmodRequest(name=name, mode=0o644))[0].segment.mode \
            == 0o644
        assert child(probe, node1.socket, name) == {"r": "ok", "rw": "PermissionDenied"}
        c2.call(chown=local_pb2.ChownRequest(name=name, uid=65534, gid=65534))
        assert child(probe, node1.socket, name) == {"r": "ok", "rw": "ok"}
        c2.call(chmod=local_pb2.ChmodRequest(name=name, mode=0o000))
        assert child(probe, node1.socket, name) == {"r": "PermissionDenied",
                                                    "rw": "PermissionDenied"}
        # The home serves the cached record; it matches the coordinator's.
        attach, fd = client.attach(name)  # root or the owner: always allowed
        os.close(fd)
        assert attach.segment.mode == 0o000 and attach.segment.uid == 65534
        client.detach(attach.attachment_id)
    finally:
        c2.close()
    client.delete(name)


def test_the_agent_registers_again_after_losing_its_lease(etcd_kv, node1, client, name):
    """Revoke node1's lease behind its back (as if it had been cut off for a ttl)."""
    client.create(name, PS)
    attach, fd = client.attach(name)
    os.close(fd)
    wait_for(lambda: client.stat(name).attachments == 1, "the attachment report")
    _, meta = etcd_kv.get("/vas/nodes/node1")
    etcd_kv.revoke_lease(meta.lease_id)
    assert etcd_kv.get("/vas/nodes/node1")[0] is None
    assert client.stat(name).attachments == 0  # the reports went with the lease
    # The next heartbeat (every ttl/3) gets NOT_FOUND and registers again.
    wait_for(lambda: etcd_kv.get("/vas/nodes/node1")[0] is not None, "re-registration")
    wait_for(lambda: client.stat(name).attachments == 1, "the attachments re-reported")
    assert client.stat(name).state == types_pb2.SEGMENT_STATE_READY
    client.detach(attach.attachment_id)


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


# ---------------------------------------------------------------- shutdown

def test_sigterm_deregisters_and_exits_cleanly(etcd_kv, coordinator, workdir, coordinator_stub):
    agent = start_node(coordinator, workdir, "doomed-node", 16 * MiB)
    c = connect(agent)
    c.create("sigterm/seg", PS)
    attach, fd = c.attach("sigterm/seg", "rw")
    os.close(fd)
    listed = coordinator_stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
    assert "doomed-node" in {n.id for n in listed}
    assert agent.stop(signal.SIGTERM, timeout=15) == 0
    listed = coordinator_stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
    assert "doomed-node" not in {n.id for n in listed}
    assert not os.path.exists(agent.socket)
    response, _ = wire.recv_message(c.sock, local_pb2.LocalResponse)
    assert response is None  # our connection was closed
    c.close()
    # etcd itself, as an independent oracle: node record and writer lock are gone
    assert etcd_kv.get("/vas/nodes/doomed-node")[0] is None
    assert etcd_kv.get("/vas/writers/sigterm/seg")[0] is None


def test_sigterm_exits_promptly_when_the_coordinator_is_gone(etcd, workdir):
    coordinator = CoordinatorProcess(workdir, etcd, name="short-lived").start()
    agent = start_node(coordinator.address, workdir, "orphan", 16 * MiB)
    c = connect(agent)
    c.create("orphan/seg", PS)
    attach, fd = c.attach("orphan/seg", "rw")
    os.close(fd)
    coordinator.kill()
    assert c.hello().node.id == "orphan"  # local requests that need no coordinator still work
    attach2, fd = c.attach("orphan/seg")
    os.close(fd)
    with pytest.raises(errors.Unavailable):
        c.stat("orphan/seg")
    started = time.monotonic()
    assert agent.stop(signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - started < 10  # clean-up calls give up quickly; leases expire
    c.close()


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
