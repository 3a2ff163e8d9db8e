"""Fixtures of the agent tests: real etcd, coordinator and agent processes per module.

``etcd`` and ``coordinator`` here replace the session-wide ones of tests/conftest.py for
the modules in this folder: each module starts its own etcd (``etcd`` is its URL) and
coordinator (``coordinator`` is its address), then agents node1 and node2 (64 MiB each),
all in the module's world-traversable directory, so that children which drop to another
uid reach the sockets.
"""
from __future__ import annotations

import etcd3
import grpc
import pytest

from local_client import MiB, connect, start_node
from vas.cluster import CoordinatorProcess, EtcdProcess
from vas.proto import coordinator_pb2_grpc


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
