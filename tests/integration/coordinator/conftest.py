"""Fixtures of the Coordinator API tests: a stub on the module's coordinator, node n1.

The tests here run against a real coordinator process and a real etcd over gRPC. Stubs
from vas.v1 are called directly, so each test pins one RPC's contract (coordinator.proto);
etcd itself is read as an independent oracle where the storage matters. Waits are on
conditions with deadlines, never bare sleeps. The calls the modules share are in
coordinator_calls.py. The coordinator is tests/conftest.py's ``coordinator`` (one process
per module over the session's etcd, the /vas/ keyspace wiped before each test).
"""
from __future__ import annotations

import grpc
import pytest

from coordinator_calls import register
from vas.proto import coordinator_pb2_grpc


@pytest.fixture
def stub(coordinator):
    with grpc.insecure_channel(coordinator.address) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)


@pytest.fixture
def n1(stub):
    """Node "n1" registered (lease id returned)."""
    return register(stub, "n1").lease_id
