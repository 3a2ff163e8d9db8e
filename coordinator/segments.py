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
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from vas.coordinator import access, keys
from vas.coordinator.etcd import (Etcd, EtcdError, absent, created_at, delete_op, present,
                                  put_op, range_op, unchanged)
from vas.coordinator.retry import retries
from vas.core.errors import AlreadyExists, CapacityExceeded, InvalidArgument, NotFound, VasError
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
        raise CapacityExceeded(f"the address window is exhausted: no room for {size} bytes")
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
    """The SegmentState a record is in, given the ids of the live nodes."""
    if record["deleting"]:
        return types_pb2.SEGMENT_STATE_DELETING
    if record["home"] in live_nodes:
        return types_pb2.SEGMENT_STATE_READY
    if record["replicas"] > 0:
        return types_pb2.SEGMENT_STATE_DEGRADED
    return types_pb2.SEGMENT_STATE_LOST


def to_proto(entry: Entry, live_nodes, attachments: int = 0) -> types_pb2.SegmentInfo:
    """The SegmentInfo of ``entry``."""
    r = entry.record
    return types_pb2.SegmentInfo(
        name=entry.name, id=entry.id, size=r["size"], address=r["address"], mode=r["mode"],
        uid=r["uid"], gid=r["gid"], home=r["home"], replicas=r["replicas"],
        version=r["version"], state=state_of(r, live_nodes), attachments=attachments,
        created=r["created"], expires=r["expires"], meta=r.get("meta") or {})


def live_nodes_of(range_response) -> set[str]:
    """Node ids in a (keys-only) range of /vas/nodes/."""
    return {keys.name_of(kv.key, keys.NODES) for kv in range_response.kvs}


def attachment_counts(range_response) -> dict[tuple[str, int], int]:
    """Sum of reported counts per (segment name, segment id) in a range of attach keys."""
    counts: dict[tuple[str, int], int] = collections.Counter()
    for kv in range_response.kvs:
        name, _ = keys.split_attach_key(kv.key)
        report = keys.decode(kv.value)
        counts[name, report["id"]] += report["count"]
    return counts


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
    return to_proto(entry, live_nodes_of(nodes), attachment_counts(attach)[entry.name, entry.id])


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

    # Create ----------------------------------------------------------------------------

    def create(self, caller, name: str, size: int, mode: int, home: str, replicas: int,
               ttl: float, meta: dict[str, str] | None = None) -> types_pb2.SegmentInfo:
        """Claim ``name`` and an address range in one transaction; the new SegmentInfo.

        Raises AlreadyExists, InvalidArgument (unknown home), CapacityExceeded
        (address window full), Unavailable.
        """
        lease, granted = self.etcd.grant(max(1, math.ceil(ttl))) if ttl > 0 else (0, 0)
        created = time.time()
        record = {"size": size, "address": 0, "mode": mode, "uid": caller.uid,
                  "gid": caller.gid, "home": home, "replicas": replicas, "version": 0,
                  "created": created, "expires": created + granted if lease else 0.0,
                  "deleting": False}
        if meta:  # absent when empty: records without metadata stay as they were
            record["meta"] = meta
        try:
            entry = self._claim(name, record, lease)
        except BaseException:
            if lease:
                self.etcd.revoke_quietly(lease)
            raise
        self.cache.put(entry)
        return to_proto(entry, {home})

    def _claim(self, name: str, record: dict, lease: int) -> Entry:
        key, home_key = keys.segment_key(name), keys.node_key(record["home"])
        with self._alloc_lock:
            for _ in retries(self.attempts, f"create segment {name!r}"):
                alloc_mod, next_address = self._alloc
                record["address"], after = place(next_address, record["size"])
                response = self.etcd.txn(
                    compare=[absent(key), unchanged(keys.ALLOC, alloc_mod), present(home_key)],
                    success=[put_op(key, keys.encode(record), lease),
                             put_op(keys.ALLOC, keys.encode({"next_address": after}))],
                    failure=[range_op(key, keys_only=True), range_op(keys.ALLOC),
                             range_op(home_key, keys_only=True)])
                revision = response.header.revision
                if response.succeeded:
                    self._alloc = (revision, after)
                    return Entry(name, revision, revision, lease, record)
                segment, alloc, node = (op.response_range for op in response.responses)
                if segment.kvs:
                    raise AlreadyExists(f"segment {name!r} already exists")
                if not node.kvs:
                    raise InvalidArgument(f"unknown home node {record['home']!r}")
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
        counts = attachment_counts(self.etcd.range(start, end))
        live = live_nodes_of(nodes)
        token = keys.encode_page_token(entries[-1].name + "\0") if page.more else ""
        return [to_proto(e, live, counts[e.name, e.id]) for e in entries], token

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

    def mark_deleting(self, caller, name: str, finish: bool = False, segment_id: int = 0
                      ) -> types_pb2.SegmentInfo:
        """Mark the segment DELETING (owner or root); a no-op if it is already marked.

        With ``finish`` (the home agent frees the pages now) the record is removed
        instead, in the same transaction, as ``finish_delete`` would. A nonzero
        ``segment_id`` must be the record's id, else NotFound.
        """
        def change(record: dict) -> dict | None:
            access.require_owner(caller, record, f"segment {name!r}")
            if record["deleting"] and not finish:
                return None
            return {**record, "deleting": True}
        return self._update(name, change, remove=finish, expect_id=segment_id)

    def _update(self, name: str, change: Callable[[dict], dict | None], remove: bool = False,
                expect_id: int = 0) -> types_pb2.SegmentInfo:
        """Apply ``change`` (record -> new record, None = no change, or raise) atomically;
        with ``remove``, delete the record (and its lock and reports) once ``change`` agrees."""
        key = keys.segment_key(name)
        write = (self._removal_ops(name) if remove else
                 lambda entry, record: [put_op(key, keys.encode(record), entry.lease),
                                        *info_reads(name)])
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
            response = self.etcd.txn(compare=[unchanged(key, entry.mod)],
                                     success=write(entry, record), failure=[range_op(key)])
            if response.succeeded and remove:
                self._removed(name, entry.lease)
                return to_proto(Entry(name, entry.id, entry.mod, entry.lease, record), ())
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

    def finish_delete(self, name: str, segment_id: int) -> None:
        """Remove segment ``segment_id`` named ``name`` with its writer lock and reports.

        Idempotent: an absent record or one with another id is left alone.
        """
        response = self.etcd.txn(compare=[created_at(keys.segment_key(name), segment_id)],
                                 success=self._removal_ops(name)())
        if response.succeeded:
            previous = response.responses[0].response_delete_range.prev_kvs
            self._removed(name, previous[0].lease if previous else 0)
        else:
            self.cache.drop(name)

    @staticmethod
    def _removal_ops(name: str):
        """A builder of the ops removing segment ``name``: its record, and — because only
        the incarnation being removed can own them while its record exists — its
        writer lock and attachment reports."""
        key, prefix = keys.segment_key(name), keys.attach_prefix(name)

        def ops(*_):
            return [delete_op(key, prev_kv=True), delete_op(keys.writer_key(name)),
                    delete_op(prefix, keys.prefix_end(prefix))]
        return ops

    def _removed(self, name: str, lease: int) -> None:
        self.cache.drop(name)
        if lease:
            self.etcd.revoke_quietly(lease)  # a ttl lease has nothing left to expire

    def report_attachments(self, node_id: str, lease_id: int, counts) -> None:
        """Store ``node_id``'s attachment counts under its lease (count 0 removes a report).

        Raises NotFound when the lease has expired (the node must register again).
        """
        latest = {count.name: count for count in counts}  # a txn may not name a key twice
        ops = [put_op(keys.attach_key(name, node_id),
                      keys.encode({"id": c.id, "count": c.count}), lease_id)
               if c.count else delete_op(keys.attach_key(name, node_id))
               for name, c in latest.items()]
        for start in range(0, len(ops), 128):  # etcd's default --max-txn-ops
            try:
                self.etcd.txn(success=ops[start:start + 128])
            except EtcdError as exc:
                if exc.lease_missing:
                    raise NotFound(f"lease {lease_id} of node {node_id!r} has expired: "
                                   "register again") from exc
                raise
