"""Writer locks and publishing: the single "rw" attachment, sync(), wait(), fencing.

An "rw" attach takes the cluster-wide writer lock (``AcquireWriter``: a fencing
token and an etcd lease of ``writer_ttl``). The keepalive thread renews a lease
every ttl/3 (one that did not get through again after ttl/12) **only while its
client shows it is alive** (a request in the last 2/3 ttl, or one being served).
A lease that was not renewed in time -- its client is stopped or hung, or the
coordinator did not answer -- is **fenced before it can lapse**: the deadline
timer fires ``REVOKE_MARGIN`` of the ttl before the lease could end (``renewed +
ttl``) and ``fence`` then, in this order, write-protects a home writer's mapping
(node/revoke.py: its later stores fault with SIGBUS instead of reaching the home
pages), marks the lease FENCED (every later sync raises ``Fenced`` without
contacting anyone), frees the local writer slot, retires a remote writer's
replica (it holds writes that will never be published) and has the keepalive
thread release the lock at the coordinator, so another writer, on this node or
any other, can take it at once. A renewal or a publish that finds the lease
lapsed fences it the same way (late, but never leaving the slot held). The
deadline timer makes no network call, so a coordinator that hangs cannot hold a
revocation up. A remote writer's attach fetching its replica has its lease renewed the
same way meanwhile (``renewing``).

Publishing (chunk arithmetic in node/publish.py):

- **sync() on the home node**: ``PublishVersion`` with the token (the pages are
  already the home's).
- **sync() of a remote writer**: the chunks of the pages its client tracked as
  written (vas/written.py), or of the ranges given, else those whose hash changed
  (every chunk of the replica hashed); hashed **before** the bytes to send are
  read — a write racing with the sync shows as changed at the next one — and
  sent to the home as a bulk write request (node/bulk.py; ``Node.WritePages`` if the
  bulk channel fails). The home keeps them aside, calls PublishVersion
  with the writer's token and the version the bytes are based on (a
  compare-and-set), and only if that succeeds writes them into its pages
  (``write_pages``): a fenced writer's bytes, and a late write of a sync that
  already failed, never reach the home copy. A writer refused that way compares
  its replica with the home's pages (``_rebase``).
- ``published_hashes`` answers refreshing readers (``Node.ChunkHashes``).
- **wait()**: follow the coordinator's Watch until a newer version is published.

Publishing into a segment and reading its hashes pass through the segment's
gate (node/segments.py), so a reader never sees a publish half applied; no lock
is held across the network calls.
"""
from __future__ import annotations

import enum
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager

from vas import _native
from vas.core import validate
from vas.core.errors import (Busy, CapacityExceeded, Fenced, InvalidArgument, NotFound,
                             PermissionDenied, Unavailable, VasError)
from vas.core.sizes import human_size
from vas.node import bulk, locks, metrics
from vas.node.backup_push import BackupPush
from vas.node.publish import (CHUNK, Staged, chunks_of, differing, hashes, run_views,
                              runs)
from vas.node.revoke import Revocations
from vas.node.segments import Replica
from vas.node.store import read_only_view
from vas.node.sessions import Attachment, LeaseState, Session, WriterLease
from vas.node.timer import Timer
from vas.pages import pwrite_all
from vas.proto import coordinator_pb2, node_pb2, types_pb2

log = logging.getLogger(__name__)

#: Bytes per second a publish stream is given (on top of the rpc timeout).
SEND_RATE = 50e6
#: Bytes of one step of a WriteFrom copy: a revocation waits for the step under way
#: (~5-10 ms at the 2-3 GB/s of a copy on the development VM).
WRITE_FROM_STEP = 16 << 20
#: A WriteFrom copy of at least this many bytes runs as two halves on two threads,
#: into the agent's writable mapping of the memory (made for it if the warm pool did
#: not prepare one: ``Memory.map_writable``). Into prepared memory one
#: process_vm_readv stream moved ~8 GB/s on the development VM (a GiB put's copy
#: 0.13 s), under what two CPUs copy; into fresh memory the page faults of the two
#: halves go on side by side. Ray's put copies a large object with several threads too.
PARALLEL_COPY_MIN = 64 << 20
#: Bytes of the buffer a WriteFrom into memory the agent has not mapped goes through,
#: one per request thread that served one (the agent's local workers: --local-workers).
BOUNCE_SIZE = 4 << 20
#: Longest single coordinator Watch of a wait(), seconds: between watches the
#: agent checks that the waiting client is still connected.
WATCH_SLICE = 5.0
#: How long before its lease could lapse a writer not renewed in time is fenced,
#: as a fraction of the ttl: time for the write-protect (~0.1 s per populated
#: GiB) and a late timer thread. Renewals come every ttl/3, so a writer whose
#: client is alive has two rounds to get one through before its deadline.
REVOKE_MARGIN = 1 / 6


class Writers:
    """The writer locks of this node's "rw" attachments and their publishing."""

    def __init__(self, node_id: str, config, coordinator, peers,
                 home_address: Callable[[types_pb2.SegmentInfo], str],
                 retire_replica: Callable[[Replica], None],
                 cleanup_timeout: Callable[[], float],
                 transfer: Callable[[], AbstractContextManager],
                 node_address: Callable[[str], str | None], data_dir=None, homes=None):
        self.node_id = node_id
        self.config = config
        self.coordinator = coordinator
        self.peers = peers
        self._home_address = home_address
        self._retire_replica = retire_replica
        self._cleanup_timeout = cleanup_timeout
        self._transfer = transfer  # marks a sync under way (the warm pool waits)
        self.data_dir = data_dir    # node/datadir.py: each home publish is kept there, or None
        self._homes = homes  # lazy.Homes: bulk channels to homes (a remote writer's sync)
        self._lock = locks.Lock("writers", locks.Rank.WRITERS)
        self._live: dict[int, Attachment] = {}  # attachment id -> "rw" attachment renewed
        #: Leases of remote writers' attaches still fetching (renewed: see ``renewing``).
        self._fetching: dict[int, tuple[WriterLease, Session]] = {}
        self._unreleased: list[WriterLease] = []  # fenced, to release at the coordinator
        self._nudge = threading.Event()  # wakes the keepalive thread (a release is due, stop)
        #: Fences writers whose lease was not renewed in time (run by the agent's thread).
        self.deadlines = Timer(self._overdue, "writer deadline")
        #: Home writers revoked at EOF whose process may still map the pages.
        self.revocations = Revocations()
        #: Brings the backups of home segments to each new version (node/backup_push.py).
        self.backup_push = BackupPush(node_id, coordinator, peers, node_address)

    # ------------------------------------------------------------------ the lock

    def acquire(self, caller, name: str) -> WriterLease:
        """Take the cluster-wide writer lock of ``name`` (Busy if held anywhere)."""
        sent = time.monotonic()  # etcd starts the lease's ttl after this
        response = self.coordinator.acquire_writer(caller, name, self.config.writer_ttl)
        return WriterLease(name, response.token, response.lease_id, sent)

    @contextmanager
    def renewing(self, lease: WriterLease, session: Session):
        """Renew ``lease`` while a remote writer's attach fetches its replica: a fetch
        can outlast the ttl (a GiB on a busy node), and a lease taken before it must
        not lapse before the attach returns."""
        with self._lock:
            self._fetching[id(lease)] = (lease, session)
        try:
            yield
        finally:
            with self._lock:
                self._fetching.pop(id(lease), None)

    def track(self, attachment: Attachment) -> None:
        """Renew ``attachment``'s lease from now on (while its client is alive), and
        fence it if that does not happen in time.

        :raises Fenced: the lease was lost while the attach fetched.
        """
        if attachment.lease.state is not LeaseState.HELD:
            raise _fenced_error(attachment)
        with self._lock:
            self._live[attachment.id] = attachment
        self.deadlines.arm(attachment.id, self._deadline(attachment.lease))

    def _deadline(self, lease: WriterLease) -> float:
        """When a lease not renewed since is fenced (``REVOKE_MARGIN`` before it could lapse)."""
        ttl = self.config.writer_ttl
        return lease.renewed + ttl * (1 - REVOKE_MARGIN)

    def arm(self, attachment: Attachment, uffd: int, address: int, size: int) -> None:
        """Take the write-protect registration of a revocable "rw" attachment (its
        RegisterFaults); ``uffd`` is taken over on success.

        :raises InvalidArgument: not a revocable attachment, already registered,
            or a size other than the segment's.
        :raises Fenced: the writer lock ended before the registration came.
        """
        guard = attachment.guard
        if guard is None or guard.armed:
            raise InvalidArgument(f"attachment {attachment.id} is not a revocable \"rw\" "
                                  "attachment waiting for its userfaultfd")
        if size != attachment.segment.size:
            raise InvalidArgument(f"RegisterFaults size {human_size(size)} is not the "
                                  f"segment's {human_size(attachment.segment.size)}")
        guard.arm(uffd, address, size, _fenced_error(attachment))

    def release(self, lease: WriterLease) -> None:
        """Give the lock back (detach, EOF, a failed attach); a no-op once it ended."""
        if lease.end(LeaseState.RELEASED):
            self._release_at_coordinator(lease)

    def ended(self, attachment: Attachment, *, revoke: bool) -> None:
        """``attachment`` (an "rw" one) ended: stop renewing and release its lock.

        ``revoke``: the process may live on with the mapping (the connection's
        EOF) and the pages stay the home's: a home writer's mapping is
        write-protected before the lock goes, and its registration kept until
        the process exits. Not for a Detach (the client library unmaps before it
        sends one), nor while the agent shuts down (the home pages go with it).
        """
        with self._lock:
            self._live.pop(attachment.id, None)
        guard = attachment.guard
        if guard is not None and revoke:
            guard.revoke()
        self.release(attachment.lease)
        if guard is not None:
            if revoke:
                self.revocations.keep(guard)
            else:
                guard.close()

    def revoke(self, attachment: Attachment) -> None:
        """A force delete ends the writer's lock now: later syncs raise Fenced."""
        self.fence(attachment)

    def fence(self, attachment: Attachment) -> Fenced:
        """End ``attachment``'s lock without its writer (not renewed in time, lapsed,
        force delete); the error to raise.

        In this order: write-protect a home writer's mapping, mark the lease
        FENCED, free the local writer slot, retire a remote writer's replica, and
        have the keepalive thread release the lock at the coordinator (a no-op if
        another writer holds it already). No network call here.
        """
        if attachment.guard is not None:
            attachment.guard.revoke()  # first: from now on its stores fault
        fenced = attachment.lease.end(LeaseState.FENCED)
        with self._lock:
            self._live.pop(attachment.id, None)
            if fenced:
                self._unreleased.append(attachment.lease)
        if fenced:
            self._nudge.set()
        segment = attachment.segment
        with segment.lock:
            segment.free_writer_locked(attachment)
        if isinstance(segment, Replica):
            self._retire_replica(segment)
        return _fenced_error(attachment)

    def _release_at_coordinator(self, lease: WriterLease) -> None:
        try:
            self.coordinator.release_writer(lease.name, lease.token, lease.lease_id,
                                            self._cleanup_timeout())
        except VasError as exc:  # the lease runs out on its own within writer_ttl
            log.warning("cannot release the writer lock of %s (token %d): %s", lease.name,
                        lease.token, exc)

    def _overdue(self, attachment_id: int, _retries: int) -> None:
        """The deadline timer's action: fence the writer unless renewed since."""
        with self._lock:
            attachment = self._live.get(attachment_id)
        if attachment is None or attachment.lease.state is not LeaseState.HELD:
            return
        lease = attachment.lease
        if time.monotonic() < self._deadline(lease):
            return  # renewed meanwhile: a later deadline is armed
        session = attachment.session
        log.warning("writer lock of %s (token %d, pid %d) not renewed for %.1f s (client "
                    "last seen %.1f s ago): revoking it before its lease can lapse",
                    lease.name, lease.token, session.pid, time.monotonic() - lease.renewed,
                    time.monotonic() - session.last_seen)
        self.fence(attachment)

    def stop(self) -> None:
        """Stop the deadline timer and wake the keepalive thread (its stop event is set)."""
        self.deadlines.stop()
        self._nudge.set()

    def run_keepalive(self, stop: threading.Event) -> None:
        """Renew each live writer's lease every writer_ttl/3 (see the module docstring)
        and release the locks of fenced writers as soon as they are fenced."""
        ttl = self.config.writer_ttl
        interval = max(ttl / 3, 0.1)
        next_round = time.monotonic() + interval
        while not stop.is_set():
            self._nudge.wait(max(0.0, next_round - time.monotonic()))
            self._nudge.clear()
            if stop.is_set():
                return
            self._release_fenced()
            if time.monotonic() < next_round:
                continue
            with self._lock:
                writers = list(self._live.values())
                fetching = list(self._fetching.values())
            renewed = [self._renew(attachment, ttl) for attachment in writers]
            renewed += [self._renew_fetching(lease, session, ttl) for lease, session in fetching]
            # A renewal that did not get through is tried again soon, not a whole
            # interval later: one slow coordinator answer must not cost the lock.
            next_round = time.monotonic() + (interval if all(renewed) else interval / 4)

    def _release_fenced(self) -> None:
        with self._lock:
            leases, self._unreleased = self._unreleased, []
        for lease in leases:
            self._release_at_coordinator(lease)

    def _renew(self, attachment: Attachment, ttl: float) -> bool:
        """Renew ``attachment``'s lease if its client is alive; False if a renewal was
        due and did not get through (tried again soon, fenced by the deadline timer
        if that lasts)."""
        outcome = self._renew_lease(attachment.lease, attachment.session, ttl)
        if outcome is _Renewal.FENCED:
            self.fence(attachment)
        elif outcome is _Renewal.RENEWED:
            self.deadlines.arm(attachment.id, self._deadline(attachment.lease))
        return outcome is not _Renewal.FAILED

    def _renew_fetching(self, lease: WriterLease, session: Session, ttl: float) -> bool:
        """``_renew`` for a lease whose attach is still fetching: a lost lock ends the
        lease (``track`` then fails the attach)."""
        outcome = self._renew_lease(lease, session, ttl)
        if outcome is _Renewal.FENCED and lease.end(LeaseState.FENCED):
            with self._lock:
                self._unreleased.append(lease)
        return outcome is not _Renewal.FAILED

    def _renew_lease(self, lease: WriterLease, session: Session, ttl: float) -> _Renewal:
        if lease.state is not LeaseState.HELD:
            return _Renewal.SKIPPED
        if not session.alive_within(ttl * 2 / 3):
            # Stopped or hung: not renewed, so the deadline timer fences it (unless
            # it shows up in time) and another writer can take over.
            log.warning("writer of %s (pid %d) sent no keepalive for %.1f s: not renewing "
                        "its lock", lease.name, session.pid, time.monotonic() - session.last_seen)
            return _Renewal.SKIPPED
        sent = time.monotonic()
        # Worth waiting for up to the deadline: past it the writer is fenced anyway.
        timeout = min(self.config.rpc_timeout, max(0.1, self._deadline(lease) - sent))
        try:
            self.coordinator.renew_writer(lease.name, lease.token, lease.lease_id, timeout)
        except Fenced as exc:
            metrics.WRITER_LEASE_FAILED.inc()
            log.warning("writer lock of %s (token %d) lapsed: %s", lease.name, lease.token, exc)
            return _Renewal.FENCED
        except VasError as exc:  # the deadline timer fences it if this lasts
            metrics.WRITER_LEASE_FAILED.inc()
            log.warning("cannot renew the writer lock of %s: %s", lease.name, exc)
            return _Renewal.FAILED
        metrics.WRITER_LEASE_RENEWED.inc()
        lease.renewed = max(lease.renewed, sent)
        return _Renewal.RENEWED

    # ------------------------------------------------------------------ sync

    def sync(self, attachment: Attachment, ranges, *,
             tracked: bool = False) -> types_pb2.SegmentInfo:
        """Publish ``attachment``'s writes ((offset, length) ``ranges``, or all changes,
        found by hashing); ``tracked``: ``ranges`` are all the changes, possibly none
        (the client tracked its stores: vas/written.py)."""
        segment = attachment.segment
        if attachment.mode != "rw":
            raise PermissionDenied(f"segment {segment.name} is attached read-only: only its "
                                   "writer may sync")
        # Bounds-checked before anything moves; None: find the changes by hashing.
        chunks = chunks_of(ranges, segment.size) if ranges or tracked else None
        if attachment.lease.state is not LeaseState.HELD:
            raise self._lock_ended(attachment)
        timeout = self.config.rpc_timeout + segment.size / SEND_RATE
        started = time.perf_counter()
        with segment.gate.passage(timeout, f"sync of segment {segment.name}"), \
                self._transfer():
            if isinstance(segment, Replica):
                found = "tracked" if tracked else "ranges given" if ranges else "hashed"
                info = self._publish_remote(attachment, chunks, found)
                metrics.observe_since(metrics.SYNC_REMOTE, started)
                return info
            # Hashed before the publish, as a remote writer's sync does: a store racing
            # with the sync shows as a changed chunk, never as part of this version.
            before = self._hashes(segment, chunks) if self.data_dir is not None else b""
            if segment.info.backups:
                info = self._publish_home_backed(attachment, chunks)
            else:
                info = self._publish_version(attachment.session.caller, segment,
                                             attachment.lease, attachment)
            if self.data_dir is not None:
                self._keep(segment, info.version, before)
            metrics.observe_since(metrics.SYNC_HOME, started)
            return info

    def _lock_ended(self, attachment: Attachment) -> VasError:
        """The error of a sync whose lock ended: NotFound if a remote writer's segment
        was deleted (a delete on the home frees a segment it has no attachment of at
        once, its record and writer lock with it: replicas elsewhere do not hold it),
        else Fenced. The record is read only on this error path."""
        fenced, segment = _fenced_error(attachment), attachment.segment
        if not isinstance(segment, Replica):
            return fenced
        try:
            record = self.coordinator.find_segment(segment.name)
        except VasError:  # cannot tell: the lock is gone either way
            return fenced
        if record is None or record.id != segment.id:
            return NotFound(f"segment {segment.name} (id {segment.id}) was deleted: the "
                            "writes since the last sync are not published")
        return fenced

    def write_from(self, attachment: Attachment, offset: int, length: int,
                   address: int) -> None:
        """Copy ``length`` bytes at ``address`` in the client's memory into the home
        pages at ``offset``, for a revocable "rw" ``attachment`` (``WriteFrom``).

        Why: a client storing a GiB through its own new mapping first faults every
        page of it in (~0.5 s a GiB on the development VM, and the munmap at detach
        another ~0.1 s). Here the kernel copies from the client's pages
        (process_vm_readv) straight into the agent's mapping of memory the warm pool
        prepared (node/pool.py: a put of a size seen before), else into a buffer of a
        few MiB and on with ``pwrite`` (two copies, yet no page table to fill: one
        such stream measured as fast as mapping and populating the memfd here). A
        copy of ``PARALLEL_COPY_MIN`` or more runs as two halves on two threads, into
        the agent's mapping (made for it: ``Memory.map_writable``; not for a file of
        the data dir, which the agent maps read-only: one ``pwrite`` stream).

        Fenced like the writer's own stores: each ``WRITE_FROM_STEP`` runs inside
        ``Guard.storing``, so none starts once the lock is being revoked. The pid
        is the client's only while its pidfd says it lives: a step read from a
        client that exited meanwhile (its pid may name another process by then) is
        dropped (zeroed, if it was read into the pages) and the copy ends Unavailable.

        :raises InvalidArgument: not a revocable "rw" attachment, or a range outside
            the segment.
        :raises Fenced: the lock ended, or is being revoked.
        :raises Unavailable: this agent cannot read the client's memory (no pidfd of
            it, ptrace rules, a source range it cannot fault in): the client stores
            through its mapping instead.
        """
        segment, guard = attachment.segment, attachment.guard
        if attachment.mode != "rw" or guard is None:
            raise InvalidArgument(f"attachment {attachment.id} of {segment.name} is not a "
                                  "\"rw\" attachment of a segment homed on this node")
        validate.check_range(offset, length, segment.size)
        if attachment.lease.state is not LeaseState.HELD:
            raise _fenced_error(attachment)
        if guard.pidfd < 0 or guard.pid <= 0:
            raise Unavailable(f"segment {segment.name}: this agent has no pidfd of the "
                              "client, so it cannot read its memory")
        fenced = _fenced_error(attachment)
        parallel = length >= PARALLEL_COPY_MIN
        if parallel:
            with guard.storing(fenced), segment.lock:  # not released meanwhile
                parallel = segment.memory.map_writable() is not None
        copy_step = _client_copier(segment)

        def copy(start: int, end: int) -> None:  # [start, end) of the range
            done = start
            while done < end:
                step = min(WRITE_FROM_STEP, end - done)
                with guard.storing(fenced):  # steps of both halves: storing counts them
                    done += copy_step(guard, offset + done, address + done, step)

        with self._transfer():
            if not parallel:
                copy(0, length)  # one stream
            else:
                half = -(-length // 2 // WRITE_FROM_STEP) * WRITE_FROM_STEP
                _both(lambda: copy(0, half), lambda: copy(half, length))

    def _publish_home_backed(self, attachment: Attachment, chunks: list[int] | None):
        """sync() of a home writer whose segment has backups: stage the chunks changed
        since the backups' version (``chunks`` of the ranges given, else those whose
        hash changed) at every backup, publish, have them apply it (node/backup_push.py)."""
        segment = attachment.segment
        with segment.pages() as view:
            # Hashed before the bytes are read: a racing write shows at the next sync.
            if chunks is not None:
                fresh = _rehash(view, segment.pushed_hashes, chunks)
            else:
                fresh = hashes(view)
                chunks = differing(segment.pushed_hashes, fresh)
            with run_views(view, chunks) as pieces:
                staged = self.backup_push.stage(segment, pieces)
        info = self._publish_version(attachment.session.caller, segment, attachment.lease,
                                     attachment)
        self.backup_push.commit(segment, info.version, staged)
        with segment.lock:
            segment.pushed_hashes = fresh
        log.info("sync of %s: %d changed chunks staged at %d backups, now version %d",
                 segment.name, len(chunks), len(staged), info.version)
        return info

    def _publish_remote(self, attachment: Attachment, chunks: list[int] | None, found: str):
        """Send a remote writer's changed chunks (``chunks``, or those whose hash changed
        since the last sync) to the home; the record at the new version. ``found``:
        how the chunks were found, for the log."""
        replica = attachment.segment
        started = time.perf_counter()
        with memoryview(replica.memory.mapping) as raw, raw.cast("B") as view:
            if chunks is not None:
                synced = _rehash(view, replica.synced_hashes, chunks)
            else:
                synced = hashes(view)
                chunks = differing(replica.synced_hashes, synced)
            hashed = time.perf_counter()
            with replica.lock:  # moved only by this writer's syncs and its attach's fetch
                base = replica.info.version
            try:
                info, via = self._send_changes(attachment, view, chunks, base)
            except Busy as exc:
                log.warning("sync of %s: %s; comparing with the home's pages", replica.name, exc)
                info, via, chunks, synced = self._rebase(attachment, view)
        with replica.lock:
            replica.synced_hashes = synced
            replica.adopt_version_locked(info.version)
        log.info("sync of %s: sent %d changed chunks (%d bytes) to %s %s, now version %d (%s; "
                 "hashing %.1f ms, sending and publishing %.1f ms)", replica.name, len(chunks),
                 len(chunks) * CHUNK, replica.info.home, via, info.version, found,
                 1e3 * (hashed - started), 1e3 * (time.perf_counter() - hashed))
        return info

    def _send_changes(self, attachment: Attachment, view: memoryview, chunks: list[int],
                      base: int) -> tuple[types_pb2.SegmentInfo, str]:
        """Publish ``chunks`` of a remote writer's replica (``view``) at its home, if the
        segment is still at version ``base`` (else Busy, nothing published); fences
        the writer if its token is stale."""
        replica, lease = attachment.segment, attachment.lease
        header = node_pb2.WritePagesHeader(
            caller=attachment.session.caller, name=replica.name, id=replica.id,
            token=lease.token, lease_id=lease.lease_id, base_version=base)
        timeout = self.config.rpc_timeout + len(chunks) * CHUNK / SEND_RATE
        try:
            return self._send(replica, self._home_address(replica.info), header, view,
                              runs(chunks, replica.size), timeout)
        except Fenced:
            raise self.fence(attachment) from None

    def _rebase(self, attachment: Attachment, view: memoryview
                ) -> tuple[types_pb2.SegmentInfo, str, list[int], bytes]:
        """A remote writer's publish was refused: the segment moved past the version its
        replica holds; (the record, how it went, the chunks sent, the replica's hashes).

        Only this writer's token publishes, so what moved it was an earlier sync of
        this writer that failed (no answer) and was published late, or a version
        number taken by a publish whose bytes were dropped. Either way no late
        publish can land any more (each carries an older base, and the coordinator
        decides on the record a publish replaces), so a second refusal is not
        expected and is raised. Every chunk of the replica is compared with the
        home's pages and those that differ are published on the segment's current
        version -- or, if none does, that version is acknowledged: it holds exactly
        these bytes (never the same bytes as two versions)."""
        replica = attachment.segment
        synced = hashes(view)  # before any byte is read, as for every sync
        record = self.coordinator.get_segment(replica.name)
        if record.id != replica.id:
            raise NotFound(f"segment {replica.name} (id {replica.id}) was deleted")
        _, home = self.peers.chunk_hashes(self._home_address(replica.info), replica.name,
                                          replica.id, CHUNK)
        chunks = differing(home, synced)
        if not chunks:
            return record, "already at the home (published late)", chunks, synced
        info, via = self._send_changes(attachment, view, chunks, record.version)
        return info, f"{via}, on version {record.version}", chunks, synced

    def _send(self, replica: Replica, address: str, header: node_pb2.WritePagesHeader,
              view: memoryview, byte_runs: list[tuple[int, int]], timeout: float
              ) -> tuple[types_pb2.SegmentInfo, str]:
        """Publish ``byte_runs`` of the replica at its home: (the record at the new
        version, how it went). Over the bulk channel (sendfile from the replica memfd,
        2.5-4.5 GB/s against ~1 GB/s for a gRPC stream; faster even for one chunk, so
        every size goes this way), or as WritePages when it fails or cannot be opened,
        or for more than ``bulk.MAX_WRITE_RUNS`` runs. The home's own answer (Fenced,
        PermissionDenied...) is raised, never retried."""
        channel = None
        if self._homes is not None and len(byte_runs) <= bulk.MAX_WRITE_RUNS:
            try:
                channel = self._homes.channel(replica.info.home, replica.name, replica.id)
            except VasError as exc:  # WritePages says what is wrong, if anything still is
                log.warning("no bulk channel to node %s (%s): sync of %s as WritePages",
                            replica.info.home, exc, replica.name)
        if channel is not None:
            try:
                info = channel.write(replica.id, header.SerializeToString(), byte_runs,
                                     replica.memory.fd, timeout)
                return types_pb2.SegmentInfo.FromString(info), "over the bulk channel"
            except (bulk.WriteFailed, CapacityExceeded) as exc:
                # Nothing published (a reply lost after every byte left is Unavailable,
                # raised: resent, the bytes would be published again at one more version).
                log.warning("bulk sync of %s to node %s failed (%s); using WritePages",
                            replica.name, replica.info.home, exc)
                self._homes.forget(replica.info.home, channel)  # may be stale (a restart)
        info = self.peers.write_pages(address, header, view, byte_runs, timeout)
        return info, "as WritePages"

    def _publish_version(self, caller, segment, lease: WriterLease,
                         attachment: Attachment | None = None, *,
                         adopt: bool = True, base: int | None = None
                         ) -> types_pb2.SegmentInfo:
        """PublishVersion for the writer holding ``lease`` (the caller is in the segment's
        gate); ``adopt``: the pages hold the new version now (else the caller adopts it
        once they do); ``base``: only if the segment is at that version (else Busy).
        A local ``attachment`` whose token is stale is fenced."""
        try:
            info = self.coordinator.publish_version(caller, segment.name, segment.id,
                                                    lease.token, lease.lease_id, base)
        except Fenced:
            if attachment is not None:
                raise self.fence(attachment) from None
            raise
        if adopt:
            with segment.lock:
                segment.adopt_version_locked(info.version)
        return info

    # ------------------------------------------------------------------ home side

    def write_pages(self, segment, header: node_pb2.WritePagesHeader, pieces,
                    started: float | None = None) -> types_pb2.SegmentInfo:
        """Apply a remote writer's ``pieces`` ((offset, bytes) pairs) to home ``segment``
        if its token is current. ``started``: when receiving them began (perf_counter),
        if before this call (a bulk write), for the log."""
        if segment.name != header.name:
            raise NotFound(f"segment {header.name!r} (id {header.id}) is not held by "
                           f"node {self.node_id}")
        started = started or time.perf_counter()
        staged = Staged(segment.size)
        for offset, data in pieces:
            staged.add(offset, data)
        received = time.perf_counter()
        fd = segment.dup_fd()
        try:
            timeout = self.config.rpc_timeout + staged.total / SEND_RATE
            with segment.gate.passage(timeout, f"publish of segment {segment.name}"):
                lease = WriterLease(header.name, header.token, header.lease_id)
                backed = self.backup_push.stage(segment, staged.pieces) \
                    if segment.info.backups else []
                # A compare-and-set on the version the writer's bytes are based on:
                # a late write (its writer gave up waiting and synced again) is
                # refused here, before any of its bytes reach the pages.
                base = header.base_version if header.HasField("base_version") else None
                try:
                    info = self._publish_version(header.caller, segment, lease, adopt=False,
                                                 base=base)
                except Busy as exc:
                    log.warning("publish of %s from a remote writer refused, its %d bytes "
                                "dropped: %s", segment.name, staged.total, exc)
                    raise
                published = time.perf_counter()
                after = self._intend(segment, info.version, staged.pieces)
                for offset, data in staged.pieces:
                    _pwrite_all(fd, data, offset)
                if self.data_dir is not None:
                    self._keep(segment, info.version, after)
                    self.data_dir.done(segment.id)
                with segment.lock:  # only now: a reader never sees the version before its bytes
                    segment.adopt_version_locked(info.version)
                if segment.pushed_hashes is not None:
                    self._rehash_pushed(segment, fd, staged.pieces)
                self.backup_push.commit(segment, info.version, backed)
        finally:
            os.close(fd)
        # debug: the writer's agent logs the same sync at INFO (one line per sync, not two).
        log.debug("publish of %s from a remote writer: %d bytes, version %d (receiving %.1f ms, "
                 "publishing %.1f ms, writing %.1f ms)", segment.name, staged.total,
                 info.version, 1e3 * (received - started), 1e3 * (published - received),
                 1e3 * (time.perf_counter() - published))
        return info

    @staticmethod
    def _rehash_pushed(segment, fd: int, pieces) -> None:
        """After a remote writer's publish: the backups hold the home's bytes again, so
        the chunks ``pieces`` touched are hashed anew into ``pushed_hashes``."""
        chunks = sorted({index for offset, data in pieces
                         for index in range(offset // CHUNK, -(-(offset + len(data)) // CHUNK))})
        with read_only_view(fd, segment.size) as view:
            fresh = _rehash(view, segment.pushed_hashes, chunks)
        with segment.lock:
            segment.pushed_hashes = fresh

    def published_hashes(self, segment, chunk_size: int) -> tuple[int, bytes]:
        """(version, chunk hashes) of home ``segment``, never mid-publish."""
        if chunk_size != CHUNK:
            raise InvalidArgument(f"invalid chunk size {chunk_size}: this agent hashes "
                                  f"{CHUNK}-byte chunks")
        fd = segment.dup_fd()
        try:
            timeout = self.config.rpc_timeout + segment.size / SEND_RATE
            with segment.gate.passage(timeout, f"hashes of segment {segment.name}"):
                with segment.lock:
                    version, cached = segment.info.version, segment.published_hashes
                if cached is not None and cached[0] == version:
                    return cached
                with read_only_view(fd, segment.size) as view:
                    fresh = (version, hashes(view))
                with segment.lock:
                    segment.published_hashes = fresh
                return fresh
        finally:
            os.close(fd)

    @staticmethod
    def _hashes(segment, chunks: list[int] | None) -> bytes:
        """Chunk hashes of home ``segment``'s pages (a data-dir file) as they are now:
        the kept ones with ``chunks`` hashed again, or (None) every chunk. A home
        writer's stores outside the chunks it syncs are not kept: like any store
        after a sync, a restart finds them differing (node/datadir.py)."""
        with segment.lock:
            kept = segment.kept_hashes
        if chunks is None or not kept:
            return segment.memory.hashes()
        return segment.memory.hashes(kept, chunks)

    def _intend(self, segment, version: int, pieces: list[tuple[int, bytes]]) -> bytes:
        """With a data dir: keep a remote writer's published ``pieces`` in a redo file
        before they overwrite the home file (node/datadir.py ``intend``); the chunk
        hashes they result in. Unavailable if that fails: nothing was applied."""
        if self.data_dir is None:
            return b""
        with segment.lock:
            kept = segment.kept_hashes
        after = segment.memory.hashes_after(kept or segment.memory.hashes(), pieces)
        try:
            self.data_dir.intend(segment.id, version, pieces, after)
        except OSError as exc:
            raise Unavailable(f"segment {segment.name}: version {version} was published but "
                              f"could not be kept in --data-dir {self.data_dir.path}: "
                              f"{exc.strerror or exc}") from exc
        return after

    def _keep(self, segment, version: int, chunk_hashes: bytes) -> None:
        """Write the manifest of a home publish to the data dir before it is
        acknowledged (the caller is in the segment's gate); Unavailable if that fails:
        the writer's sync then fails, so nothing unkept is acknowledged."""
        try:
            self.data_dir.save(segment.info, version, chunk_hashes, segment.writer_mapped)
        except OSError as exc:
            raise Unavailable(f"segment {segment.name}: version {version} was published but "
                              f"could not be kept in --data-dir {self.data_dir.path}: "
                              f"{exc.strerror or exc}") from exc
        with segment.lock:
            segment.kept_hashes = chunk_hashes

    # ------------------------------------------------------------------ wait

    def wait(self, session, segment, floor: int, timeout: float) -> types_pb2.SegmentInfo:
        """The record of ``segment`` once its version exceeds ``floor`` (or at a delete
        mark), or as it is when ``timeout`` seconds (0: no limit) pass or the client
        hangs up."""
        deadline = time.monotonic() + timeout if timeout else math.inf
        with segment.lock:
            info = segment.info
        while not session.hung_up():
            watch = min(WATCH_SLICE, deadline - time.monotonic())
            if watch <= 0:
                break
            info = self._watch_version(segment, floor, watch)
            if info.version > floor:
                break
        return info

    def _watch_version(self, segment, floor: int, timeout: float) -> types_pb2.SegmentInfo:
        request = coordinator_pb2.WatchRequest(prefix=segment.name)
        with segment.lock:
            info = segment.info
        with self.coordinator.watch(request, timeout) as events:
            for event in events:
                if event.type == coordinator_pb2.WatchEvent.TYPE_CREATED:
                    # Established: anything published from now on is in the stream.
                    info = self.coordinator.get_segment(segment.name)
                elif event.segment.name == segment.name:
                    info = event.segment
                else:
                    continue
                if info.id != segment.id:
                    raise NotFound(f"segment {segment.name} (id {segment.id}) was deleted")
                if info.version > floor or info.state == types_pb2.SEGMENT_STATE_DELETING:
                    break
        return info


class _Renewal(enum.Enum):
    RENEWED = 1
    FAILED = 2   # no answer in time: tried again soon
    FENCED = 3   # the lock is lost
    SKIPPED = 4  # nothing to renew: ended, or its client shows no sign of life


def _client_copier(segment):
    """``copy_step(guard, offset, address, step)``: one step of ``Writers.write_from``,
    copying up to ``step`` bytes at ``address`` in the writer's memory into the home
    pages at ``offset``; the bytes copied (> 0). Into the agent's writable mapping when
    the memory has one (the warm pool's, populated, or one made for a large copy),
    else through this thread's buffer (``BOUNCE_SIZE``) and ``pwrite``. Each step runs
    inside ``Guard.storing``: the memory cannot be released under it."""
    name, mapping = segment.name, segment.memory.writable_mapping()
    if mapping is not None:
        def into_pages(guard, offset: int, address: int, step: int) -> int:
            # A view per step: none is held between steps, when a revocation may let
            # the delete that caused it release the memory.
            with memoryview(mapping) as raw, raw.cast("B") as pages, \
                    pages[offset:offset + step] as target:
                copied = _read_client(guard, target, address, name)
                if guard.exited():
                    target[:copied] = bytes(copied)
                    raise _writer_exited(name)
            return copied

        return into_pages
    bounce = _bounce_buffer()

    def through_buffer(guard, offset: int, address: int, step: int) -> int:
        with bounce[:min(step, len(bounce))] as target:
            copied = _read_client(guard, target, address, name)
            if guard.exited():
                raise _writer_exited(name)
            with target[:copied] as part:
                pwrite_all(segment.fd, part, offset)
        return copied

    return through_buffer


def _bounce_buffer() -> memoryview:
    """This thread's buffer of ``BOUNCE_SIZE`` bytes for WriteFrom (made on its first
    use and kept: a fresh one per request was faulted in page by page each time,
    which cost more than copying a few MiB through it)."""
    buffer = getattr(_BOUNCE, "buffer", None)
    if buffer is None:
        buffer = _BOUNCE.buffer = memoryview(bytearray(BOUNCE_SIZE))
    return buffer


#: Each request thread's WriteFrom buffer (``_bounce_buffer``).
_BOUNCE = threading.local()


def _both(first: Callable[[], None], second: Callable[[], None]) -> None:
    """Run ``second`` on a thread of its own and ``first`` on this one; return once both
    ended (no copy goes on after the request is answered), raising the first's error,
    else the second's."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            second()
        except BaseException as exc:  # noqa: BLE001  (re-raised on the request's thread)
            errors.append(exc)

    thread = threading.Thread(target=run, name="vas-node-write-from", daemon=True)
    thread.start()
    try:
        first()
    finally:
        thread.join()
    if errors:
        raise errors[0]


def _read_client(guard, target: memoryview, address: int, name: str) -> int:
    """process_vm_readv of the writer's memory at ``address`` into ``target``; the
    bytes copied (> 0), else Unavailable (the client then stores them itself)."""
    try:
        copied = _native.process_vm_readv(guard.pid, target, address)
    except OSError as exc:
        raise Unavailable(f"segment {name}: cannot read the writer's memory at "
                          f"0x{address:x}: {exc.strerror or exc}") from exc
    if copied <= 0:
        raise Unavailable(f"segment {name}: cannot read the writer's memory at "
                          f"0x{address:x}")
    return copied


def _writer_exited(name: str) -> Unavailable:
    # Its pid may name another process by now: what was read is not its bytes.
    return Unavailable(f"segment {name}: the writer exited during its copy")


def _fenced_error(attachment: Attachment) -> Fenced:
    return Fenced(f"segment {attachment.segment.name}: writer token {attachment.lease.token} "
                  "is no longer current (lease lapsed or lock taken over); detach and attach "
                  "\"rw\" again")


def _rehash(view: memoryview, synced: bytes, chunks: list[int]) -> bytes:
    """``synced`` with the hashes of ``chunks`` recomputed from ``view``."""
    fresh_all = bytearray(synced)
    for offset, length in runs(chunks, len(view)):
        with view[offset:offset + length] as part:
            first = 8 * (offset // CHUNK)
            fresh = hashes(part)
            fresh_all[first:first + len(fresh)] = fresh
    return bytes(fresh_all)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
