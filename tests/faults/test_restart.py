"""A home agent killed (SIGKILL) and restarted with the same node id comes back empty.

Its segments must not read ``ready`` (no memory is behind them any more): the
restarted agent reconciles with etcd before it serves, so they read ``lost`` from
the moment it is up. Attaches of them fail at once with NotFound, on every node and
in every fetch mode (never a hang: each is bounded here), the owner's delete frees
the name at once (there is nothing left to free), and the name can be created again.
The restarted home also tells the other node to drop its replica of them.

etcd is read directly as the oracle of what is stored.
"""
from __future__ import annotations

import json
import subprocess
import sys

import vas
from faultkit import bounded, restart, usage
from vas.coordinator import keys
from waiting import wait_for

MiB = 1 << 20
NAMES = [f"restart/{i}" for i in range(4)]
#: Seconds an attach of a lost segment may take before it counts as a hang (it
#: answers in milliseconds: one GetSegment, one ListNodes).
ATTACH_BOUND = 20.0


def stat(node, name: str) -> dict:
    """``vasctl seg stat NAME -o json`` against ``node``'s agent, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "vas.cli", "seg", "stat", name, "-o", "json",
                           "--node", node.socket], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def attach_once(node, name: str, mode: str = "r", fetch: str = "lazy") -> None:
    with vas.connect(node.socket) as client:
        client.attach(name, mode, fetch=fetch).detach()


def test_restarted_home_marks_its_segments_lost_and_frees_their_names(pair, oracle):
    node1, node2 = pair.nodes
    with vas.connect(node1.socket) as c1:
        ids = {name: c1.create(name, MiB, mode=0o644).id for name in NAMES}
        with c1.attach(NAMES[0], "rw") as mapping:
            mapping.write(0, b"x" * MiB)
            mapping.sync()
    attach_once(node2, NAMES[0], fetch="eager")  # node2 keeps an unattached replica
    wait_for(lambda: oracle.kvs(keys.attach_key(NAMES[0], "node2")),
             "node2 to report its replica")
    assert usage(node2) == (MiB, 1)
    # A client whose switches into a space of a node1 segment stopped asking the agent
    # (its change counter stood still) must not reuse the member after the agent is gone.
    kept = vas.connect(node1.socket)
    kept.create_space("restart/S")
    kept.space_add("restart/S", NAMES[2])
    for _ in range(3):
        with kept.switch("restart/S") as view:
            assert view[NAMES[2]].read(0, 4) == bytes(4)

    took = restart(node1)
    print(f"\nnode1 killed and serving again after {took:.2f} s")
    outcome, _ = bounded(lambda: kept.switch("restart/S").__enter__(), ATTACH_BOUND)
    assert isinstance(outcome, vas.Unavailable), outcome
    kept.close()

    # Lost from the moment the restarted agent serves: it reconciled before that.
    for name in NAMES:
        for node in (node1, node2):
            seen = stat(node, name)
            assert (seen["state"], seen["id"], seen["fetch_here"]) == \
                ("lost", ids[name], "none (segment lost)"), seen
        record = keys.decode(oracle.kvs(keys.segment_key(name))[0].value)
        assert record["lost"] is True and record["home"] == "node1"
    with vas.connect(node2.socket) as c2:
        assert {s.name: s.state for s in c2.list("restart/")} == dict.fromkeys(NAMES, "lost")

    # The restarted home told node2 to drop its replica of the lost segment.
    wait_for(lambda: usage(node2) == (0, 0), "node2 to drop its replica", timeout=10)

    # Attaches fail at once with the documented error, on both nodes, in every mode.
    for node, mode, fetch in ((node2, "r", "lazy"), (node2, "r", "eager"), (node2, "rw", "lazy"),
                              (node1, "r", "lazy"), (node1, "rw", "eager")):
        outcome, seconds = bounded(lambda: attach_once(node, NAMES[1], mode, fetch), ATTACH_BOUND)
        assert isinstance(outcome, vas.NotFound), (node.node_id, mode, fetch, outcome)
        assert str(outcome) == (f"segment {NAMES[1]} was lost: its home node node1 restarted "
                                "without it (delete it to free the name)")
        print(f"attach {mode!r} fetch={fetch} on {node.node_id}: NotFound after "
              f"{seconds * 1000:.1f} ms")

    # The owner's delete finishes at once, through either node; the names are free.
    for number, name in enumerate(NAMES):
        node = (node1, node2)[number % 2]
        with vas.connect(node.socket) as client:
            client.delete(name)
            assert not oracle.kvs(keys.segment_key(name))
            assert not oracle.kvs(keys.attach_prefix(name), prefix=True)
            try:
                client.stat(name)
                raise AssertionError(f"{name} still has a record")
            except vas.NotFound:
                pass

    with vas.connect(node2.socket) as c2:
        c2.delete_space("restart/S")

    # A new segment of the same name works like any other.
    with vas.connect(node1.socket) as c1:
        fresh = c1.create(NAMES[0], MiB, mode=0o644)
        assert fresh.state == "ready" and fresh.id > ids[NAMES[0]]
        with c1.attach(NAMES[0], "rw") as mapping:
            mapping.write(0, b"y" * 4096)
            mapping.sync()
    with vas.connect(node2.socket) as c2, c2.attach(NAMES[0], fetch="eager") as mapping:
        assert mapping.read(0, 4096) == b"y" * 4096 and mapping.read(4096, 4) == bytes(4)


def test_a_restart_keeps_nothing_of_other_nodes_segments(pair, oracle):
    """Only records homed on the restarted node are marked: node2's stay ready and
    attachable from node1, including a replica node1 held before it was killed."""
    node1, node2 = pair.nodes
    with vas.connect(node2.socket) as c2:
        c2.create("mine/a", MiB, mode=0o644)
    attach_once(node1, "mine/a", fetch="eager")
    restart(node1)
    assert stat(node1, "mine/a")["state"] == "ready"
    assert not keys.decode(oracle.kvs(keys.segment_key("mine/a"))[0].value)["lost"]
    # node1's replica went with the process; its report went with the old lease.
    assert not oracle.kvs(keys.attach_key("mine/a", "node1"))
    outcome, _ = bounded(lambda: attach_once(node1, "mine/a", fetch="eager"), ATTACH_BOUND)
    assert outcome is None
