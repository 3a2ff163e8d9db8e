"""Remote attach between two agents on loopback: node2 keeps one replica of a segment
homed on node1 (eager fetch over the bulk channel, ReadPages for small segments).

How reuse is observed: ``memory_used`` in the agent's Hello (its own count, no
heartbeat delay) and the one "replica of NAME: fetched" line node2 logs per transfer.
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys

import grpc
import pytest

import vas
from vas.proto import node_pb2, node_pb2_grpc
from worlds import empty, fill

MiB = 1 << 20


def used(node) -> int:
    """memory_used as the agent counts it right now."""
    with vas.connect(node.socket) as client:
        return client.local_node.memory_used


def fetches(node, name: str) -> int:
    with open(os.path.join(node.dir, f"{node.node_id}.log")) as log:
        return log.read().count(f"replica of {name} (id")


def sha(mapping) -> str:
    return hashlib.sha256(mapping.buffer).hexdigest()


@pytest.fixture(scope="module")
def shared(module_cluster):
    return module_cluster(nodes=2, memory=256 * MiB)


@pytest.fixture
def two(shared):
    """The module's two agents, empty when the test starts and emptied after it (no test
    kills or restarts one; the log lines counted name the test's own segments)."""
    node1, node2 = shared.nodes
    c1, c2 = vas.connect(node1.socket), vas.connect(node2.socket)
    yield shared, c1, c2
    c1.close()
    c2.close()
    empty(shared)


def test_eager_remote_attach_copies_once_and_is_shared(two):
    running, c1, c2 = two
    node2 = running.nodes[1]
    digest = fill(c1, "rm/a", 64 * MiB)
    with c2.attach("rm/a", fetch="eager") as m:
        assert sha(m) == digest
        assert m.buffer.readonly and m.info.home == "node1"
        with pytest.raises(vas.PermissionDenied):
            m.write(0, b"x")
        assert m.prefetch() is None and m.prefetch(4096, 8192) is None
        with pytest.raises(vas.InvalidArgument):
            m.prefetch(64 * MiB, 1)
        assert used(node2) == 64 * MiB
        with vas.connect(node2.socket) as other, other.attach("rm/a", fetch="lazy") as m2:
            assert sha(m2) == digest
        assert used(node2) == 64 * MiB
    with c2.attach("rm/a") as m:  # kept after the last detach: no new transfer
        assert sha(m) == digest
    assert fetches(node2, "rm/a") == 1
    assert used(node2) == 64 * MiB


def test_small_segment_and_mode_bits(two):
    running, c1, c2 = two
    c1.create("rm/small", 3 * 4096, mode=0o600)
    with c1.attach("rm/small", "rw") as m:
        m.write(4096, b"small")
    with c2.attach("rm/small") as m:  # small: one ReadPages stream; root passes the bits
        assert m.read(4096, 5) == b"small"
    # The same mode-bit rules as a home attach: uid 65534 gets the "other" bits (none).
    # The child drops root after its imports (the venv is not readable by others).
    code = f"""
import os, sys, vas, vas.client  # the client side loads on first use: before the drop
os.setgroups([]); os.setgid(65534); os.setuid(65534)
with vas.connect({running.nodes[1].socket!r}) as c:
    try:
        c.attach("rm/small")
    except vas.PermissionDenied:
        sys.exit(3)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert done.returncode == 3, done.stderr


def test_read_pages_is_bounds_checked(two):
    running, c1, _ = two
    c1.create("rm/pages", 9 * MiB)
    with c1.attach("rm/pages", "rw") as m:
        m.write(9 * MiB - 5, b"tail!")
    info = c1.stat("rm/pages")
    with grpc.insecure_channel(running.nodes[0].address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)

        def read(offset, length, segment_id=info.id):
            return list(stub.ReadPages(node_pb2.ReadPagesRequest(
                name="rm/pages", id=segment_id, offset=offset, length=length), timeout=10))

        chunks = read(0, 9 * MiB)
        assert [(c.offset, len(c.data)) for c in chunks] == [
            (o, 2 * MiB) for o in range(0, 8 * MiB, 2 * MiB)] + [(8 * MiB, MiB)]
        assert chunks[-1].data.endswith(b"tail!") and {c.version for c in chunks} == {0}
        for offset, length in ((0, 0), (9 * MiB, 1), (4096, 9 * MiB), (1 << 63, 1 << 63)):
            with pytest.raises(grpc.RpcError) as err:
                read(offset, length)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (offset, length)
        with pytest.raises(grpc.RpcError) as err:
            read(0, 4096, segment_id=info.id + 1000)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        bulk = stub.OpenBulk(node_pb2.OpenBulkRequest(name="rm/pages", id=info.id), timeout=10)
    assert bulk.size == 9 * MiB
    host, _, port = bulk.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(struct.pack("<8sQQQ", b"VASBULK1", info.id, 8 * MiB, 2 * MiB))
        magic, code, size = struct.unpack("<8sIQ", conn.recv(20, socket.MSG_WAITALL))
        assert magic == b"VASBULK1" and code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert b"outside the segment" in conn.recv(size, socket.MSG_WAITALL)


def test_delete_frees_replicas_and_recreate_refetches(two):
    running, c1, c2 = two
    node2 = running.nodes[1]
    fill(c1, "rm/d", 8 * MiB)
    c2.attach("rm/d").detach()
    assert used(node2) == 8 * MiB
    c1.delete("rm/d")  # through the home: node2 learns at its next attach
    with pytest.raises(vas.NotFound):
        c2.attach("rm/d")
    assert used(node2) == 0
    digest = fill(c1, "rm/d", 8 * MiB)  # same name, new id and bytes
    with c2.attach("rm/d") as m:
        assert sha(m) == digest
        c2.delete("rm/d")  # through the replica's node: retired, freed at this detach
    assert used(node2) == 0


def test_newer_version_refetches(two):
    running, c1, c2 = two
    node2 = running.nodes[1]
    fill(c1, "rm/v", 8 * MiB)
    c2.attach("rm/v", fetch="eager").detach()  # lazy would page in later, unsynced bytes
    with c1.attach("rm/v", "rw") as w:
        w.write(0, b"new!")
        with c2.attach("rm/v") as m:  # same version: the replica is reused as it is
            assert m.read(0, 4) != b"new!"
        w.sync()  # a new version
    with c2.attach("rm/v") as m:
        assert m.read(0, 4) == b"new!" and m.version == 1
    assert fetches(node2, "rm/v") == 2
    assert used(node2) == 8 * MiB


def test_capacity_exceeded_on_the_replica_node(cluster):
    running = cluster(nodes=2, memory=96 * MiB)
    node2 = running.nodes[1]
    with vas.connect(running.nodes[0].socket) as c1, vas.connect(node2.socket) as c2:
        fill(c1, "rm/big", 64 * MiB)
        c2.create("rm/local", 48 * MiB)
        with pytest.raises(vas.CapacityExceeded):
            c2.attach("rm/big")
        assert used(node2) == 48 * MiB
        c2.delete("rm/local")
        c2.attach("rm/big").detach()
        assert used(node2) == 64 * MiB
        c2.create("rm/local", 48 * MiB)  # the unattached replica makes room
        assert used(node2) == 48 * MiB

