"""Node membership: a node is live while its record exists under its etcd lease.

RegisterNode grants a lease and writes ``/vas/nodes/ID`` with it; Heartbeat
keeps the lease alive (and refreshes the usage figures); when the lease
lapses etcd deletes the record and the node's attachment reports with it.

A node is also a *member* (``/vas/members/ID``, no lease, written with the node
key) until it leaves on purpose: DeregisterNode (a clean shutdown) or
RemoveNode (an operator's ``vasctl node rm``). A member without a node key is
**down**: its lease lapsed (killed, crashed, cut off). ``DownWatch`` (one per
coordinator) watches the node keys and writes when it saw one vanish
(``down_since``) into the member record, with the replicas whose reports
vanished in the same revision (the copies lost with the node: their segments
read ``degraded`` in ClusterStatus), and promotes a backup of each segment
homed on that node (coordinator/promote.py). Node states::

    (absent) --RegisterNode--> up --lease lapses--> down --RegisterNode--> up
        up --DeregisterNode / RemoveNode --force--> (absent)
        down --RemoveNode--> (absent)

An agent starting up registers with ``reconcile``: it holds no memory of an
earlier incarnation, so before its record is written the old lease is revoked
and the segment records homed on it that it does not hold are marked lost
(``Segments.mark_lost``). In that order no record homed on the node reads
``ready`` without memory at any moment: until the new record is written the
node is absent (those records derive ``lost``), and a CreateSegment of the old
incarnation still in flight fails its lease compare.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from vas.coordinator import keys
from vas.coordinator.etcd import (Etcd, absent, delete_op, leased, put_op, range_op, translate,
                                  unchanged)
from vas.coordinator.segments import Segments
from vas.core.errors import Busy, NotFound, PermissionDenied, Unavailable, VasError
from vas.proto import types_pb2

log = logging.getLogger(__name__)

STATE_NAMES = {types_pb2.NODE_STATE_READY: "ready", types_pb2.NODE_STATE_DRAINING: "draining"}
STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}


def record_of(node: types_pb2.NodeInfo) -> dict:
    """The stored record of a NodeInfo (state as a word, "ready" when unspecified)."""
    return {"id": node.id, "address": node.address, "socket": node.socket,
            "memory_total": node.memory_total, "memory_used": node.memory_used,
            "segments": node.segments, "state": STATE_NAMES.get(node.state, "ready"),
            "replicas": node.replicas, "replica_bytes": node.replica_bytes}


def member_of(node: types_pb2.NodeInfo) -> dict:
    """The member record of a node that (re-)registers: up, no replica lost with it."""
    return {"id": node.id, "address": node.address, "socket": node.socket,
            "memory_total": node.memory_total, "down_since": 0, "replicas": []}


def node_of(record: dict) -> types_pb2.NodeInfo:
    """The NodeInfo of a stored node record (records written before the replica
    figures existed read as holding none)."""
    return types_pb2.NodeInfo(
        id=record["id"], address=record["address"], socket=record["socket"],
        memory_total=record["memory_total"], memory_used=record["memory_used"],
        segments=record["segments"], state=STATE_VALUES.get(record["state"], 0),
        replicas=record.get("replicas", 0), replica_bytes=record.get("replica_bytes", 0))


def down_node_of(member: dict) -> types_pb2.NodeInfo:
    """The NodeInfo of a member whose node key is gone: state DOWN, no usage."""
    return types_pb2.NodeInfo(
        id=member["id"], address=member["address"], socket=member["socket"],
        memory_total=member["memory_total"], state=types_pb2.NODE_STATE_DOWN,
        down_since=member["down_since"])


def list_of(node_kvs, member_kvs, include_down: bool) -> list[types_pb2.NodeInfo]:
    """The live nodes of a range of node keys (and, with ``include_down``, the
    members of a range of member keys that have no node key), ordered by id."""
    nodes = {info.id: info for info in (node_of(keys.decode(kv.value)) for kv in node_kvs)}
    if include_down:
        for kv in member_kvs:
            member = keys.decode(kv.value)
            if member["id"] not in nodes:
                nodes[member["id"]] = down_node_of(member)
    return [nodes[node_id] for node_id in sorted(nodes)]


class Nodes:
    """Node registration, heartbeats and listing over one etcd client."""

    def __init__(self, etcd: Etcd, default_ttl: int, segments: Segments):
        self.etcd = etcd
        self.default_ttl = default_ttl
        self.segments = segments
        #: node id -> promote the backups of the records homed there (set by the
        #: service: coordinator/promote.py); the records marked lost for want of one.
        self.promote = lambda node_id, held=frozenset(): []

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
            # A record with backups is not lost with this node's memory: a backup
            # becomes its home first (the node key is absent now, as promotion needs).
            lost = self.promote(node.id, frozenset(held))
            lost += self.segments.mark_lost(node.id, set(held))
        lease, granted = self.etcd.grant(ttl or self.default_ttl)
        self.etcd.txn(success=[put_op(key, keys.encode(record_of(node)), lease),
                               put_op(keys.member_key(node.id), keys.encode(member_of(node)))])
        if not reconcile and old and old[0].lease and old[0].lease != lease:
            self.etcd.revoke(old[0].lease)
        return lease, granted, lost

    def heartbeat(self, node_id: str, lease_id: int, memory_used: int, segments: int,
                  state: int, replicas: int = 0, replica_bytes: int = 0) -> int:
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
                   "state": STATE_NAMES.get(state, record["state"]),
                   "replicas": replicas, "replica_bytes": replica_bytes}
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
        """Revoke the node's lease (its record and reports vanish) and forget the
        member (it left on purpose: not listed as down); idempotent. The member
        goes first, and only while the node key is of that lease (a newer
        incarnation's stays)."""
        self.etcd.txn(compare=[leased(keys.node_key(node_id), lease_id)],
                      success=[delete_op(keys.member_key(node_id))])
        self.etcd.revoke(lease_id)

    def remove(self, caller: types_pb2.Caller, node_id: str, force: bool
               ) -> tuple[types_pb2.NodeInfo, list[types_pb2.SegmentInfo]]:
        """Forget node ``node_id`` (RemoveNode): a down node, or with ``force`` a live
        one (its lease is revoked); (the node as it was listed, the records homed on a
        down node that this marked lost or removed, as ``Segments.mark_lost``).

        Removing a down node declares its memory gone: the records homed on it are
        marked lost (permanent: attaches get NotFound, a delete removes them at
        once), as its restart would. A live node removed with ``force`` keeps
        its records: its agent still holds them and registers again.

        Raises PermissionDenied unless ``caller`` is root, NotFound for an unknown
        node, Busy for a live node without ``force`` (or one that registered again
        while it was being removed).
        """
        if caller.uid != 0:
            raise PermissionDenied(f"permission denied: only root may remove node {node_id!r} "
                                   f"(uid {caller.uid})")
        node_key, member_key = keys.node_key(node_id), keys.member_key(node_id)
        response = self.etcd.txn(success=[range_op(node_key), range_op(member_key)])
        node_kvs, member_kvs = (op.response_range.kvs for op in response.responses)
        if node_kvs:
            if not force:
                raise Busy(f"node {node_id!r} is up (its lease is live): stop its agent first, "
                           "or remove it with --force")
            info = node_of(keys.decode(node_kvs[0].value))
            self.etcd.txn(success=[delete_op(member_key)])
            self.etcd.revoke(node_kvs[0].lease)
            return info, []
        if not member_kvs:
            raise NotFound(f"no node {node_id!r}")
        done = self.etcd.txn(compare=[absent(node_key),
                                      unchanged(member_key, member_kvs[0].mod_revision)],
                             success=[delete_op(member_key)])
        if not done.succeeded:
            raise Busy(f"node {node_id!r} changed while being removed (registered again?): "
                       "list the nodes and retry")
        return (down_node_of(keys.decode(member_kvs[0].value)),
                self.segments.mark_lost(node_id, set()))

    def address(self, node_id: str) -> str | None:
        """The gRPC address of live node ``node_id``; None if it is not registered."""
        response = self.etcd.range(keys.node_key(node_id))
        return node_of(keys.decode(response.kvs[0].value)).address if response.kvs else None

    def list(self, include_down: bool = False) -> list[types_pb2.NodeInfo]:
        """All live nodes (and with ``include_down`` the down ones), ordered by id."""
        if not include_down:
            response = self.etcd.range(keys.NODES, keys.NODES_END)
            return list_of(response.kvs, (), False)
        response = self.etcd.txn(success=[range_op(keys.NODES, keys.NODES_END),
                                          range_op(keys.MEMBERS, keys.MEMBERS_END)])
        nodes, members = (op.response_range.kvs for op in response.responses)
        return list_of(nodes, members, True)


#: Most writes a coordinator makes to carry etcd's revision past the newest it saw
#: before a restore without a revision bump (DownWatch._catch_up).
MAX_CATCH_UP = 100_000


class DownWatch:
    """Marks members down when their node key vanishes (see the module docstring).

    One per coordinator, in a thread of its own (``run(stop)``): a sweep first
    (members without a node key and not marked: their lease lapsed while no
    coordinator watched, so ``down_since`` is the sweep's time), then one etcd
    watch of deletes over ``[/vas/attach/, /vas/nodes0)`` from the sweep's
    revision on. etcd deletes a lapsed lease's keys in one revision, delivered
    in one watch response: the node key's delete and its replica reports'
    (``copy``) come together, matched by lease. Every coordinator marks; the
    compare (node key absent, member unchanged) lets one write win. A node
    that left on purpose has no member record by then, so nothing is marked.
    A failed watch (etcd away) is opened again, after a new sweep.

    It also notices etcd going back in time (restored from a snapshot, see
    "Restoring etcd" in docs/ARCHITECTURE.md): a sweep reading a revision below the
    newest this watch has seen (a plain restore), or a watch resumed just after that
    revision answered "compacted" (a restore with ``--bump-revision
    --mark-compacted``). Then it calls ``rewound`` (the coordinator drops its
    guesses) and revokes every node lease: each agent finds its lease gone at its
    next heartbeat and registers again, reconciling with what it holds, so records
    the snapshot has and the agents freed since read ``lost`` and memory the
    snapshot has no record of is freed.
    """

    def __init__(self, etcd: Etcd, retry_interval: float = 1.0,
                 rewound: Callable[[], None] = lambda: None,
                 promote=lambda node_id: []):
        self.etcd = etcd
        self.retry_interval = retry_interval
        self._rewound = rewound
        #: node id -> promote backups of the records homed on it (coordinator/promote.py)
        self.promote = promote
        self._lock = threading.Lock()
        self._call = None
        self._requests: queue.Queue | None = None
        self._stopped = False
        # The newest revision of any etcd answer when the watch last broke (0: none yet):
        # taken then, not at the reopen, when answers of a restored etcd may have come.
        self._seen = 0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._watch(self._resume_from(self._seen, self._sweep()))
            except grpc.RpcError as exc:
                if not self._stopped and exc.code() != grpc.StatusCode.CANCELLED:
                    log.warning("watching node leases: %s; again in %.0f s",
                                translate(exc, self.etcd.url), self.retry_interval)
            except VasError as exc:
                log.warning("watching node leases: %s; again in %.0f s", exc,
                            self.retry_interval)
            except Exception:  # noqa: BLE001  a bug must not end the marking for good
                log.exception("watching node leases failed; again in %.0f s",
                              self.retry_interval)
            stop.wait(self.retry_interval)

    def close(self) -> None:
        """End the watch (``run`` returns once its stop event is set too)."""
        with self._lock:
            self._stopped = True
            call, requests = self._call, self._requests
        if requests is not None:
            requests.put(None)
        if call is not None:
            call.cancel()

    def _sweep(self) -> int:
        """Mark members found down now; the revision read."""
        response = self.etcd.txn(success=[range_op(keys.NODES, keys.NODES_END, keys_only=True),
                                          range_op(keys.MEMBERS, keys.MEMBERS_END)])
        nodes, members = (op.response_range for op in response.responses)
        live = {keys.name_of(kv.key, keys.NODES) for kv in nodes.kvs}
        for kv in members.kvs:
            member = keys.decode(kv.value)
            if member["id"] not in live and not member["down_since"]:
                self._mark(member["id"], [])
            if member["id"] not in live:  # also finishes a promotion a dead coordinator began
                self.promote(member["id"])
        return response.header.revision

    def _resume_from(self, seen: int, revision: int) -> int:
        """The revision to watch after: ``seen``, the newest this coordinator saw in any
        etcd answer before the watch broke (so that a compaction past it shows), unless
        the sweep read an older ``revision`` (etcd went back) or nothing was seen yet."""
        if revision < seen:
            why = f"etcd's revision went back from {seen} to {revision}"
            revision = self._catch_up(revision, seen)  # before any agent registers again
            self._rewind(why, revision)
            return revision
        return seen or revision

    def _catch_up(self, revision: int, seen: int) -> int:
        """Write /vas/rewind until etcd's revision passes ``seen`` (what ``etcdutl snapshot
        restore --bump-revision`` does at once, which etcd 3.4 lacks): segment ids and
        fencing tokens are revisions, and the lost timeline handed out those up to
        ``seen``. At most MAX_CATCH_UP writes (~1 ms each); beyond that it says so (the
        agents' checks after registering again still drop every stale holder, but a new
        segment of an old name could meet an old id meanwhile). The revision reached."""
        if seen - revision > MAX_CATCH_UP:
            log.error("etcd is %d revisions behind the newest seen (%d): too many to catch "
                      "up one write at a time; restore with `etcdutl snapshot restore "
                      "--bump-revision N --mark-compacted` instead", seen - revision, seen)
            return revision
        while revision <= seen:
            revision = self.etcd.txn(success=[put_op(keys.REWIND, b"")]).header.revision
        return self.etcd.txn(success=[delete_op(keys.REWIND)]).header.revision

    def _rewind(self, why: str, revision: int) -> None:
        """etcd was restored from a snapshot: drop guesses, make every agent register again."""
        log.warning("%s (restored from a snapshot?): revoking every node lease so that "
                    "the agents register again and reconcile", why)
        self._rewound()
        self.etcd.newest_revision = self._seen = revision
        for kv in self.etcd.range(keys.NODES, keys.NODES_END, keys_only=True).kvs:
            if kv.lease:
                self.etcd.revoke(kv.lease)

    def _watch(self, revision: int) -> None:
        requests: queue.Queue = queue.Queue()
        call = self.etcd.watch(iter(requests.get, None))
        with self._lock:
            if self._stopped:
                call.cancel()
                return
            self._call, self._requests = call, requests
        requests.put(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=keys.ATTACH, range_end=keys.NODES_END, start_revision=revision + 1,
            prev_kv=True, filters=[etcdrpc.WatchCreateRequest.NOPUT])))
        try:
            self._follow(call, revision)
        finally:
            self._seen = max(self._seen, self.etcd.newest_revision)

    def _follow(self, call, revision: int) -> None:
        """Mark members as the watch (from after ``revision``) reports their node keys gone."""
        for response in call:
            if response.canceled and response.compact_revision > revision + 1:
                # Compacted past a revision seen before (etcd keeps an hour of history).
                self._rewind(f"etcd compacted its history up to revision "
                             f"{response.compact_revision}, past revision {revision} seen",
                             response.compact_revision)
                return
            if response.canceled:
                raise Unavailable(f"etcd cancelled the watch of node keys: "
                               f"{response.cancel_reason or 'compacted'}")
            self._deleted(response.events)

    def _deleted(self, events) -> None:
        """Mark the members whose node key is among ``events`` (deletes), each with the
        replicas reported under the same lease."""
        copies: dict[int, list] = {}
        gone = []
        for event in events:
            if event.type != kv_pb2.Event.DELETE or not event.prev_kv.key:
                continue
            key = event.kv.key
            if key.startswith(keys.NODES):
                gone.append((keys.name_of(key, keys.NODES), event.prev_kv.lease))
            elif key.startswith(keys.ATTACH):
                report = keys.decode(event.prev_kv.value)
                if report.get("copy"):
                    name, _ = keys.split_attach_key(key)
                    copies.setdefault(event.prev_kv.lease, []).append([name, report["id"]])
        for node_id, lease in gone:
            self._mark(node_id, copies.get(lease, []))
            self.promote(node_id)

    def _mark(self, node_id: str, replicas: list) -> None:
        """Write ``down_since`` (now) and the lost ``replicas`` into the member record of
        ``node_id`` if it has none yet and the node is still absent."""
        member_key = keys.member_key(node_id)
        kvs = self.etcd.range(member_key).kvs
        if not kvs:
            return  # it left on purpose
        member = keys.decode(kvs[0].value)
        if member["down_since"]:
            return
        member.update(down_since=time.time(), replicas=replicas)
        done = self.etcd.txn(compare=[absent(keys.node_key(node_id)),
                                      unchanged(member_key, kvs[0].mod_revision)],
                             success=[put_op(member_key, keys.encode(member))])
        if done.succeeded:
            log.warning("node %s is down (its lease lapsed); %d replicas went with it",
                        node_id, len(replicas))
