"""The agent's network addresses as a deployment fixes them: ``--bulk-port`` and
``--advertise`` (and their $VAS_BULK_PORT / $VAS_ADVERTISE defaults).

Two agents on fixed gRPC and bulk ports advertise the name ``localhost`` while listening
on 127.0.0.1, so the advertised host (not the listen host) is visibly what peers dial.
An eager remote attach of a segment above the small-fetch size moves its bytes over the
home's bulk channel at the configured port: checked by OpenBulk's answer, by the
fetching agent's log ("over the bulk channel localhost:PORT", not the ReadPages
fallback) and by the checksum of the bytes. A taken bulk port, a wildcard or malformed
advertised address and an out-of-range port stop the agent with a one-line error.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

import vas
from vas.cluster import LaunchError, NodeProcess, free_port
from vas.core.tls import open_channel
from vas.proto import node_pb2, node_pb2_grpc
from waiting import wait_for

SIZE = 8 << 20          # above the small-fetch size (4 MiB): an eager attach uses the bulk channel
DEADLINE = 10.0         # seconds, every gRPC call


def read_log(process: NodeProcess) -> str:
    with open(process.log_path, encoding="utf-8", errors="replace") as log:
        return log.read()


@pytest.fixture
def fixed_agents(coordinator, world_dir, monkeypatch):
    """node1 configured by flags, node2 by $VAS_BULK_PORT and $VAS_ADVERTISE; each with a
    fixed gRPC port and bulk port, advertised as localhost:PORT."""
    ports = set()
    while len(ports) < 4:  # four distinct free ports
        ports.add(free_port())
    grpc1, bulk1, grpc2, bulk2 = sorted(ports)
    agents = []
    try:
        node1 = NodeProcess(world_dir, coordinator.address, node_id="node1",
                            memory=64 << 20, listen=f"127.0.0.1:{grpc1}",
                            args=["--advertise", f"localhost:{grpc1}",
                                  "--bulk-port", str(bulk1)])
        agents.append(node1.start())
        monkeypatch.setenv("VAS_BULK_PORT", str(bulk2))
        monkeypatch.setenv("VAS_ADVERTISE", f"localhost:{grpc2}")
        node2 = NodeProcess(world_dir, coordinator.address, node_id="node2",
                            memory=64 << 20, listen=f"127.0.0.1:{grpc2}")
        agents.append(node2.start())
        monkeypatch.delenv("VAS_BULK_PORT")
        monkeypatch.delenv("VAS_ADVERTISE")
        yield node1, node2, {"node1": (grpc1, bulk1), "node2": (grpc2, bulk2)}
    finally:
        for agent in agents:
            agent.stop()


def test_eager_remote_attach_uses_the_configured_bulk_port(fixed_agents):
    node1, node2, ports = fixed_agents
    (grpc1, bulk1), (grpc2, bulk2) = ports["node1"], ports["node2"]
    data = np.random.default_rng(11).integers(0, 256, SIZE, dtype=np.uint8)
    with vas.connect(node1.socket) as home:
        home.create("fixed/ports", SIZE)
        with home.attach("fixed/ports", "rw") as mapping:
            mapping.ndarray(np.uint8)[:] = data
        info = home.stat("fixed/ports")
        # The cluster knows each agent by its advertised address.
        assert {n.id: n.address for n in home.nodes()} == {
            "node1": f"localhost:{grpc1}", "node2": f"localhost:{grpc2}"}

    # Each agent reports its configured bulk port, on the listen host, advertised by name.
    for process, (_, bulk) in ((node1, ports["node1"]), (node2, ports["node2"])):
        wait_for(lambda: f"bulk channel on 127.0.0.1:{bulk} (advertised localhost:{bulk})"
                 in read_log(process), f"{process.name}'s bulk-channel log line")
    with open_channel(f"localhost:{grpc1}", None, "") as channel:
        opened = node_pb2_grpc.NodeStub(channel).OpenBulk(
            node_pb2.OpenBulkRequest(name="fixed/ports", id=info.id), timeout=DEADLINE)
    assert opened.address == f"localhost:{bulk1}"
    assert opened.size == SIZE

    with vas.connect(node2.socket) as reader:
        with reader.attach("fixed/ports", fetch="eager") as mapping:
            assert mapping.info.home == "node1"
            copied = hashlib.sha256(mapping.buffer).hexdigest()
    assert copied == hashlib.sha256(data.tobytes()).hexdigest()
    line = f"fetched {SIZE} bytes from node1 over the bulk channel localhost:{bulk1}"
    wait_for(lambda: line in read_log(node2), "node2's log of the bulk fetch")
    assert "using ReadPages" not in read_log(node2)


def test_a_taken_bulk_port_stops_the_agent_with_a_clear_error(fixed_agents, world_dir):
    node1, _, ports = fixed_agents
    _, bulk1 = ports["node1"]
    clash = NodeProcess(world_dir, node1.coordinator, node_id="node3", memory=16 << 20,
                        args=["--bulk-port", str(bulk1)])
    try:
        with pytest.raises(LaunchError, match="exited with status 1") as failed:
            clash.start()
    finally:
        clash.stop()
    assert (f"cannot listen on 127.0.0.1:{bulk1} for the bulk channel (--bulk-port)"
            in str(failed.value))


@pytest.mark.parametrize("args, message", [
    (["--advertise", "0.0.0.0:7400"],
     "invalid --advertise 0.0.0.0:7400: other agents cannot dial a wildcard host"),
    (["--advertise", "nohost"], "--advertise: invalid address 'nohost': expected HOST:PORT"),
    (["--bulk-port", "65536"], "invalid --bulk-port 65536: must be 0 (pick one) to 65535"),
])
def test_bad_addresses_stop_the_agent_before_it_serves(coordinator, world_dir, args, message):
    agent = NodeProcess(world_dir, coordinator.address, node_id="bad", memory=16 << 20,
                        args=args)
    try:
        with pytest.raises(LaunchError, match="exited with status 1") as failed:
            agent.start()
    finally:
        agent.stop()
    assert f"vasctl: error: {message}" in str(failed.value)
