"""The single writer lock of a segment: an etcd key under the writer's own lease.

The lock is ``/vas/writers/NAME``; whoever creates it holds it, and the
revision that created it is the fencing token (etcd revisions only grow, so a
later holder always has a larger token). The lease makes a dead writer's lock
vanish on its own; RenewWriter is a keepalive of that lease.

PublishVersion is where the token fences: it bumps the segment's version only in
a transaction that compares the lock's create_revision with the writer's token,
so a writer whose lease lapsed (or whose lock was taken over) can never publish.
"""
from __future__ import annotations

from vas.coordinator import access, keys
from vas.coordinator.etcd import (Etcd, EtcdError, absent, created_at, delete_op, leased, put_op,
                                  range_op, unchanged)
from vas.coordinator.retry import retries
from vas.coordinator.segments import Entry, Segments, info_of, info_reads, not_found
from vas.core.errors import Busy, Fenced, NotFound, PermissionDenied, segment_lost
from vas.proto import types_pb2


def fenced(name: str, token: int) -> Fenced:
    """The error of a writer whose token no longer holds the lock of ``name``."""
    return Fenced(f"segment {name}: writer token {token} is no longer current "
                  "(lease lapsed or lock taken over)")


def not_at_base(name: str, base: int, version: int) -> Busy:
    """The refusal of a publish based on version ``base`` of ``name``, now at ``version``."""
    return Busy(f"segment {name}: publish based on version {base} refused: the segment is "
                f"at version {version} (an earlier sync of this writer was published since)")


def _holds(lock_kvs, token: int, lease_id: int) -> bool:
    """Whether the lock key read (``lock_kvs``) is held by ``token`` (under ``lease_id``
    when nonzero)."""
    return bool(lock_kvs) and lock_kvs[0].create_revision == token and (
        not lease_id or lock_kvs[0].lease == lease_id)


class Writers:
    """Writer-lock operations over one etcd client."""

    def __init__(self, etcd: Etcd, segments: Segments, attempts: int):
        self.etcd = etcd
        self.segments = segments
        self.attempts = attempts

    def acquire(self, caller, name: str, ttl: int) -> tuple[int, int, int]:
        """Take the lock of ``name`` for ``caller``; (token, lease id, granted ttl).

        Raises NotFound (no such segment, or it is being deleted or lost), PermissionDenied
        (no read+write permission), Busy (held by someone else).
        """
        entry, fresh = self.segments.read(name, cached=True), False
        lease = granted = 0
        try:
            for _ in retries(self.attempts, f"lock segment {name!r}"):
                if not self._may_write(caller, entry, fresh):
                    entry, fresh = self.segments.read(name), True
                    continue
                if not lease:
                    lease, granted = self.etcd.grant(ttl)
                token, entry = self._try_lock(caller, entry, lease)
                if token:
                    return token, lease, granted
                fresh = True
        except BaseException:  # Unavailable after the last attempt too: the lease goes
            if lease:
                self.etcd.revoke_quietly(lease)
            raise

    def _may_write(self, caller, entry: Entry, fresh: bool) -> bool:
        """True if ``caller`` may take the lock; raises once that is known from a fresh read."""
        try:
            if entry.record["deleting"]:
                raise NotFound(f"segment {entry.name!r} is being deleted")
            if entry.record.get("lost"):
                raise segment_lost(entry.name, entry.record["home"])
            access.require(caller, entry.record, access.ATTACH_BITS["rw"],
                           f"segment {entry.name!r}")
        except (NotFound, PermissionDenied):
            if fresh:
                raise
            return False
        return True

    def _try_lock(self, caller, entry: Entry, lease: int) -> tuple[int, Entry]:
        """One attempt; (token, entry) on success, (0, fresh entry) if the segment changed."""
        key, lock = keys.segment_key(entry.name), keys.writer_key(entry.name)
        holder = {"id": entry.id, "node": caller.node, "uid": caller.uid, "pid": caller.pid}
        response = self.etcd.txn(
            compare=[unchanged(key, entry.mod), absent(lock)],
            success=[put_op(lock, keys.encode(holder), lease)],
            failure=[range_op(key), range_op(lock, keys_only=True)])
        if response.succeeded:
            return response.header.revision, entry
        segment, held = (op.response_range for op in response.responses)
        if not segment.kvs:
            raise not_found(entry.name)
        if held.kvs:
            raise Busy(f"segment {entry.name!r} already has a writer")
        fresh = Entry.from_kv(segment.kvs[0])
        self.segments.cache.put(fresh)
        return 0, fresh

    def renew(self, name: str, token: int, lease_id: int) -> int:
        """Keep the lock's lease alive; the granted TTL. Raises Fenced once it is lost."""
        ttl = self.etcd.keepalive(lease_id)
        if ttl <= 0:
            raise Fenced(f"the writer lease of segment {name!r} has expired")
        kvs = self.etcd.range(keys.writer_key(name), keys_only=True).kvs
        if not kvs or kvs[0].create_revision != token:
            raise Fenced(f"the writer lock of segment {name!r} (token {token}) was lost")
        return ttl

    def release(self, name: str, token: int, lease_id: int) -> None:
        """Drop the lock if ``token`` still holds it, and end its lease (else a no-op)."""
        lock = keys.writer_key(name)
        self.etcd.txn(compare=[created_at(lock, token)], success=[delete_op(lock)])
        if lease_id:
            self.etcd.revoke_quietly(lease_id)

    def publish(self, caller, name: str, segment_id: int, token: int, lease_id: int = 0,
                base: int | None = None) -> types_pb2.SegmentInfo:
        """Bump the version of segment ``segment_id`` if ``token`` still holds its lock
        and ``caller`` may write the segment (mode bits of the current record), and,
        when ``base`` is given, only if the segment is at version ``base``.

        One transaction compares the lock (create_revision == ``token``, and its
        lease == ``lease_id`` when nonzero), the record's id and the mod_revision
        the new version was computed from (so the ``base`` decided on is the
        version it replaces); a concurrent change of the record (chmod, another
        coordinator's read-modify-write) costs a bounded retry. Raises NotFound
        (segment gone, or the name has another id: checked first), Fenced (lock
        absent or another token/lease), Busy (the lock held but the record, read
        fresh, not at ``base``),
        Unavailable.
        """
        key, lock = keys.segment_key(name), keys.writer_key(name)
        holds = [created_at(lock, token)] + ([leased(lock, lease_id)] if lease_id else [])
        entry, fresh = self.segments.cache.get(name), False
        if entry is None or entry.id != segment_id:  # the cache may be stale: read
            entry, fresh = self.segments.read(name), True
        for _ in retries(self.attempts, f"publish segment {name!r}"):
            if entry.id != segment_id:
                raise not_found(name, segment_id)
            access.require(caller, entry.record, access.WRITE, f"segment {name!r}")
            if base is not None and entry.record["version"] != base:
                if not fresh:  # a cached guess: decide on the record itself
                    entry, fresh = self.segments.read(name), True
                    continue
                held = self.etcd.range(lock, keys_only=True).kvs  # a stale token: Fenced first
                if not _holds(held, token, lease_id):
                    raise fenced(name, token)
                raise not_at_base(name, base, entry.record["version"])
            record = {**entry.record, "version": entry.record["version"] + 1}
            try:
                response = self.etcd.txn(
                    compare=[created_at(key, segment_id), unchanged(key, entry.mod), *holds],
                    success=[put_op(key, keys.encode(record), entry.lease), *info_reads(name)],
                    failure=[range_op(key), range_op(lock, keys_only=True)])
            except EtcdError as exc:
                # The segment's ttl lease ended between our read and the put.
                if entry.lease and exc.lease_missing:
                    self.segments.cache.drop(name)
                    raise not_found(name, segment_id) from exc
                raise
            if response.succeeded:
                entry = Entry(name, entry.id, response.header.revision, entry.lease, record)
                self.segments.cache.put(entry)
                return info_of(entry, response.responses[1:])
            segment, held = (op.response_range for op in response.responses)
            if not segment.kvs:
                self.segments.cache.drop(name)
                raise not_found(name, segment_id)
            entry, fresh = Entry.from_kv(segment.kvs[0]), True
            self.segments.cache.put(entry)
            if entry.id != segment_id:
                raise not_found(name, segment_id)
            if not _holds(held.kvs, token, lease_id):
                raise fenced(name, token)
            # Only the record changed under us: try again on the fresh one.

