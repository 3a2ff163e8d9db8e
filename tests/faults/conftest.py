"""Fixtures of the fault tests: agents with small limits, and clients as another uid.

The cluster fixtures of tests/conftest.py start the processes (``cluster``: real
etcd, coordinator and agents); tests/faults/fault_kit.py has the child processes
and the /proc readers. Here:

    def test_x(limited):         # a started LocalCluster of 2 agents with fault_kit.LIMITS
    def test_y(limited, nobody): # nobody(code, *args) -> a fault_kit.Child as uid 65534
"""
from __future__ import annotations

import pytest

from fault_kit import LIMITS, Child
from vas.node import locks


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
