"""Segments: naming, address allocation, mode/owner changes, delete marks, attachment counts.

Every read-modify-write is one etcd transaction that compares the revision the
decision was made on, retried (a bounded number of times: ``retry.retries``) when another
coordinator got there first. Records seen by earlier calls are kept in a small
cache, but only as a guess: a transaction built from a cached record compares
its mod_revision, so a stale guess fails the compare and costs one retry with
the fresh record that the failure branch returns; it is never acted on. That
keeps the coordinator stateless while a create, delete mark or chmod takes one
etcd round trip in the common case.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from vas.coordinator import access, keys
from vas.coordinator.etcd import (Etcd, EtcdError, absent, created_at, delete_op, leased,
                                  put_op, range_op, unchanged)
from vas.coordinator.retry import retries
from vas.core.errors import (AlreadyExists, Busy, CapacityExceeded, InvalidArgument,
                             NotFound, PermissionDenied, Unavailable, VasError)
from vas.core.sizes import human_size
from vas.proto import types_pb2

# The address window every segment is placed in (16 TiB, far above where Linux puts
# heap, libraries and stacks of ordinary processes, below the 47-bit user limit).
WINDOW_START = 0x2000_0000_0000
WINDOW_END = 0x3000_0000_0000
#: Segment addresses are aligned to huge pages, so a segment may be huge-page backed.
ALIGN = 2 << 20
#: Unmapped gap after each segment: a run past its end faults instead of
#: silently writing into the next segment.
GUARD = 2 << 20

_CACHE_ENTRIES = 4096
#: etcd's default --max-txn-ops: the most operations in one branch of a transaction.
_MAX_TXN_OPS = 128
#: ``mark_lost`` reads the segment records in pages of this many, and writes them in
#: transactions of ``_LOST_BATCH`` records (a removal is 3 operations: 96 <= 128).
_SCAN_PAGE = 1000
_LOST_BATCH = 32


def align_up(value: int, alignment: int = ALIGN) -> int:
    """``value`` rounded up to a multiple of ``alignment``."""
    return -(-value // alignment) * alignment


def place(next_address: int, size: int) -> tuple[int, int]:
    """(address of a new segment of ``size`` bytes, the allocator's next address after it).

    Bump allocation: ranges are never reused, so an address seen once always
    means the same segment (16 TiB lasts for millions of GiB-sized segments).

    >>> hex(place(WINDOW_START, 4096)[0]), hex(place(WINDOW_START, 4096)[1])
    ('0x200000000000', '0x200000400000')
    """
    address = align_up(max(next_address, WINDOW_START))
    if address + size > WINDOW_END:
        raise CapacityExceeded(f"the address window is exhausted: no room for {human_size(size)}")
    return address, align_up(address + size) + GUARD


@dataclass(frozen=True)
class Entry:
    """A segment record as read from etcd: ``id`` is the key's create_revision."""

    name: str
    id: int
    mod: int
    lease: int
    record: dict

    @classmethod
    def from_kv(cls, kv) -> "Entry":
        return cls(keys.name_of(kv.key, keys.SEGMENTS), kv.create_revision, kv.mod_revision,
                   kv.lease, keys.decode(kv.value))


def state_of(record: dict, live_nodes: set[str] | frozenset[str]) -> int:
    """The SegmentState a record is in, given the ids of the live nodes.

    A delete mark wins; then the lost mark (the home restarted without the
    segment, or went down with no backup holding its version: permanent,
    whatever nodes live); then the home's liveness: a segment whose home is not
    registered is lost until a coordinator promotes a backup (nodes.py
    ``Promoter``: the record then names the new home). A live home with fewer
    live backups than ``replicas`` is degraded. Records written before the lost
    mark or backups existed have no "lost" or "backups" key. ClusterStatus also
    names as degraded the ready segments that lost an on-demand replica with a
    down node (status.py).
    """
    if record["deleting"]:
        return types_pb2.SEGMENT_STATE_DELETING
    if record.get("lost"):
        return types_pb2.SEGMENT_STATE_LOST
    if record["home"] not in live_nodes:
        return types_pb2.SEGMENT_STATE_LOST
    live_backups = sum(1 for node in record.get("backups", ()) if node in live_nodes)
    if live_backups < record["replicas"]:
        return types_pb2.SEGMENT_STATE_DEGRADED
    return types_pb2.SEGMENT_STATE_READY


def place_backups(nodes: list[dict], home: str, size: int, count: int) -> list[str]:
    """The ids of ``count`` live nodes other than ``home`` to keep backups of a segment of
    ``size`` bytes: those with the most free memory, each with at least ``size`` free
    (``nodes`` are node records). Raises CapacityExceeded when fewer have room.

    >>> place_backups([{"id": "a", "memory_total": 8, "memory_used": 0},
    ...                {"id": "b", "memory_total": 8, "memory_used": 6},
    ...                {"id": "c", "memory_total": 8, "memory_used": 1}], "a", 2, 2)
    ['b', 'c']
    """
    def free(node: dict) -> int:
        return node["memory_total"] - node["memory_used"]
    roomy = sorted((node for node in nodes if node["id"] != home and free(node) >= size),
                   key=lambda node: (-free(node), node["id"]))
    if len(roomy) < count:
        raise CapacityExceeded(
            f"replicas={count}: only {len(roomy)} of the live nodes other than the home "
            f"{home!r} have {human_size(size)} free, {count} needed")
    return sorted(node["id"] for node in roomy[:count])


def to_proto(entry: Entry, live_nodes, attachments: int = 0,
             copies: list[str] = (), attached: list[str] = ()) -> types_pb2.SegmentInfo:
    """The SegmentInfo of ``entry``; its ``copies`` are the reported replica holders
    and the record's backups, ``attached`` the nodes reporting attachments."""
    r = entry.record
    backups = r.get("backups", [])
    return types_pb2.SegmentInfo(
        name=entry.name, id=entry.id, size=r["size"], address=r["address"], mode=r["mode"],
        uid=r["uid"], gid=r["gid"], home=r["home"], replicas=r["replicas"],
        version=r["version"], state=state_of(r, live_nodes), attachments=attachments,
        created=r["created"], expires=r["expires"], copies=sorted({*copies, *backups}),
        meta=r.get("meta") or {}, backups=backups, attached_nodes=attached)


def live_nodes_of(range_response) -> set[str]:
    """Node ids in a (keys-only) range of /vas/nodes/."""
    return {keys.name_of(kv.key, keys.NODES) for kv in range_response.kvs}


class Reports:
    """The attachment reports in some attach keys, summed per (segment name, id).

    ``count(name, id)`` is the sum of the nodes' counts; ``copies(name, id)`` the
    nodes that reported holding a replica of that incarnation (sorted: attach
    keys sort by node id within a name). Reports of other ids (an older
    incarnation of the name) count for nothing.
    """

    def __init__(self, kvs):
        self._counts: dict[tuple[str, int], int] = collections.Counter()
        self._copies: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
        self._attached: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
        for kv in kvs:
            name, node = keys.split_attach_key(kv.key)
            report = keys.decode(kv.value)
            self._counts[name, report["id"]] += report["count"]
            if report.get("copy"):
                self._copies[name, report["id"]].append(node)
            if report["count"] > 0:
                self._attached[name, report["id"]].append(node)

    def count(self, name: str, segment_id: int) -> int:
        return self._counts.get((name, segment_id), 0)

    def copies(self, name: str, segment_id: int) -> list[str]:
        return self._copies.get((name, segment_id), [])

    def attached(self, name: str, segment_id: int) -> list[str]:
        """The nodes reporting live attachments of that incarnation (sorted)."""
        return self._attached.get((name, segment_id), [])


def not_found(name: str, segment_id: int = 0) -> NotFound:
    """The error of segment ``name`` (of id ``segment_id``, when nonzero) being absent."""
    if segment_id:
        return NotFound(f"segment {name!r} (id {segment_id}) not found")
    return NotFound(f"segment {name!r} not found")


def info_reads(name: str) -> list:
    """The txn ops that read what a SegmentInfo of ``name`` needs beside its record:
    the live nodes (keys only) and the name's attachment reports. See ``info_of``."""
    prefix = keys.attach_prefix(name)
    return [range_op(keys.NODES, keys.NODES_END, keys_only=True),
            range_op(prefix, keys.prefix_end(prefix))]


def info_of(entry: Entry, responses) -> types_pb2.SegmentInfo:
    """The SegmentInfo of ``entry`` given the txn responses of its ``info_reads``."""
    nodes, attach = (op.response_range for op in responses)
    reports = Reports(attach.kvs)
    return to_proto(entry, live_nodes_of(nodes), reports.count(entry.name, entry.id),
                    reports.copies(entry.name, entry.id),
                    reports.attached(entry.name, entry.id))


class RecordCache:
    """Bounded LRU of segment entries, used only as compare-guarded guesses."""

    def __init__(self, size: int = _CACHE_ENTRIES):
        self.size = size
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(name)

    def put(self, entry: Entry) -> None:
        with self._lock:
            self._entries[entry.name] = entry
            self._entries.move_to_end(entry.name)
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def drop(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class Segments:
    """Segment operations over one etcd client. Thread-safe; holds no authoritative state."""

    def __init__(self, etcd: Etcd, attempts: int):
        self.etcd = etcd
        self.attempts = attempts
        self.cache = RecordCache()
        # (mod_revision, next_address) of /vas/alloc as last seen: a guess, compared.
        self._alloc = (0, WINDOW_START)
        # Creates of this coordinator take turns on /vas/alloc rather than failing
        # each other's compares (every create rewrites that one key).
        self._alloc_lock = threading.Lock()
        # (monotonic time, message) of the last create that found etcd unavailable.
        self._alloc_failure = (0.0, "")

    def forget(self) -> None:
        """Drop every guess (cached records, the allocator's mod_revision): etcd went back
        to an older revision (restored from a snapshot), and a revision written after the
        snapshot may be written again with other contents, so an old guess could pass
        its compare."""
        self.cache.clear()
        with self._alloc_lock:
            self._alloc = (0, WINDOW_START)

    # Create ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _alloc_turn(self, name: str):
        """This create's turn on /vas/alloc. A turn normally lasts one transaction (ms),
        but while etcd does not answer each lasts the whole etcd deadline, and queued
        creates would add theirs up (the second one 10 s, ...). So a create waits for its
        turn at most one deadline, and one whose turn comes after another create found
        etcd unavailable while it waited fails at once with that create's error."""
        started = time.monotonic()
        if not self._alloc_lock.acquire(timeout=self.etcd.timeout):
            raise Unavailable(f"could not create segment {name!r}: the creates before it "
                              f"waited over {self.etcd.timeout:g} s for etcd at {self.etcd.url}")
        try:
            failed_at, error = self._alloc_failure
            if failed_at > started:
                raise Unavailable(error)
            yield
        except Unavailable as exc:
            if isinstance(exc.__cause__, grpc.RpcError):  # etcd itself did not answer
                self._alloc_failure = (time.monotonic(), str(exc))
            raise
        finally:
            self._alloc_lock.release()

    def create(self, caller, name: str, size: int, mode: int, home: str, replicas: int,
               ttl: float, home_lease: int,
               meta: dict[str, str] | None = None) -> types_pb2.SegmentInfo:
        """Claim ``name`` and an address range in one transaction; the new SegmentInfo.

        The transaction also compares that node ``home`` is registered under
        ``home_lease``: only the home's current agent, which allocated the memory
        before calling, can make a record, so a record is never ``ready`` without
        memory behind it (a call from a tool, or one still in flight from an agent
        incarnation that restarted since, is refused).

        Raises AlreadyExists, InvalidArgument (unknown home; ``home_lease`` 0),
        Unavailable (the home is registered under another lease, or its lease lapsed;
        or etcd),
        CapacityExceeded (address window full).
        """
        if not home_lease:  # lease 0 would match an absent node key: refuse before the txn
            if not self.etcd.range(keys.node_key(home), keys_only=True).kvs:
                raise InvalidArgument(f"unknown home node {home!r}")
            raise InvalidArgument(f"CreateSegment needs the lease id of home node {home!r}: "
                                  "segments are created by their home's agent")
        backups = self._place_backups(home, size, replicas) if replicas else []
        lease, granted = self.etcd.grant(max(1, math.ceil(ttl))) if ttl > 0 else (0, 0)
        created = time.time()
        record = {"size": size, "address": 0, "mode": mode, "uid": caller.uid,
                  "gid": caller.gid, "home": home, "replicas": replicas, "version": 0,
                  "created": created, "expires": created + granted if lease else 0.0,
                  "deleting": False, "lost": False}
        if backups:  # absent without: records of unreplicated segments stay as they were
            record["backups"] = backups
        if meta:  # absent when empty: records without metadata stay as they were
            record["meta"] = meta
        try:
            entry = self._claim(name, record, lease, home_lease)
        except BaseException:
            if lease:
                self.etcd.revoke_quietly(lease)
            raise
        self.cache.put(entry)
        return to_proto(entry, {home, *backups})

    def _place_backups(self, home: str, size: int, count: int) -> list[str]:
        """``place_backups`` over the live node records (their last heartbeat's usage)."""
        nodes = [keys.decode(kv.value) for kv in self.etcd.range(keys.NODES, keys.NODES_END).kvs]
        return place_backups(nodes, home, size, count)

    def _claim(self, name: str, record: dict, lease: int, home_lease: int) -> Entry:
        key, home_key = keys.segment_key(name), keys.node_key(record["home"])
        with self._alloc_turn(name):
            for _ in retries(self.attempts, f"create segment {name!r}"):
                alloc_mod, next_address = self._alloc
                record["address"], after = place(next_address, record["size"])
                response = self.etcd.txn(
                    compare=[absent(key), unchanged(keys.ALLOC, alloc_mod),
                             leased(home_key, home_lease)],
                    success=[put_op(key, keys.encode(record), lease),
                             put_op(keys.ALLOC, keys.encode({"next_address": after}))],
                    failure=[range_op(key, keys_only=True), range_op(keys.ALLOC),
                             range_op(home_key, keys_only=True),
                             range_op(keys.member_key(record["home"]), keys_only=True)])
                revision = response.header.revision
                if response.succeeded:
                    self._alloc = (revision, after)
                    return Entry(name, revision, revision, lease, record)
                segment, alloc, node, member = (op.response_range for op in response.responses)
                if segment.kvs:
                    raise AlreadyExists(f"segment {name!r} already exists")
                if not node.kvs and not member.kvs:
                    raise InvalidArgument(f"unknown home node {record['home']!r}")
                if not node.kvs:
                    # A member without a node key: its lease lapsed (etcd was paused or
                    # cut off longer than the node ttl). Its agent registers again at
                    # its next heartbeat, after which a retry of this create works.
                    raise Unavailable(
                        f"node {record['home']!r} is not registered (its lease lapsed; its "
                        "agent registers again at its next heartbeat)")
                if node.kvs[0].lease != home_lease:
                    raise Unavailable(
                        f"node {record['home']!r} is not registered under lease {home_lease} "
                        "(it registered again, or a tool called): only its current agent "
                        "creates segments homed there")
                self._alloc = ((alloc.kvs[0].mod_revision,
                                keys.decode(alloc.kvs[0].value)["next_address"])
                               if alloc.kvs else (0, WINDOW_START))

    # Reads -----------------------------------------------------------------------------

    def get(self, name: str) -> types_pb2.SegmentInfo:
        """The segment ``name`` with its state and attachment count (one read-only txn)."""
        response = self.etcd.txn(success=[range_op(keys.segment_key(name)),
                                          *info_reads(name)])
        segment = response.responses[0].response_range
        if not segment.kvs:
            raise not_found(name)
        entry = Entry.from_kv(segment.kvs[0])
        self.cache.put(entry)
        return info_of(entry, response.responses[1:])

    def list(self, prefix: str, page_size: int, page_token: str
             ) -> tuple[list[types_pb2.SegmentInfo], str]:
        """One page of segments whose names start with ``prefix``; (segments, next token)."""
        start_name = keys.decode_page_token(page_token) if page_token else prefix
        if not start_name.startswith(prefix):
            raise InvalidArgument("invalid page token: it belongs to another prefix")
        response = self.etcd.txn(success=[
            range_op(keys.segment_key(start_name),
                     keys.prefix_end(keys.segment_key(prefix)), limit=page_size),
            range_op(keys.NODES, keys.NODES_END, keys_only=True)])
        page, nodes = (op.response_range for op in response.responses)
        entries = [Entry.from_kv(kv) for kv in page.kvs]
        if not entries:
            return [], ""
        start, end = keys.attach_span(entries[0].name, entries[-1].name)
        reports = Reports(self.etcd.range(start, end).kvs)
        live = live_nodes_of(nodes)
        token = keys.encode_page_token(entries[-1].name + "\0") if page.more else ""
        return [to_proto(e, live, reports.count(e.name, e.id), reports.copies(e.name, e.id))
                for e in entries], token

    # Read-modify-writes ----------------------------------------------------------------

    def set_mode(self, caller, name: str, mode: int) -> types_pb2.SegmentInfo:
        """Change the mode bits (owner or root). Raises NotFound, PermissionDenied."""
        def change(record: dict) -> dict:
            access.require_owner(caller, record, f"segment {name!r}")
            return {**record, "mode": mode}
        return self._update(name, change)

    def set_owner(self, caller, name: str, uid: int, gid: int) -> types_pb2.SegmentInfo:
        """Change owner and group (owner or root). Raises NotFound, PermissionDenied."""
        def change(record: dict) -> dict:
            access.require_owner(caller, record, f"segment {name!r}")
            return {**record, "uid": uid, "gid": gid}
        return self._update(name, change)

    def drop_backup(self, home: str, name: str, segment_id: int, node: str
                    ) -> types_pb2.SegmentInfo:
        """Remove ``node`` from the backups of segment ``segment_id`` (asked by its home
        ``home`` only: PermissionDenied otherwise). Raises NotFound."""
        def change(record: dict) -> dict | None:
            if record["home"] != home:
                raise PermissionDenied(f"segment {name!r} is homed on node "
                                       f"{record['home']!r}, not {home!r}")
            backups = record.get("backups", [])
            if node not in backups:
                return None
            return {**record, "backups": [other for other in backups if other != node]}
        return self._update(name, change, expect_id=segment_id)

    def add_backup(self, home: str, name: str, segment_id: int, node: str, version: int
                   ) -> types_pb2.SegmentInfo:
        """Add ``node``, holding ``version``, to the backups of segment ``segment_id`` (asked
        by its home ``home`` only). Raises NotFound, PermissionDenied, Busy (the record
        moved past ``version``, or is deleting or lost)."""
        def change(record: dict) -> dict | None:
            if record["home"] != home:
                raise PermissionDenied(f"segment {name!r} is homed on node "
                                       f"{record['home']!r}, not {home!r}")
            if record["version"] != version or record["deleting"] or record.get("lost"):
                raise Busy(f"segment {name!r} is at version {record['version']}, not "
                           f"{version} (or deleting or lost): backup on {node!r} not added")
            backups = record.get("backups", [])
            if node in backups or node == home:
                return None
            return {**record, "backups": sorted([*backups, node])}
        return self._update(name, change, expect_id=segment_id)

    def mark_deleting(self, caller, name: str, finish: bool = False, segment_id: int = 0,
                      force: bool = False) -> types_pb2.SegmentInfo:
        """Mark the segment DELETING (owner or root); a no-op if it is already marked.

        With ``finish`` (the home agent frees the pages now) the record is removed
        instead, in the same transaction, as ``finish_delete`` would — unless nodes
        other than the home report attachments of it (and not ``force``): then it is only
        marked, and the reply's ``attached_nodes`` names them (the home frees it once
        they detached). A record
        marked lost is removed at once whatever ``finish`` says: its memory is
        gone, nothing waits to be freed; the reply is then its last record, in
        state LOST. A nonzero ``segment_id`` must be the record's id, else NotFound.
        The reply's ``copies`` name the nodes holding replicas (to be told).
        """
        def change(record: dict) -> dict | None:
            access.require_owner(caller, record, f"segment {name!r}")
            if record.get("lost"):
                return record
            if record["deleting"] and not finish:
                return None
            return {**record, "deleting": True}
        elsewhere = self._attached_elsewhere(name, segment_id) if finish and not force else []
        info = self._update(name, change, remove=lambda record: record.get("lost") or (
            finish and not elsewhere), expect_id=segment_id)
        if elsewhere and info.state == types_pb2.SEGMENT_STATE_DELETING:
            # Only marked: the reply names them even if their reports changed since they
            # were read (the home must not take a mark for a removal).
            info.attached_nodes[:] = sorted({*info.attached_nodes, *elsewhere})
        return info

    def _attached_elsewhere(self, name: str, segment_id: int) -> list[str]:
        """The nodes other than the home of ``name`` (of ``segment_id``, when nonzero)
        that report attachments of it. Read just before the delete's transaction: a
        report landing in between is that of an attach still in flight, as one
        reported a moment later would be."""
        prefix = keys.attach_prefix(name)
        record, attach = (op.response_range for op in self.etcd.txn(success=[
            range_op(keys.segment_key(name)), range_op(prefix, keys.prefix_end(prefix))
        ]).responses)
        if not record.kvs:
            return []  # the update that follows says NotFound
        entry = Entry.from_kv(record.kvs[0])
        if segment_id and entry.id != segment_id:
            return []
        reports = Reports(attach.kvs)
        return [node for node in reports.attached(name, entry.id) if node != entry.record["home"]]

    def _update(self, name: str, change: Callable[[dict], dict | None],
                remove: Callable[[dict], bool] = lambda record: False,
                expect_id: int = 0) -> types_pb2.SegmentInfo:
        """Apply ``change`` (record -> new record, None = no change, or raise) atomically;
        when ``remove(new record)`` is true, delete the record (and its lock and
        reports) instead once ``change`` agrees."""
        key = keys.segment_key(name)
        entry, fresh = self.cache.get(name), False
        for _ in retries(self.attempts, f"update segment {name!r}"):
            entry, record = self._decide(name, entry, fresh, change)
            if expect_id and entry.id != expect_id:
                if not fresh:  # the cached entry may be stale: decide on a fresh read
                    entry, fresh = None, True
                    continue
                raise not_found(name, expect_id)
            if record is None:
                return self.get(name)
            removing = remove(record)
            write = (self._removal_ops(name) if removing else
                     [put_op(key, keys.encode(record), entry.lease), *info_reads(name)])
            response = self.etcd.txn(compare=[unchanged(key, entry.mod)], success=write,
                                     failure=[range_op(key)])
            if response.succeeded and removing:
                self._removed(name, entry.lease)
                return to_proto(Entry(name, entry.id, entry.mod, entry.lease, record), (),
                                copies=self._removed_copies(response, name, entry.id))
            if response.succeeded:
                entry = Entry(name, entry.id, response.header.revision, entry.lease, record)
                self.cache.put(entry)
                return info_of(entry, response.responses[1:])
            kvs = response.responses[0].response_range.kvs  # the record as it is now
            if not kvs:
                self.cache.drop(name)
                raise not_found(name)
            entry, fresh = Entry.from_kv(kvs[0]), True
            self.cache.put(entry)

    def _decide(self, name: str, entry: Entry | None, fresh: bool, change
                ) -> tuple[Entry, dict | None]:
        """(entry, ``change``'s new record) for a write guarded by entry's mod_revision.

        A cached (not ``fresh``) entry is only a guess: the compare catches it
        when stale, but a refusal or a no-op decided on it would never reach a
        compare, so those are decided again on a fresh read.
        """
        if entry is not None:
            try:
                record = change(entry.record)
                if record is not None or fresh:
                    return entry, record
            except VasError:
                if fresh:
                    raise
        entry = self.read(name)
        return entry, change(entry.record)

    def _read(self, name: str) -> Entry | None:
        kvs = self.etcd.range(keys.segment_key(name)).kvs
        return Entry.from_kv(kvs[0]) if kvs else None

    def read(self, name: str, *, cached: bool = False) -> Entry:
        """The entry of ``name`` (from the cache if ``cached`` and known). Raises NotFound
        (and forgets a cached entry of ``name``) when etcd has no record of it."""
        entry = self.cache.get(name) if cached else None
        entry = entry or self._read(name)
        if entry is None:
            self.cache.drop(name)
            raise not_found(name)
        self.cache.put(entry)
        return entry

    # Removal and attachment reports ----------------------------------------------------

    def finish_delete(self, name: str, segment_id: int) -> list[str]:
        """Remove segment ``segment_id`` named ``name`` with its writer lock and reports;
        the nodes that reported a replica of that id (to be told to drop it).

        Idempotent: an absent record or one with another id is left alone (its
        replicas are still named: ttl expiry removes the record, not the reports).
        """
        prefix = keys.attach_prefix(name)
        response = self.etcd.txn(compare=[created_at(keys.segment_key(name), segment_id)],
                                 success=self._removal_ops(name),
                                 failure=[range_op(prefix, keys.prefix_end(prefix))])
        if response.succeeded:
            previous = response.responses[0].response_delete_range.prev_kvs
            self._removed(name, previous[0].lease if previous else 0)
            return self._removed_copies(response, name, segment_id)
        self.cache.drop(name)
        return Reports(response.responses[0].response_range.kvs).copies(name, segment_id)

    @staticmethod
    def _removal_ops(name: str) -> list:
        """The ops removing segment ``name``: its record, and — because only the
        incarnation being removed can own them while its record exists — its writer
        lock and attachment reports (read back: they name the replicas' nodes)."""
        key, prefix = keys.segment_key(name), keys.attach_prefix(name)
        return [delete_op(key, prev_kv=True), delete_op(keys.writer_key(name)),
                delete_op(prefix, keys.prefix_end(prefix), prev_kv=True)]

    @staticmethod
    def _removed_copies(response, name: str, segment_id: int, at: int = 0) -> list[str]:
        """The replica and backup holders of a removal (``_removal_ops`` at response op
        ``at``)."""
        records = response.responses[at].response_delete_range.prev_kvs
        backups = keys.decode(records[0].value).get("backups", []) if records else []
        reports = response.responses[at + 2].response_delete_range.prev_kvs
        return sorted({*Reports(reports).copies(name, segment_id), *backups})

    def _removed(self, name: str, lease: int) -> None:
        self.cache.drop(name)
        if lease:
            self.etcd.revoke_quietly(lease)  # a ttl lease has nothing left to expire

    # The safety net of replicas, and records a restarted home no longer holds ---------

    def check(self, refs) -> list[int]:
        """The ids among ``refs`` (SegmentRefs) whose record is absent, has another id,
        or is marked deleting or lost: one read-only transaction per 128."""
        gone = []
        for start in range(0, len(refs), _MAX_TXN_OPS):
            batch = refs[start:start + _MAX_TXN_OPS]
            response = self.etcd.txn(success=[range_op(keys.segment_key(ref.name))
                                              for ref in batch])
            gone += [ref.id for ref, op in zip(batch, response.responses)
                     if _gone(op.response_range.kvs, ref.id)]
        return gone

    def mark_lost(self, home: str, held: set[int]) -> list[types_pb2.SegmentInfo]:
        """Mark lost every record homed on ``home`` whose id is not in ``held``; remove
        those already marked deleting (their delete is done: nothing to free).

        For an agent that starts without the memory of its earlier incarnation
        (RegisterNode with ``reconcile``). Reads every segment record, in pages
        (there is no index by home: a start-up cost, once per agent start), and
        writes in transactions of ``_LOST_BATCH`` records, each record compared
        unchanged since read (a concurrent change re-decides on the fresh one).
        Returns the records marked (state LOST) or removed (state DELETING), each
        with its ``copies``.
        """
        done: list[types_pb2.SegmentInfo] = []
        start, end = keys.SEGMENTS, keys.prefix_end(keys.SEGMENTS)
        while True:
            page = self.etcd.range(start, end, limit=_SCAN_PAGE)
            doomed = [entry for entry in map(Entry.from_kv, page.kvs)
                      if _homeless(entry, home, held)]
            for first in range(0, len(doomed), _LOST_BATCH):
                done += self._mark_lost(doomed[first:first + _LOST_BATCH], home, held)
            if not page.more or not page.kvs:
                return done
            start = page.kvs[-1].key + b"\0"

    def mark_entries_lost(self, entries: list[Entry], home: str
                          ) -> list[types_pb2.SegmentInfo]:
        """Mark ``entries`` (homed on ``home``, read before) lost in one transaction:
        a home down with no backup holding the version (coordinator/promote.py)."""
        return self._mark_lost(entries, home, set())

    def _mark_lost(self, entries: list[Entry], home: str, held: set[int]
                   ) -> list[types_pb2.SegmentInfo]:
        """``mark_lost`` of one batch: one transaction, retried on the fresh records."""
        for _ in retries(self.attempts, f"mark the segments of node {home!r} lost"):
            if not entries:
                return []
            compare, success = [], []
            for entry in entries:
                key, prefix = keys.segment_key(entry.name), keys.attach_prefix(entry.name)
                compare.append(unchanged(key, entry.mod))
                if entry.record["deleting"]:
                    success += self._removal_ops(entry.name)
                else:
                    lost = {**entry.record, "lost": True}
                    success += [put_op(key, keys.encode(lost), entry.lease),
                                range_op(prefix, keys.prefix_end(prefix))]
            response = self.etcd.txn(compare=compare, success=success,
                                     failure=[range_op(keys.segment_key(entry.name))
                                              for entry in entries])
            if response.succeeded:
                return self._marked(entries, response)
            fresh = [Entry.from_kv(op.response_range.kvs[0]) for op in response.responses
                     if op.response_range.kvs]
            entries = [entry for entry in fresh if _homeless(entry, home, held)]

    def _marked(self, entries: list[Entry], response) -> list[types_pb2.SegmentInfo]:
        """The replies of a successful ``_mark_lost`` transaction."""
        done, at = [], 0
        for entry in entries:
            if entry.record["deleting"]:
                self._removed(entry.name, entry.lease)
                done.append(to_proto(entry, (), copies=self._removed_copies(
                    response, entry.name, entry.id, at)))
                at += 3
            else:
                marked = Entry(entry.name, entry.id, response.header.revision, entry.lease,
                               {**entry.record, "lost": True})
                self.cache.put(marked)
                reports = Reports(response.responses[at + 1].response_range.kvs)
                done.append(to_proto(marked, (), copies=reports.copies(entry.name, entry.id)))
                at += 2
        return done

    def report_attachments(self, node_id: str, lease_id: int, counts) -> list[int]:
        """Store ``node_id``'s attachment counts under its lease (count 0 removes a report,
        unless ``copy``: a held replica is reported at count 0 too); the ids of the
        reported copies whose segment is gone (see ``check``).

        The records of the copies are read in the same transaction as their reports are
        written, so for each copy either its report was in etcd before the record was
        removed or marked (and the delete named this node in its ``copies``), or the
        record was already gone here: no replica is missed by both.
        Raises NotFound when the lease has expired (the node must register again).
        """
        latest = {count.name: count for count in counts}  # a txn may not name a key twice
        gone, batch, ops = [], [], 0
        for count in latest.values():
            batch.append(count)
            ops += 2 if count.copy else 1
            if ops >= _MAX_TXN_OPS - 1:
                gone += self._report_batch(node_id, lease_id, batch)
                batch, ops = [], 0
        if batch:
            gone += self._report_batch(node_id, lease_id, batch)
        return gone

    def _report_batch(self, node_id: str, lease_id: int, counts) -> list[int]:
        ops = []
        for count in counts:
            key = keys.attach_key(count.name, node_id)
            if count.count or count.copy:
                ops.append(put_op(key, keys.encode(_stored_report(count)), lease_id))
            else:
                ops.append(delete_op(key))
            if count.copy:
                ops.append(range_op(keys.segment_key(count.name)))
        try:
            response = self.etcd.txn(success=ops)
        except EtcdError as exc:
            if exc.lease_missing:
                raise NotFound(f"lease {lease_id} of node {node_id!r} has expired: "
                               "register again") from exc
            raise
        gone, at = [], 0
        for count in counts:
            at += 1
            if count.copy:
                if _gone(response.responses[at].response_range.kvs, count.id):
                    gone.append(count.id)
                at += 1
        return gone

def _homeless(entry: Entry, home: str, held: set[int]) -> bool:
    """Whether ``entry`` is homed on ``home`` without memory there (not in ``held``) and
    not marked lost yet."""
    return (entry.record["home"] == home and entry.id not in held
            and not entry.record.get("lost"))


def _gone(kvs, segment_id: int) -> bool:
    """Whether a read of a segment key (``kvs``) shows segment ``segment_id`` gone: no
    record, a record of another id, or one marked deleting or lost."""
    if not kvs or kvs[0].create_revision != segment_id:
        return True
    record = keys.decode(kvs[0].value)
    return bool(record["deleting"] or record.get("lost"))


def _stored_report(count) -> dict:
    """The stored value of an AttachmentCount ("copy" only when set: values stay small)."""
    value = {"id": count.id, "count": count.count}
    if count.copy:
        value["copy"] = True
    return value
