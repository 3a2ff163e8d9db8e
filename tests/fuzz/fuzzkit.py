"""What the fuzzers of tests/fuzz share: the budget, the precise-status check, the
request and crash counts, and ``FuzzCluster`` (the shared cluster, its canary and its
victims, and the health check run after every test). conftest.py holds the fixtures."""
from __future__ import annotations

import collections
import hashlib
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

import vas
from vas.cluster import LocalCluster
from vas.proto import coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc


#: Deadline of every fuzzed call, seconds: a call that hangs fails the test.
CALL_TIMEOUT = 10.0
#: Every status a hostile request may get. UNKNOWN and INTERNAL mean a bug.
EXPECTED_CODES = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})
CANARY = "fuzz-canary"
CANARY_SIZE = 3 * 4096 + 100
#: Segments the fuzzers may harm (write, chmod, delete...): never the canary.
VICTIMS = ("fuzz-victim", "fuzz-victim2")
VICTIM_SIZE = 8192

SCALE = max(1, int(os.environ.get("VAS_FUZZ_SCALE", "1")))
#: Requests sent per target, across the session (printed in the terminal summary).
SENT: collections.Counter = collections.Counter()
CRASHES: list[str] = []

settings.register_profile(
    "fuzz", deadline=None, database=None, derandomize=SCALE == 1, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def examples(n: int) -> settings:
    """Settings of a fuzzer: ``n`` examples (times VAS_FUZZ_SCALE); derandomized in the
    suite so that CI runs the same inputs every time, random in a big run."""
    return settings(settings.get_profile("fuzz"), max_examples=n * SCALE)


def code_of(call) -> grpc.StatusCode:
    """Run ``call()`` (one RPC with a deadline); its status code, OK when it returned."""
    try:
        result = call()
        if hasattr(result, "__next__"):  # a server stream: drain it
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def expect_precise(target: str, call) -> grpc.StatusCode:
    """Count one request to ``target``, run it, and assert its status is a precise one."""
    SENT[target] += 1
    code = code_of(call)
    assert code in EXPECTED_CODES, f"{target}: status {code}"
    return code


class FuzzCluster:
    """The shared cluster, its canary and victims, stubs, and the health check."""

    def __init__(self, local: LocalCluster):
        self.local = local
        self.node_channels = [grpc.insecure_channel(n.address) for n in local.nodes]
        self.nodes = [node_pb2_grpc.NodeStub(c) for c in self.node_channels]
        self.coordinator_channel = grpc.insecure_channel(local.coordinators[0].address)
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self.coordinator_channel)
        self.canary_bytes = os.urandom(CANARY_SIZE)
        with vas.connect(local.nodes[0].socket) as client:
            client.create(CANARY, CANARY_SIZE, mode=0o644)
            with client.attach(CANARY, "rw") as mapping:
                mapping.buffer[:CANARY_SIZE] = self.canary_bytes
            for name in VICTIMS:
                client.create(name, VICTIM_SIZE, mode=0o666)
            self.known_ids = [client.stat(name).id for name in (CANARY, *VICTIMS)]
        self.canary = self.coordinator.GetSegment(
            coordinator_pb2.GetSegmentRequest(name=CANARY), timeout=CALL_TIMEOUT)

    @property
    def processes(self):
        return [*self.local.coordinators, *self.local.nodes]

    def ids(self) -> list[int]:
        """Ids of the canary and the victims as created (a fuzzer may have deleted a
        victim since: then its id is just unknown, which is fine to send)."""
        return self.known_ids

    def check(self, target: str) -> None:
        """Fail unless every daemon lives and serves and the canary is intact."""
        dead = [p.name for p in self.processes if not p.alive()]
        if dead:
            CRASHES.extend(f"{name} after {target}" for name in dead)
            pytest.fail(f"daemons died during {target}: {dead}\n"
                        + "\n".join(p.tail(40) for p in self.processes if not p.alive()))
        for process in self.processes:
            with open(process.log_path, errors="replace") as log:
                assert "Traceback" not in log.read(), f"{process.name}:\n{process.tail(60)}"
            with grpc.insecure_channel(process.address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status
            assert status == health_pb2.HealthCheckResponse.SERVING, process.name
        expected = hashlib.sha256(self.canary_bytes).hexdigest()
        with vas.connect(self.local.nodes[0].socket) as client:
            with client.attach(CANARY) as mapping:
                home = hashlib.sha256(mapping.buffer[:CANARY_SIZE]).hexdigest()
        assert home == expected, f"canary corrupted on its home after {target}"
        chunks = self.nodes[0].ReadPages(node_pb2.ReadPagesRequest(
            name=CANARY, id=self.canary.id, offset=0, length=CANARY_SIZE), timeout=CALL_TIMEOUT)
        remote = hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest()
        assert remote == expected, f"canary corrupted (ReadPages) after {target}"

    def close(self) -> None:
        for channel in (*self.node_channels, self.coordinator_channel):
            channel.close()
