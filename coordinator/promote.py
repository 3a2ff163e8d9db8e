"""Promotion: a backup becomes the home of a segment whose home's lease lapsed.

A segment created with ``replicas=k`` is kept, besides its home, by k backup
nodes (the record's ``"backups"``): full copies the home brings to every new
version before ``sync()`` returns (node/backups.py). When the home node's
lease lapses (``DownWatch``), or a restarted home reconciles (RegisterNode),
``Promoter.promote_node`` runs over the records homed on that node that have
backups:

1. Ask each live backup node for its copy's state (``Node.BackupState``:
   version applied, version staged). A copy serves if it holds the record's
   version applied, or staged (the home published it and died before it told
   the backups to apply it: published, so acknowledged or about to be).
2. One etcd transaction, compared on the record unchanged and the chosen
   node's key still under the lease read: ``home`` = the chosen node (the
   first serving one by id, so racing coordinators choose alike), ``backups``
   = the others. A coordinator that loses the race re-reads and finds the
   home live: nothing more to do.
3. ``Node.PromoteBackup`` to the chosen node: its agent turns the copy into a
   home segment (idempotent). Should that call not arrive (this coordinator
   dies), the agent promotes itself at the first attach or page request that
   finds itself named home (node/agent.py).

No copy holding the version: the record is marked lost (``Segments.mark_lost``'s
mark), never served empty or stale, and the holders of replicas are told.
"""
from __future__ import annotations

import logging

import grpc

from vas.coordinator import keys
from vas.coordinator.etcd import leased, put_op, range_op, unchanged
from vas.coordinator.retry import retries
from vas.coordinator.segments import Entry, Segments
from vas.core.errors import VasError, from_rpc_error
from vas.proto import node_pb2, types_pb2

log = logging.getLogger(__name__)

#: Seconds a backup node has to answer BackupState / PromoteBackup.
ASK_TIMEOUT = 2.0
#: Records read per page while looking for those homed on a node.
_SCAN_PAGE = 1000


class Promoter:
    """Promotes backups of the segments homed on a node that went down."""

    def __init__(self, segments: Segments, stub, announce):
        self.segments = segments
        self.etcd = segments.etcd
        self._stub = stub          # address -> Node stub (coordinator/homes.py)
        self._announce = announce  # SegmentInfo of a record marked lost -> tell its holders

    def promote_node(self, node_id: str, held: frozenset[int] = frozenset()
                     ) -> list[types_pb2.SegmentInfo]:
        """Promote a backup of every record homed on ``node_id`` (not registered now)
        that has backups, but those whose id is in ``held`` (a restarted home that
        kept them); the records marked lost for want of a copy."""
        lost = []
        for entry in self._homed_with_backups(node_id):
            if entry.id in held:
                continue
            try:
                info = self._promote(entry)
            except VasError as exc:
                log.warning("cannot promote a backup of segment %s: %s", entry.name, exc)
                continue
            if info is not None:
                lost.append(info)
        return lost

    def _homed_with_backups(self, node_id: str) -> list[Entry]:
        found = []
        start, end = keys.SEGMENTS, keys.prefix_end(keys.SEGMENTS)
        while True:
            page = self.etcd.range(start, end, limit=_SCAN_PAGE)
            found += [entry for entry in map(Entry.from_kv, page.kvs)
                      if entry.record["home"] == node_id and entry.record.get("backups")
                      and not entry.record["deleting"] and not entry.record.get("lost")]
            if not page.more or not page.kvs:
                return found
            start = page.kvs[-1].key + b"\0"

    def _promote(self, entry: Entry) -> types_pb2.SegmentInfo | None:
        """Promote one record's backup (see the module docstring); its lost SegmentInfo
        when no backup holds its version, else None."""
        key = keys.segment_key(entry.name)
        for _ in retries(self.segments.attempts, f"promote a backup of {entry.name!r}"):
            nodes = {keys.name_of(kv.key, keys.NODES): kv
                     for kv in self.etcd.range(keys.NODES, keys.NODES_END).kvs}
            record = entry.record
            if (record["home"] in nodes or record["deleting"] or record.get("lost")
                    or not record.get("backups")):
                return None  # promoted by another coordinator, back up, or deleted
            serving = [node for node in sorted(record["backups"]) if node in nodes
                       and self._holds(entry, _address(nodes[node]), node)]
            if not serving:
                return self._mark_lost(entry)
            chosen = serving[0]
            promoted = {**record, "home": chosen,
                        "backups": [node for node in record["backups"] if node != chosen]}
            response = self.etcd.txn(
                compare=[unchanged(key, entry.mod),
                         leased(keys.node_key(chosen), nodes[chosen].lease)],
                success=[put_op(key, keys.encode(promoted), entry.lease)],
                failure=[range_op(key)])
            if response.succeeded:
                self.segments.cache.drop(entry.name)
                log.warning("segment %s (id %d, version %d): home %s is down; promoted the "
                            "backup on %s", entry.name, entry.id, record["version"],
                            record["home"], chosen)
                self._tell_promoted(entry, _address(nodes[chosen]), chosen)
                return None
            kvs = response.responses[0].response_range.kvs
            if not kvs or kvs[0].create_revision != entry.id:
                return None  # deleted meanwhile
            entry = Entry.from_kv(kvs[0])

    def _holds(self, entry: Entry, address: str, node: str) -> bool:
        """Whether ``node``'s backup of ``entry`` holds the record's version (applied or
        staged); False when it does not answer."""
        version = entry.record["version"]
        try:
            state = self._stub(address).BackupState(
                node_pb2.BackupStateRequest(name=entry.name, id=entry.id), timeout=ASK_TIMEOUT)
        except grpc.RpcError as exc:
            log.warning("backup of %s on node %s did not answer: %s", entry.name, node,
                        from_rpc_error(exc))
            return False
        return version in (state.applied, state.staged)

    def _tell_promoted(self, entry: Entry, address: str, node: str) -> None:
        try:
            self._stub(address).PromoteBackup(
                node_pb2.PromoteBackupRequest(name=entry.name, id=entry.id,
                                              version=entry.record["version"]),
                timeout=ASK_TIMEOUT)
        except grpc.RpcError as exc:  # it promotes itself when asked for the segment
            log.warning("cannot tell node %s it is now home of %s: %s", node, entry.name,
                        from_rpc_error(exc))

    def _mark_lost(self, entry: Entry) -> types_pb2.SegmentInfo | None:
        marked = self.segments.mark_entries_lost([entry], entry.record["home"])
        for info in marked:
            log.warning("segment %s (id %d): home %s is down and no backup holds version "
                        "%d: marked lost", info.name, info.id, entry.record["home"],
                        entry.record["version"])
            self._announce(info)
        return marked[0] if marked else None


def _address(node_kv) -> str:
    return keys.decode(node_kv.value)["address"]
