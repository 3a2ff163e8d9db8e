"""Node and segment states with real processes: an agent killed with SIGKILL is listed
``down`` (and its segments ``lost``, the segments it held replicas of ``degraded``)
until ``vasctl node rm``; a replica of a deleted segment gives its memory back at once,
whoever made the delete.

Every agent here runs with ``--node-ttl 2`` (heartbeats every 2/3 s), so a lapsed
lease shows within seconds; the checks go through ``vasctl`` as an operator would
(``-o json``), with etcd read directly where the stored layout is the point.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import grpc
import pytest

import vas
from vas.proto import coordinator_pb2 as pb, coordinator_pb2_grpc, types_pb2
from waiting import wait_for

MiB = 1 << 20
NODE_TTL = 2
VASCTL = [sys.executable, "-m", "vas.cli"]


@pytest.fixture
def trio(cluster):
    """Three agents with a 2 s node lease."""
    return cluster(nodes=3, node_args=["--node-ttl", str(NODE_TTL)])


def vasctl(node, *args, expect: int | None = 0) -> subprocess.CompletedProcess:
    """``vasctl ARGS`` as a client of agent ``node``."""
    proc = subprocess.run([*VASCTL, *map(str, args)], capture_output=True, timeout=60,
                          env={**os.environ, "VAS_NODE": node.socket}, cwd="/")
    if expect is not None:
        assert proc.returncode == expect, (args, proc.returncode, proc.stderr.decode())
    return proc


def listed(node) -> dict[str, dict]:
    """``vasctl node ls -o json`` through ``node``, by node id."""
    return {n["id"]: n for n in json.loads(vasctl(node, "node", "ls", "-o", "json").stdout)}


def replica_bytes(node, seen_from=None) -> int:
    """The replica bytes ``node`` holds, as ``vasctl node ls`` through ``seen_from``
    shows them (through ``node`` itself: its live figures, else its last heartbeat's)."""
    return listed(seen_from or node)[node.node_id]["replica_bytes"]


def state_of(client, node_id: str) -> str | None:
    """The state of ``node_id`` as ``client.nodes(include_down=True)`` lists it."""
    return next((n.state for n in client.nodes(include_down=True) if n.id == node_id), None)


def test_a_killed_agent_is_listed_down_until_node_rm(trio):
    node1, node2, node3 = trio.nodes
    with vas.connect(node2.socket) as c2, vas.connect(node1.socket) as c1:
        c2.create("states/on-node2", 4 * MiB)
        c1.create("states/on-node1", 2 * MiB)
        c1.create("states/copied", 1 * MiB)
        with c2.attach("states/copied", fetch="eager"):  # node2 holds a replica of it
            pass
    wait_for(lambda: listed(node1)["node2"]["replicas"] == 1, "node2's replica report")

    node2.kill()  # SIGKILL: nothing of it runs after this
    with vas.connect(node1.socket) as c1:  # polled through the library: vasctl starts slowly
        wait_for(lambda: state_of(c1, "node2") == "down", "node2 listed down",
                 timeout=2 * NODE_TTL)
    nodes = listed(node1)
    assert [n["state"] for n in nodes.values()] == ["ready", "down", "ready"]
    down = nodes["node2"]
    assert down["socket"] == node2.socket and down["memory_total"] == trio.memory
    assert time.time() - 4 * NODE_TTL < down["down_since"] <= time.time()
    table = vasctl(node1, "node", "ls").stdout.decode()
    assert "down" in table.splitlines()[2] and "DOWN SINCE" in table
    # Callers that list nodes for placement or addresses still see only live ones.
    with vas.connect(node1.socket) as c1:
        assert [n.id for n in c1.nodes()] == ["node1", "node3"]

    status = json.loads(vasctl(node3, "status", "-o", "json").stdout)
    assert [n["id"] for n in status["down_nodes"]] == ["node2"]
    assert [n["id"] for n in status["nodes"]] == ["node1", "node3"]
    assert status["lost"] == ["states/on-node2"]  # its home is down: nothing serves it
    assert status["degraded"] == ["states/copied"]  # served by node1; its copy on node2 is gone
    text = vasctl(node3, "status").stdout.decode()
    assert re.search(r"^nodes down +1: node2$", text, re.M), text
    assert re.search(r"^segments lost +1: states/on-node2$", text, re.M), text
    assert re.search(r"^segments degraded +1: states/copied$", text, re.M), text
    stat = json.loads(vasctl(node1, "seg", "stat", "states/on-node2", "-o", "json").stdout)
    assert stat["state"] == "lost"

    refused = vasctl(node1, "node", "rm", "node1", expect=1)
    assert refused.stderr.decode() == ("vasctl: error: node 'node1' is up (its lease is live): "
                                       "stop its agent first, or remove it with --force\n")
    vasctl(node1, "node", "rm", "node2")
    assert list(listed(node1)) == ["node1", "node3"]
    status = json.loads(vasctl(node1, "status", "-o", "json").stdout)
    assert status["down_nodes"] == [] and status["degraded"] == []
    # Its memory is declared gone: the record is marked lost for good, a delete removes it.
    assert status["lost"] == ["states/on-node2"]
    vasctl(node1, "seg", "rm", "states/on-node2")  # removed at once: no memory to free
    assert json.loads(vasctl(node1, "seg", "ls", "states/on-node2", "-o", "json").stdout) == []
    missing = vasctl(node1, "node", "rm", "node2", expect=1)
    assert missing.stderr.decode() == "vasctl: error: no node 'node2'\n"


def test_a_restarted_agent_is_up_again_and_a_clean_stop_is_not_down(trio):
    node1, node2, node3 = trio.nodes
    node3.kill()
    wait_for(lambda: listed(node1)["node3"]["state"] == "down", "node3 listed down",
             timeout=4 * NODE_TTL)
    node3.start()
    wait_for(lambda: listed(node1)["node3"]["state"] == "ready", "node3 up again")
    assert listed(node1)["node3"]["down_since"] is None

    node2.stop()  # SIGTERM: it deregisters, leaving the cluster on purpose
    assert list(listed(node1)) == ["node1", "node3"]
    assert json.loads(vasctl(node1, "status", "-o", "json").stdout)["down_nodes"] == []


def test_node_rm_is_root_only_and_force_removes_a_live_node(trio):
    node1, node2, _ = trio.nodes
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(trio.coordinators[0].address))
    with pytest.raises(grpc.RpcError) as denied:
        stub.RemoveNode(pb.RemoveNodeRequest(caller=types_pb2.Caller(uid=1000, gid=1000),
                                             node_id="node2"), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only root may remove node 'node2'" in denied.value.details()
    vasctl(node1, "node", "rm", "node2", "--force")
    # Its lease is revoked; the agent, still running, registers again at its next beat.
    wait_for(lambda: "node2" not in listed(node1) or listed(node1)["node2"]["state"] == "ready",
             "node2 gone or back")
    wait_for(lambda: listed(node1).get("node2", {}).get("state") == "ready",
             "node2 registered again", timeout=4 * NODE_TTL)


def _delete_by_home(trio, name):
    with vas.connect(trio.nodes[0].socket) as c:
        c.delete(name)


def _delete_by_holder(trio, name):
    with vas.connect(trio.nodes[1].socket) as c:
        c.delete(name)


def _delete_by_third(trio, name):
    with vas.connect(trio.nodes[2].socket) as c:
        c.delete(name)


def _delete_over_grpc(trio, name):
    """An admin tool straight against the coordinator: no agent makes the call."""
    channel = grpc.insecure_channel(trio.coordinators[0].address)
    try:
        coordinator_pb2_grpc.CoordinatorStub(channel).DeleteSegment(
            pb.DeleteSegmentRequest(caller=types_pb2.Caller(uid=os.getuid(), gid=os.getgid()),
                                    name=name), timeout=10)
    finally:
        channel.close()


@pytest.fixture(scope="class")
def class_trio(class_cluster):
    """``trio``, shared by the tests of a class."""
    return class_cluster(nodes=3, node_args=["--node-ttl", str(NODE_TTL)])


class TestReplicaOfADeletedSegment:
    """Whoever deletes it, node2's replica frees its memory at once. The four deletes
    share one trio: each case ends with node2 holding no replica and node1 no memory
    (it asserts so), which is where the next one starts; none kills an agent."""

    @pytest.mark.parametrize("delete", [_delete_by_home, _delete_by_holder, _delete_by_third,
                                        _delete_over_grpc])
    def test_a_replica_of_a_deleted_segment_frees_its_memory_at_once(self, class_trio, delete):
        trio = class_trio
        node1, node2, node3 = trio.nodes
        name = f"states/freed-{delete.__name__}"
        with vas.connect(node1.socket) as c1:
            c1.create(name, 8 * MiB)
        with vas.connect(node2.socket) as c2:
            with c2.attach(name, fetch="eager"):  # the replica stays after the detach
                pass
        assert replica_bytes(node2) == 8 * MiB
        wait_for(lambda: replica_bytes(node2, seen_from=node1) == 8 * MiB, "node2's heartbeat")
        seg = json.loads(vasctl(node3, "seg", "stat", name, "-o", "json").stdout)
        assert seg["copies"] == ["node2"]
        assert "node2 (8.0 MiB each)" in vasctl(node3, "seg", "stat", name).stdout.decode()

        deleted = time.monotonic()
        delete(trio, name)
        wait_for(lambda: replica_bytes(node2) == 0, "node2 to free its replica", timeout=3)
        freed = time.monotonic() - deleted
        assert freed < 3, freed  # before: 33 s for a delete over gRPC (the periodic re-check)
        # and every node sees it by node2's next heartbeat (every ttl/3)
        wait_for(lambda: replica_bytes(node2, seen_from=node1) == 0, "node2's heartbeat",
                 timeout=NODE_TTL + 1)
        wait_for(lambda: listed(node1)["node1"]["memory_used"] == 0, "the home to free it",
                 timeout=3)
