"""Two coordinators over one etcd; the one everybody talks to is killed (SIGKILL).

Agents, an admin client and ``vasctl --coordinator`` all take both addresses in one
gRPC target (``ipv4:A,B``; pick_first connects to A and moves to B when A is gone).
After A's kill every metadata call, through either agent and straight through the
admin client, works through B within its deadline, with nothing restarted and no
retry by the caller; both agents stay registered and a remote attach reads the
right bytes. Figures are printed (``-s``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import vas
from faultkit import bounded
from vas.admin import AdminClient
from vas.cluster import coordinator_target

MiB = 1 << 20
#: Seconds a metadata call may take: the agent's deadline of a coordinator call.
CALL_DEADLINE = 10.0


def test_killing_one_of_two_coordinators_fails_over_to_the_other(cluster):
    local = cluster(nodes=2, coordinators=2, memory=64 * MiB)
    node1, node2 = local.nodes
    first, second = local.coordinators
    target = coordinator_target([first.address, second.address])
    assert node1.coordinator == target == local.env()["VAS_COORDINATOR"]  # all get both
    data = bytes(range(256)) * (MiB // 256)
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2, \
            AdminClient(target) as admin:
        c1.create("failover/a", MiB, mode=0o644)
        with c1.attach("failover/a", "rw") as mapping:
            mapping.write(0, data)
            mapping.sync()
        assert {n.id for n in admin.nodes()} == {"node1", "node2"}
        # pick_first: the agents talk to the first coordinator, the one killed.
        port = int(first.address.rpartition(":")[2])
        assert all(connected_to(node.pid, port) for node in local.nodes)

        first.kill()
        calls = {
            "create": lambda: c1.create("failover/b", MiB, mode=0o644),
            "stat": lambda: c2.stat("failover/a"),
            "ls": lambda: c2.list("failover/"),
            "chmod": lambda: c1.chmod("failover/b", 0o640),
            "attach remote": lambda: remote_digest(c2, "failover/a"),
            "nodes": c1.nodes,
            "delete": lambda: c2.delete("failover/b"),
            "admin stat": lambda: admin.stat("failover/a"),
            "admin ls": lambda: admin.list("failover/"),
            "admin nodes": admin.nodes,
            "admin status": admin.status,
        }
        print()
        for name, call in calls.items():
            outcome, seconds = bounded(call, CALL_DEADLINE + 5)
            assert not isinstance(outcome, Exception), (name, outcome)
            assert seconds < CALL_DEADLINE, (name, seconds)
            print(f"{name} after the kill: {seconds * 1000:.1f} ms")
        assert remote_digest(c2, "failover/a") == hashlib.sha256(data).hexdigest()
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "vas.cli", "--coordinator", target,
                               "seg", "ls", "failover/"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and "failover/a" in done.stdout, done.stderr
        print(f"vasctl --coordinator {target} seg ls: {time.monotonic() - started:.2f} s")
        assert {n.id: n.state for n in admin.nodes(include_down=True)} == {
            "node1": "ready", "node2": "ready"}
        assert all(node.alive() for node in local.nodes)


def connected_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` has an established TCP connection to 127.0.0.1:``port``
    (its socket inodes matched against /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC may use v4-mapped sockets
        with open(table) as lines:
            rows += [line.split() for line in lines.readlines()[1:]]
    # Columns: sl local remote state ... inode (the 10th); "01" is ESTABLISHED; the
    # remote address is hex, 127.0.0.1 as 0100007F (v4) or ...FFFF00000100007F (v6).
    return any(row[2].endswith(f"0100007F:{port:04X}") and row[3] == "01"
               and row[9] in inodes for row in rows)


def remote_digest(client, name: str) -> str:
    with client.attach(name, fetch="eager") as mapping:
        return hashlib.sha256(mapping.buffer).hexdigest()
