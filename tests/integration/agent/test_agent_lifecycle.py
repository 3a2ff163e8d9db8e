"""Lifetimes in the node agent: real etcd, coordinator and agent processes.

Capacity of a node; the writer lock of a client that dies or stays alive; deletion
while attached, forced, through another node, and by ttl; attachments of a killed
client; two nodes (a remote writer, chmod/chown reaching the home's cache, a lost node
lease); shutdown on SIGTERM, with and without the coordinator. etcd is read directly
as an independent oracle (``etcd_kv``). The client is local_client.Local; the cluster
fixtures are in conftest.py beside this file.
"""
from __future__ import annotations

import mmap
import os
import signal
import subprocess
import textwrap
import time

import pytest

from local_client import (LOCAL_CLIENT, MiB, PS, PYTHON, child, connect, gone, start_node,
                          used, wait_for)
from vas.cluster import CoordinatorProcess, NodeProcess
from vas.core import errors, wire
from vas.proto import coordinator_pb2, local_pb2, types_pb2


# ---------------------------------------------------------------- capacity

def test_capacity_is_enforced_by_the_agent(coordinator, workdir):
    small = start_node(coordinator, workdir, "small", 8 * MiB)
    try:
        c = connect(small)
        c.create("cap/a", 6 * MiB)
        assert used(c) == 6 * MiB
        with pytest.raises(errors.CapacityExceeded) as err:
            c.create("cap/b", 3 * MiB)
        assert str(err.value) == ("node small has no room for segment cap/b of 3 MiB: "
                                  "2 MiB of 8 MiB free")
        assert gone(c, "cap/b")  # refused before the coordinator saw it
        c.create("cap/b", 2 * MiB)
        c.delete("cap/a")
        c.create("cap/c", 6 * MiB)
        assert used(c) == 8 * MiB
    finally:
        small.stop()


# ---------------------------------------------------------------- the writer lock's lifetime

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
    assert attach.keepalive_seconds == 10 / 3  # a third of the default 10 s writer lease
    _, meta = etcd_kv.get(f"/vas/writers/{name}")
    assert meta.create_revision == attach.token  # the fencing token is the lock's revision
    assert etcd_kv.get_lease_info(meta.lease_id).grantedTTL == 10
    client.detach(attach.attachment_id)
    assert etcd_kv.get(f"/vas/writers/{name}")[0] is None  # released at detach, not at expiry


def test_a_writer_lease_outlives_its_ttl_while_the_client_is_alive(etcd_kv, coordinator,
                                                                   workdir, name):
    """The renewal itself, on an agent with a 2 s writer lease (the default 10 s one
    would take 11 s to outlive)."""
    ttl = 2
    short = NodeProcess(workdir, coordinator, node_id="shortttl", memory=8 * MiB,
                        writer_ttl=ttl).start()
    try:
        client = connect(short)
        client.create(name, PS)
        attach, fd = client.attach(name, "rw")
        os.close(fd)
        assert attach.keepalive_seconds == ttl / 3
        _, meta = etcd_kv.get(f"/vas/writers/{name}")
        # Longer than the writer lease: it lives only if renewed, which the agent does
        # while the client shows it is alive (as vas.Client's keepalive thread does, a
        # few times per keepalive_seconds).
        end = time.monotonic() + 1.5 * ttl
        while time.monotonic() < end:
            client.call(keepalive=local_pb2.KeepAliveRequest())
            time.sleep(ttl / 10)
        lease = etcd_kv.get_lease_info(meta.lease_id)
        assert lease.grantedTTL == ttl and lease.TTL >= ttl / 2, lease  # renewed every ttl/3
        assert etcd_kv.get(f"/vas/writers/{name}")[1].create_revision == attach.token
        other = connect(short)
        with pytest.raises(errors.Busy):
            other.attach(name, "rw")
        other.close()
        client.detach(attach.attachment_id)
        assert etcd_kv.get(f"/vas/writers/{name}")[0] is None  # released at detach
        client.close()
    finally:
        short.stop()


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
    """The coordinator tells the home (Node.SegmentChanged) before node2's chmod/chown returns."""
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
