"""Fault-injection tests: real clusters with processes killed, stopped or restarted on
purpose, and clients of another uid pushing the agents' limits; each test file stops
every process it started.

Fixtures here: two real agents, two agents with small per-uid limits, clients as
uid 65534, and etcd read (and poked) directly as an independent oracle. The helpers
they share (kill and restart an agent, a call that must not hang, usage and fd
counts, child processes and /proc readers) are in faultkit.py.

The fixtures of tests/conftest.py (``etcd``, ``cluster``, ``world_dir``, ...) apply
here as everywhere under tests/, as does ``waiting.wait_for`` (tests/waiting.py, on
sys.path through that conftest); this module adds:

    def test_x(pair, oracle, coordinator_stub):
        node1, node2 = pair.nodes               # NodeProcess: .socket, .pid, .node_id
        oracle.kvs(b"/vas/nodes/node1")         # etcd's own view
        coordinator_stub.GetSegment(...)        # the coordinator, no agent in between

    def test_y(limited, nobody):  # a started LocalCluster of 2 agents with faultkit.LIMITS;
        child = nobody(code)      # a faultkit.Child as uid 65534
"""
from __future__ import annotations

import grpc
import pytest
from etcd3 import etcdrpc

from faultkit import LIMITS, PAIR_MEMORY, Child
from vas.node import locks
from vas.proto import coordinator_pb2_grpc


@pytest.fixture
def pair(cluster):
    """Two agents, "node1" and "node2", over the session etcd (an empty keyspace)."""
    return cluster(nodes=2, memory=PAIR_MEMORY)


@pytest.fixture
def limited(cluster):
    """Two agents (node1, node2) with the small LIMITS, over a fresh cluster; after the
    test they are stopped and their logs must hold no traceback and, when run with
    VAS_LOCK_CHECK, no lock-order violation."""
    running = cluster(nodes=2, node_args=LIMITS)
    yield running
    running.stop()
    for node in running.nodes:
        with open(node.log_path, errors="replace") as log:
            text = log.read()
        assert locks.MARKER not in text and "Traceback" not in text, node.tail(80)


@pytest.fixture
def nobody():
    """Factory: ``nobody(code, *args)`` -> a started Child (killed after the test)."""
    children: list[Child] = []

    def start(code: str, *args: str) -> Child:
        child = Child(code, *args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


class Oracle:
    """etcd read and changed straight through its own API, bypassing vas."""

    def __init__(self, url: str):
        self._channel = grpc.insecure_channel(url.removeprefix("http://"))
        self.kv = etcdrpc.KVStub(self._channel)
        self.lease = etcdrpc.LeaseStub(self._channel)

    def kvs(self, key: bytes, prefix: bool = False):
        end = key[:-1] + bytes([key[-1] + 1]) if prefix else b""
        return self.kv.Range(etcdrpc.RangeRequest(key=key, range_end=end), timeout=10).kvs

    def revoke(self, lease_id: int) -> None:
        self.lease.LeaseRevoke(etcdrpc.LeaseRevokeRequest(ID=lease_id), timeout=10)

    def close(self) -> None:
        self._channel.close()


@pytest.fixture
def oracle(etcd):
    view = Oracle(etcd.url)
    yield view
    view.close()


@pytest.fixture
def coordinator_stub(pair):
    """A Coordinator stub straight to ``pair``'s coordinator (no agent in between)."""
    with grpc.insecure_channel(pair.coordinators[0].address) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)
