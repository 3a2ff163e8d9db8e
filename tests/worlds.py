"""Where test clusters live: world-traversable directories, a wiped etcd keyspace
(used by tests/conftest.py and the package-scoped cluster of tests/fuzz) and a shared
cluster emptied between tests; and what the tests of a cluster ask of it (``fill``,
``gone``, ``memory_used``)."""
from __future__ import annotations

import hashlib
import os
import tempfile

import grpc

import vas
from waiting import wait_for


def new_world_dir(prefix: str) -> str:
    """A fresh directory every uid can traverse (agents' sockets live there), short
    enough for socket paths (sun_path holds 108 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    return path


def wipe(etcd_url: str) -> None:
    """Delete every key under /vas/ (a fresh keyspace for the next test)."""
    from etcd3 import etcdrpc

    with grpc.insecure_channel(etcd_url.removeprefix("http://")) as channel:
        etcdrpc.KVStub(channel).DeleteRange(
            etcdrpc.DeleteRangeRequest(key=b"/vas/", range_end=b"/vas0"), timeout=10)


def empty(local) -> None:
    """Delete every segment of ``local`` (a LocalCluster) and wait until none is listed
    (a segment still attached is freed at its last detach) and every agent counts no
    memory used (replicas included): the next test of a shared cluster starts from an
    empty one."""
    with vas.connect(local.nodes[0].socket) as client:
        for info in client.list():
            try:
                client.delete(info.name)
            except vas.NotFound:
                pass  # gone meanwhile (its last detach)
        wait_for(lambda: not client.list(), "the shared cluster to have no segment")
    for node in local.nodes:
        wait_for(lambda: memory_used(node) == 0, f"{node.node_id} to free its memory")


def memory_used(node) -> int:
    """What agent ``node`` counts as used right now (its Hello: no heartbeat delay)."""
    with vas.connect(node.socket) as client:
        return client.local_node.memory_used


def fill(client, name: str, size: int) -> str:
    """Create ``name`` (mode 0644) on the client's node holding random bytes; their sha256."""
    client.create(name, size, mode=0o644)
    with client.attach(name, "rw") as m:
        block = os.urandom(min(size, 16 << 20))
        for offset in range(0, size, len(block)):
            m.write(offset, block[:size - offset])
        return hashlib.sha256(m.buffer).hexdigest()


def gone(client, name: str) -> bool:
    """True once ``name`` is no longer a segment."""
    try:
        client.stat(name)
    except vas.NotFound:
        return True
    return False
