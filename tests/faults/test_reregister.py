"""Attachment counts and replica reports survive a re-registration.

A node's reports live under its lease. When the lease is gone (here: revoked in etcd
directly, as a partition or a long stall would let it lapse) the reports vanish with
it; the agent finds out at its next heartbeat, registers again and reports every
home segment with attachments and every replica it holds, attached or not. A node
that registers again kept its memory: nothing of its own becomes lost.

etcd is the oracle: the node and attach keys are read (and the lease revoked) through
etcd's own API, not through vas.
"""
from __future__ import annotations

import vas
from faultkit import usage
from vas.coordinator import keys
from waiting import wait_for

MiB = 1 << 20
#: Seconds for an agent to notice a revoked lease (a heartbeat every ttl/3 = 3.3 s)
#: and report again (debounced by 50 ms).
COME_BACK = 15.0


def lease_of(oracle, node_id: str) -> int:
    kvs = oracle.kvs(keys.node_key(node_id))
    return kvs[0].lease if kvs else 0


def reports(oracle, name: str) -> dict[str, dict]:
    """node id -> stored report of ``name``."""
    return {keys.split_attach_key(kv.key)[1]: keys.decode(kv.value)
            for kv in oracle.kvs(keys.attach_prefix(name), prefix=True)}


def test_replica_counts_and_copies_come_back_after_the_lease_is_revoked(pair, oracle):
    node1, node2 = pair.nodes
    c1, c2 = vas.connect(node1.socket), vas.connect(node2.socket)
    try:
        attached = c1.create("rereg/attached", MiB, mode=0o644)
        idle = c1.create("rereg/idle", MiB, mode=0o644)
        home_view = c1.attach("rereg/attached")
        views = [c2.attach("rereg/attached", fetch=fetch) for fetch in ("eager", "lazy")]
        c2.attach("rereg/idle", fetch="eager").detach()  # a replica held, not attached
        before = {"node1": {"id": attached.id, "count": 1},
                  "node2": {"id": attached.id, "count": 2, "copy": True}}
        wait_for(lambda: reports(oracle, "rereg/attached") == before, "the first reports")
        wait_for(lambda: reports(oracle, "rereg/idle") == {
            "node2": {"id": idle.id, "count": 0, "copy": True}}, "the idle replica's report")
        assert c1.stat("rereg/attached").attachments == 3

        old = lease_of(oracle, "node2")
        oracle.revoke(old)
        assert reports(oracle, "rereg/attached") == {"node1": before["node1"]}
        assert reports(oracle, "rereg/idle") == {}

        wait_for(lambda: lease_of(oracle, "node2") not in (0, old), "node2 to register again",
                 timeout=COME_BACK)
        wait_for(lambda: reports(oracle, "rereg/attached") == before,
                 "node2's counts to come back", timeout=COME_BACK)
        wait_for(lambda: reports(oracle, "rereg/idle") == {
            "node2": {"id": idle.id, "count": 0, "copy": True}},
            "node2's idle replica to be reported again", timeout=COME_BACK)
        assert c1.stat("rereg/attached").attachments == 3
        assert usage(node2) == (2 * MiB, 2)  # it kept both replicas
        for view in views:
            view.detach()
        wait_for(lambda: reports(oracle, "rereg/attached") == {
            "node1": before["node1"], "node2": {"id": attached.id, "count": 0, "copy": True}},
            "node2's detaches to be counted")
        home_view.detach()
    finally:
        c1.close()
        c2.close()


def test_a_home_that_registers_again_keeps_its_segments_ready(pair, oracle):
    """Registering again is not a restart: the segments stay ready, their counts come back."""
    node1, node2 = pair.nodes
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2:
        info = c1.create("rereg/home", MiB, mode=0o644)
        with c1.attach("rereg/home"), c2.attach("rereg/home", fetch="eager"):
            wait_for(lambda: c1.stat("rereg/home").attachments == 2, "the first reports")
            old = lease_of(oracle, "node1")
            oracle.revoke(old)
            assert c2.stat("rereg/home").state == "lost"  # node1 is not registered now
            wait_for(lambda: lease_of(oracle, "node1") not in (0, old),
                     "node1 to register again", timeout=COME_BACK)
            wait_for(lambda: c2.stat("rereg/home").attachments == 2,
                     "node1's count to come back", timeout=COME_BACK)
            seen = c2.stat("rereg/home")
            assert (seen.state, seen.id) == ("ready", info.id)
            assert not keys.decode(oracle.kvs(keys.segment_key("rereg/home"))[0].value)["lost"]
        with c2.attach("rereg/home", fetch="eager") as mapping:
            assert mapping.read(0, 8) == bytes(8)
