"""Node membership: a node is live while its record exists under its etcd lease.

RegisterNode grants a lease and writes ``/vas/nodes/ID`` with it; Heartbeat
keeps the lease alive (and refreshes the usage figures); when the lease
lapses etcd deletes the record and the node's attachment reports with it.

An agent starting up registers with ``reconcile``: it holds no memory of an
earlier incarnation, so before its record is written the old lease is revoked
and the segment records homed on it that it does not hold are marked lost
(``Segments.mark_lost``). In that order no record homed on the node reads
``ready`` without memory at any moment: until the new record is written the
node is absent (those records derive ``lost``), and a CreateSegment of the old
incarnation still in flight fails its lease compare.
"""
from __future__ import annotations

from collections.abc import Iterable

from vas.coordinator import keys
from vas.coordinator.etcd import Etcd, put_op, unchanged
from vas.coordinator.segments import Segments
from vas.core.errors import NotFound
from vas.proto import types_pb2

STATE_NAMES = {types_pb2.NODE_STATE_READY: "ready", types_pb2.NODE_STATE_DRAINING: "draining"}
STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}


def record_of(node: types_pb2.NodeInfo) -> dict:
    """The stored record of a NodeInfo (state as a word, "ready" when unspecified)."""
    return {"id": node.id, "address": node.address, "socket": node.socket,
            "memory_total": node.memory_total, "memory_used": node.memory_used,
            "segments": node.segments, "state": STATE_NAMES.get(node.state, "ready")}


def node_of(record: dict) -> types_pb2.NodeInfo:
    """The NodeInfo of a stored record."""
    return types_pb2.NodeInfo(
        id=record["id"], address=record["address"], socket=record["socket"],
        memory_total=record["memory_total"], memory_used=record["memory_used"],
        segments=record["segments"], state=STATE_VALUES.get(record["state"], 0))


class Nodes:
    """Node registration, heartbeats and listing over one etcd client."""

    def __init__(self, etcd: Etcd, default_ttl: int, segments: Segments):
        self.etcd = etcd
        self.default_ttl = default_ttl
        self.segments = segments

    def register(self, node: types_pb2.NodeInfo, ttl: int, *, reconcile: bool = False,
                 held: Iterable[int] = ()) -> tuple[int, int, list[types_pb2.SegmentInfo]]:
        """Write ``node``'s record under a fresh lease; (lease id, granted ttl, records
        marked lost).

        A record of the same id is replaced, and its old lease revoked, so the
        attachment reports of the node's previous incarnation vanish at once.
        With ``reconcile`` the old lease goes first and the records homed on the
        node whose ids are not in ``held`` are marked lost before the new record
        is written (see the module docstring); without it no segment changes.
        """
        key = keys.node_key(node.id)
        old = self.etcd.range(key).kvs
        lost = []
        if reconcile:
            if old and old[0].lease:
                self.etcd.revoke(old[0].lease)
            lost = self.segments.mark_lost(node.id, set(held))
        lease, granted = self.etcd.grant(ttl or self.default_ttl)
        self.etcd.txn(success=[put_op(key, keys.encode(record_of(node)), lease)])
        if not reconcile and old and old[0].lease and old[0].lease != lease:
            self.etcd.revoke(old[0].lease)
        return lease, granted, lost

    def heartbeat(self, node_id: str, lease_id: int, memory_used: int, segments: int,
                  state: int) -> int:
        """Keep the node's lease alive and store its usage; the granted TTL.

        Raises NotFound when the lease has expired or the id was registered
        again under another lease: the node must register again.
        """
        ttl = self._keepalive(node_id, lease_id)
        key = keys.node_key(node_id)
        kvs = self.etcd.range(key).kvs
        if not kvs or kvs[0].lease != lease_id:
            raise NotFound(f"node {node_id!r} is not registered under lease {lease_id}: "
                           "register again")
        record = keys.decode(kvs[0].value)
        updated = {**record, "memory_used": memory_used, "segments": segments,
                   "state": STATE_NAMES.get(state, record["state"])}
        if updated != record:  # an unchanged record costs no raft write
            # A failed compare means a concurrent re-registration; the next heartbeat tells.
            self.etcd.txn(compare=[unchanged(key, kvs[0].mod_revision)],
                          success=[put_op(key, keys.encode(updated), lease_id)])
        return ttl

    def _keepalive(self, node_id: str, lease_id: int) -> int:
        ttl = self.etcd.keepalive(lease_id)
        if ttl <= 0:
            raise NotFound(f"lease {lease_id} of node {node_id!r} has expired: register again")
        return ttl

    def deregister(self, node_id: str, lease_id: int) -> None:
        """Revoke the node's lease (its record and reports vanish); idempotent."""
        self.etcd.revoke(lease_id)

    def address(self, node_id: str) -> str | None:
        """The gRPC address of live node ``node_id``; None if it is not registered."""
        response = self.etcd.range(keys.node_key(node_id))
        return node_of(keys.decode(response.kvs[0].value)).address if response.kvs else None

    def list(self) -> list[types_pb2.NodeInfo]:
        """All live nodes, ordered by id."""
        response = self.etcd.range(keys.NODES, keys.NODES_END)
        return [node_of(keys.decode(kv.value)) for kv in response.kvs]
