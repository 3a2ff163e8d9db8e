"""Replicas: this node's copies of segments homed elsewhere.

A remote attach makes the agent keep **one replica** per segment: its own
sealed memfd, filled from the home, whose read-only reopen every local attach
receives exactly like a home segment's (all local processes map the same
pages). Each remote attach reads the record first (the caller's permission
check and the freshness check): the replica is reused while its id matches and
its version is not older than the record's, else it is retired and fetched
again. Concurrent attaches of one name share one fetch.

- eager (``FetchMode`` EAGER*): every byte is copied before the attach returns
  (the bulk channel, node/bulk.py; ReadPages for small segments and as the
  fallback), into prepared memory when the warm pool has some (node/pool.py);
- lazy (``FetchMode.LAZY``): a memfd (sparse, or memory the warm pool prepared)
  whose chunks are fetched on first touch through the client's userfaultfd
  (node/lazy.py; the fault resolvers are node/faults.py); nothing per byte is
  paid at attach.

Replicas are capacity-accounted like home segments; room is made by evicting
unattached replicas, least recently attached first. A replica is retired (no
new attaches, freed at its last detach) when the record is gone, deleting,
lost, of another id or newer, when its home is gone (not registered: the
record's state at an attach, or a chunk fetch that failed and then found the
home missing from ListNodes), when it is evicted, or when a writer leaves it (it may hold writes
never published). Retired because the home's bytes are gone (deleted, home
gone), a lazy replica's fill is *lost*: its missing pages are never fetched,
and faults on them are poisoned (SIGBUS in the client; node/faults.py).
``refresh`` fetches only the chunks whose hash differs from the home's
(node/publish.py).

Deletes made elsewhere: while a replica is held its node reports it (an
attachment report with ``copy``, kept at count 0), so the agent that deletes
the segment, or the home that frees it, is told which nodes to tell
(``Node.ReleaseReplica`` -> ``drop``; node/notices.py). ``recheck_stale`` is
the safety net behind those notices (a node cut off when the delete
happened): every heartbeat it asks the coordinator, in batches
(``CheckSegments``), about every replica whose record was not read for
``RECHECK_AGE`` seconds, and about all of them after the node registered again.

Locking: ``_lock`` (rank REPLICAS) guards the tables; each replica's own lock
its state; no lock is held across a network call or a slow syscall.
"""
from __future__ import annotations

import collections
import enum
import functools
import logging
import os
import threading
import time
from collections.abc import Callable

from vas.core.errors import (Busy, CapacityExceeded, Fenced, InvalidArgument, NotFound,
                             Unavailable, VasError)
from vas.core.fetch import FetchMode
from vas.core.sizes import human_size
from vas.node import bulk, faults, lazy, locks, metrics, relay
from vas.node.pool import Warm
from vas.node.publish import CHUNK, stale_runs
from vas.node.segments import Replica, ReplicaState, WriterState
from vas.node.store import Memory
from vas.proto import types_pb2

log = logging.getLogger(__name__)

#: Longest wait of an attach for the report of a replica's first attachment (a
#: coordinator that does not answer in this time has just answered its GetSegment).
REPORT_TIMEOUT = 2.0
#: Replicas up to this size are fetched with one ReadPages stream (no bulk connections).
_SMALL_FETCH = 4 << 20
#: gRPC streams are given this many bytes per second (on top of the rpc
#: timeout) before their deadline.
_STREAM_RATE = 50e6
#: Record states whose home serves pages: DEGRADED has fewer backups than asked, not
#: fewer bytes.
_SERVED = (types_pb2.SEGMENT_STATE_READY, types_pb2.SEGMENT_STATE_DEGRADED)
#: A lazy replica of a segment with backups whose home fails waits at most this many
#: node TTLs (and its fault's deadline) for a backup's promotion: the lease lapses
#: within one, etcd notices within 0.5 s more.
_REHOME_WAIT = 2
#: ``recheck_stale`` checks the replicas whose record was not read for this many
#: seconds, ``_RECHECK_BATCH`` per CheckSegments call, at most ``_RECHECK_MAX``
#: per heartbeat (a node holding more catches up over the next beats).
RECHECK_AGE = 30.0
_RECHECK_BATCH = 128
_RECHECK_MAX = 1024
#: Ids of segments this node was told are gone (``drop``), remembered so that a
#: fetch of one already in flight is discarded.
_MAX_DROPPED = 4096
#: Relays an eager fetch tries (each failing one named to the home, which answers
#: another) before it fetches the rest from the home itself.
_RELAY_TRIES = 3


class _Step(enum.Enum):
    HAND_OUT = "hand out"
    COMPLETE = "complete"
    WAIT = "wait"
    FETCH = "fetch"


class Replicas:
    """This node's replicas (see the module docstring)."""

    def __init__(self, node_id: str, config, store, pool, coordinator, peers, sessions,
                 reporter, node_address: Callable[[str], str | None]):
        self.node_id = node_id
        self.config = config
        self.store = store
        self.pool = pool
        self.coordinator = coordinator
        self.peers = peers
        self.sessions = sessions
        self.reporter = reporter
        self._node_address = node_address
        #: Client context of the bulk channel to homes (None: plaintext).
        self.bulk_tls = config.tls.client_context() if config.tls else None
        self.homes = lazy.Homes(node_address, peers.open_bulk, config.rpc_timeout,
                                self.bulk_tls)
        self._lock = locks.Lock("replicas", locks.Rank.REPLICAS)
        self._current: dict[str, Replica] = {}            # name -> replica handed out
        self._fetching: dict[str, threading.Event] = {}   # name -> set when its fetch ends
        self._held: set[Replica] = set()                  # every replica not FREED
        self._dropped: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._recheck_all = False                         # after registering again
        self._faults: faults.FaultHandler | None = None   # started by the first RegisterFaults
        #: The eager copies this node relays to later fetchers (node/relay.py).
        self.copies = relay.Copies()

    # ------------------------------------------------------------------ attach

    def attach(self, session, info: types_pb2.SegmentInfo, mode: FetchMode, lease=None):
        """(attachment, fd) of this node's replica of ``info``, fetched first unless it
        is current; writable, holding ``lease``, when given (a remote writer)."""
        deadline = time.monotonic() + self.config.rpc_timeout + info.size / _STREAM_RATE
        lazy_ok = mode is FetchMode.LAZY and lease is None
        self._check_not_dropped(info)
        if info.state not in _SERVED:  # the home's lease is gone, no backup promoted yet
            gone = (f"home node {info.home} of segment {info.name} is not registered "
                    "(down?)")
            self.retire_name(info.name, lost=gone)
            raise Unavailable(gone)
        while True:
            step, replica, event = self._next_step(info, lazy_ok)
            if step is _Step.FETCH:  # a writer's copy will change: it relays nothing
                replica = self._refetch(info, mode, replica, event, offer=lease is None)
            elif step is _Step.COMPLETE:  # an eager attach of a lazy replica
                self.complete(replica)
                continue
            elif step is _Step.WAIT:
                if not event.wait(max(0.0, deadline - time.monotonic())):
                    raise Unavailable(f"timed out waiting for the fetch of segment {info.name}")
                continue
            if lease is not None and replica.relay is not None:  # the writer will change it
                replica.relay.quiesce(max(0.0, deadline - time.monotonic()))
            handed = self._hand_out(session, replica, info, lease)
            if handed is not None:
                return handed
            if time.monotonic() > deadline:  # retired under us again and again
                raise Unavailable(f"segment {info.name} kept changing during its attach")

    def _next_step(self, info: types_pb2.SegmentInfo, lazy_ok: bool):
        """(step, replica, event) of an attach of ``info``: hand out the current replica,
        complete it, wait for a fetch in flight (its event), or fetch (our event; the
        replica is the stale one to retire)."""
        with self._lock:
            replica = self._current.get(info.name)
            pending = self._fetching.get(info.name)
            usable = (replica is not None and replica.id == info.id
                      and replica.info.version >= info.version)
            if usable and (replica.fill is None or lazy_ok):
                return _Step.HAND_OUT, replica, None
            if pending is not None:
                return _Step.WAIT, replica, pending
            if usable:
                return _Step.COMPLETE, replica, None
            done = self._fetching[info.name] = threading.Event()
            return _Step.FETCH, replica, done

    def _refetch(self, info: types_pb2.SegmentInfo, mode: FetchMode, stale: Replica | None,
                 done: threading.Event, offer: bool) -> Replica:
        """Fetch a new replica of ``info`` (retiring ``stale``) and make it current; it is
        reported (a copy held here) so that a delete made elsewhere tells this node.
        ``offer``: an eager copy is offered to the home as a relay. NotFound when the
        segment was dropped (deleted) while it was being fetched."""
        try:
            if stale is not None:  # of an older version, or of a deleted segment of the name
                self.retire(stale, lost=None if stale.id == info.id else
                            f"segment {info.name} (id {stale.id}) was deleted",
                            successor=True)
            replica = (self._lazy_replica(info) if mode is FetchMode.LAZY
                       else self._eager_replica(info, offer))
            self.store.hold(info.size)
            with self._lock:
                dropped = info.id in self._dropped
                if not dropped:
                    self._current[info.name] = replica
                self._held.add(replica)
            if dropped:
                self.retire(replica)
                self._check_not_dropped(info)
            self.reporter.mark(replica)
            return replica
        finally:
            with self._lock:
                del self._fetching[info.name]
            done.set()

    def current_version(self, replica: Replica, info: types_pb2.SegmentInfo) -> int | None:
        """The version ``replica`` holds if it is still what an attach of ``info`` would
        map (current, same id, at least that version), else None (Agent.revalidate)."""
        with replica.lock:
            if (replica.state is not ReplicaState.CURRENT or replica.id != info.id
                    or replica.info.version < info.version):
                return None
            replica.checked = time.monotonic()  # as at an attach: the record was just read
            return replica.info.version

    def _check_not_dropped(self, info: types_pb2.SegmentInfo) -> None:
        with self._lock:
            dropped = info.id in self._dropped
        if dropped:
            raise NotFound(f"segment {info.name} (id {info.id}) was deleted")

    def _hand_out(self, session, replica: Replica, info: types_pb2.SegmentInfo, lease):
        """(attachment, fd) of ``replica``, or None if it was retired meanwhile."""
        with replica.lock:
            if replica.state is not ReplicaState.CURRENT:
                return None
            # A promoted backup is the new home of the same bytes: the replica stays (a
            # lazy one's reader finds the new home when the old one fails it).
            replica.info.home = info.home
            if lease is not None and replica.writer_state is not WriterState.FREE:
                raise Busy(f'segment {info.name} is already attached "rw" on node {self.node_id}')
            replica.checked = time.monotonic()
            fd = os.dup(replica.fd if lease is not None else replica.ro_fd)
            replica.attachments += 1
            first = replica.attachments == 1
            attachment = self.sessions.add(session, replica, "rw" if lease else "r", lease)
            if lease is not None:
                replica.take_writer_locked(attachment)
        if first:  # a delete made once this attach returned must see it (node/homes.py)
            if not self.reporter.report_now(replica, REPORT_TIMEOUT):
                log.warning("the attachment of %s was not reported within %.0f s",
                            replica.name, REPORT_TIMEOUT)
        else:
            self.reporter.mark(replica)
        return attachment, fd

    def detached(self, attachment) -> None:
        """``attachment`` of a replica ended: count it out; a writer's copy is retired
        (it may hold writes never published); a retired one is freed at its last detach."""
        replica = attachment.segment
        with replica.lock:
            replica.attachments -= 1
            replica.free_writer_locked(attachment)
        self.reporter.mark(replica)
        if attachment.mode == "rw":
            self.retire(replica)
        else:
            self._free_if_idle(replica)

    # ------------------------------------------------------------------ fetching

    def _eager_replica(self, info: types_pb2.SegmentInfo, offer: bool) -> Replica:
        """A new replica holding every byte of ``info`` (room reserved here, held by the
        caller), relayed to later fetchers from the start of its fetch when it is large
        (``offer``: the home is told so); on any failure nothing is left behind."""
        spare = self.make_room(info.size, info.name)
        warm = self.pool.take(info.size)
        # Fresh pages are allocated below only without a prepared memfd: the room made
        # must then be given back first; else between transfers.
        self.release_spare(spare, later=warm is not None)
        copy = None
        try:
            address = self.home_address(info)
            if warm is None:  # sparse: the transfer allocates the pages as it goes
                warm = Warm(info.size, reserve=False)
            memory = "warm" if warm.populated else "cold"  # before a fallback populates it
            started = time.monotonic()
            if info.size > _SMALL_FETCH:
                copy = self.copies.begin(info, warm.fd)
            with self.pool.transfer():
                via = self._transfer(address, info, warm, copy, offer)
        except BaseException:
            self.store.unreserve(info.size)
            if copy is not None:  # given back once no relay request is served from it
                copy.release(warm.release)
            elif warm is not None:
                warm.release()
            raise
        finally:
            self.pool.want(info.size)  # prepared after the transfer, not competing for CPU
        elapsed = time.monotonic() - started
        metrics.FETCH_EAGER.observe(elapsed)
        log.info("replica of %s (id %d, version %d): fetched %d bytes from %s %s in %.3f s "
                 "(%.2f GB/s, %s memory)", info.name, info.id, info.version, info.size,
                 info.home, via, elapsed, info.size / max(elapsed, 1e-9) / 1e9, memory)
        replica = Replica(info, warm)
        replica.relay = copy
        return replica

    def _lazy_replica(self, info: types_pb2.SegmentInfo) -> Replica:
        """A replica of ``info`` whose chunks are fetched on first touch or prefetch.

        Its memfd comes from the warm pool when one of its size is prepared (the
        chunks are then received into allocated pages: no page allocation on the
        faults' path), else it is sparse. Either way every client's first touch of a
        page raises a userfault (MISSING for a hole, MINOR for a page in the memfd
        but not in the client's fresh mapping), and the fault handler makes the
        chunk present (``LazyFill``) before it maps anything: a prepared page's
        zeros are never shown. Nothing here costs per byte, and the home is not
        called: the record's state says it is registered, and its address and bulk
        channel come from ``self.homes`` (looked up in the background on a first
        attach).
        """
        spare = self.make_room(info.size, info.name)
        try:
            memory = self.pool.take(info.size) or Memory.allocate(
                "replica", info.size, reserve=False, mapped=True)
        except BaseException:
            self.store.unreserve(info.size)
            self.release_spare(spare)
            raise
        reader = self._chunk_reader(info, memory)
        replica = Replica(info, memory, lazy.LazyFill(
            info.size, reader, on_lost=lambda exc: self._pages_lost(replica, exc)))
        threading.Thread(target=self._after_lazy_attach, args=(reader, spare),
                         name="vas-node-lazy-attach", daemon=True).start()
        log.info("replica of %s (id %d, version %d, %d bytes) from %s: lazy", info.name,
                 info.id, info.version, info.size, info.home)
        return replica

    def _after_lazy_attach(self, reader: lazy.HomeReader, spare: list) -> None:
        """The slow parts of a lazy attach, off its path (one thread: each start costs
        ~0.4 ms there): the home's bulk channel before the first fault, then the room
        taken from evicted replicas and the warm pool, given back between transfers
        (this replica's chunk reads are transfers)."""
        reader.prepare()
        self.release_spare(spare, later=True)

    def _chunk_reader(self, info: types_pb2.SegmentInfo, memory: Memory) -> lazy.HomeReader:
        """``fetch(offset, length)`` for a LazyFill: chunk requests on the home's bulk
        channel, ReadPages into the replica's mapping as the fallback."""
        def read_pages(address: str, offset: int, length: int,
                       limit: float | None = None) -> None:
            timeout = self.config.rpc_timeout + length / _STREAM_RATE
            if limit is not None:  # a fault's deadline
                timeout = min(timeout, limit)
            with memoryview(memory.mapping) as raw, raw.cast("B") as view, \
                    view[offset:offset + length] as part:
                self.peers.read_pages_into(address, info.name, info.id, part, timeout, offset)
        rehome = functools.partial(self._promoted_home, info) if info.backups else None
        return lazy.HomeReader(self.homes, info.home, info.name, info.id, memory.mapping,
                               read_pages, self.pool.transfer, rehome,
                               _REHOME_WAIT * self.config.heartbeat_ttl,
                               allocated=getattr(memory, "populated", False))

    def _promoted_home(self, info: types_pb2.SegmentInfo, failed: str) -> str | None:
        """The node a backup of ``info`` was promoted on after its home ``failed``, if it
        holds the version this replica is at (``info`` is the replica's record: refreshes
        move its version); None when there is none (yet). One record read. A newer
        promoted version is not this replica's: its chunks would mix versions."""
        try:
            record = self.coordinator.get_segment(info.name)
        except VasError:
            return None
        if (record.id != info.id or record.home == failed or record.state not in _SERVED
                or record.version != info.version):
            return None
        return record.home

    def _transfer(self, address: str, info: types_pb2.SegmentInfo, warm: Warm,
                  copy: relay.Copy | None, offer: bool) -> str:
        """Copy the home's bytes into ``warm``: ReadPages for small segments (``copy``
        None), else the bulk channel from a relay or the home (``_fetch_bulk``). Returns
        how, for the log."""
        with memoryview(warm.mapping) as raw, raw.cast("B") as view:
            if copy is None:
                self._populate(warm)
                self.peers.read_pages_into(address, info.name, info.id, view,
                                           self.config.rpc_timeout + info.size / _STREAM_RATE)
                return f"over ReadPages at {address}"
            copy.expect(bulk.ranges(info.size, self.config.fetch_streams, self.bulk_tls))
            via = self._fetch_bulk(address, info, view, warm, copy, offer)
        copy.complete()
        return via

    def _fetch_bulk(self, address: str, info: types_pb2.SegmentInfo, view: memoryview,
                    warm: Warm, copy: relay.Copy, offer: bool) -> str:
        """Receive the bytes ``copy`` is missing over the bulk channel: from the relay the
        home names (node/relay.py), the next one when it fails (each failed one named to
        the home, up to ``_RELAY_TRIES``), then from the home; when the home's bulk
        connections fail too, by ReadPages. The parts received stay: every source
        sends only what is still missing."""
        failed: list[str] = []
        while True:
            opened = self.peers.open_bulk(address, info.name, info.id,
                                          self.copies.address if offer else "", failed)
            if opened.size != info.size:
                raise Unavailable(f"home {info.home} holds segment {info.name} with "
                                  f"{human_size(opened.size)}, not {human_size(info.size)}")
            copy.opened(opened.version)
            # A relay is of one version: after a publish here, the home's bytes are newer.
            source = (opened.relay if opened.relay and opened.version == copy.version
                      and len(failed) < _RELAY_TRIES else "")
            if failed:  # later parts start wherever the bytes stopped, not page-aligned
                self._populate(warm)
            try:
                bulk.fetch(source or opened.address, info.id, view, copy.missing(),
                           timeout=self.config.rpc_timeout, tls=self.bulk_tls,
                           version=copy.version if source else None,
                           prepare=None if warm.populated else warm.populate,
                           received=copy.received)
                return (f"over the bulk channel from relay {source} (home {opened.address})"
                        if source else f"over the bulk channel {opened.address}")
            except (Unavailable, CapacityExceeded, NotFound) as exc:
                if not source and isinstance(exc, NotFound):
                    raise  # the home does not hold it (any more)
                if source:
                    log.warning("relay fetch of %s from %s failed: %s; asking the home for "
                                "another source", info.name, source, exc)
                    failed.append(source)
                    continue
                log.warning("bulk fetch of %s from %s failed: %s; using ReadPages",
                            info.name, opened.address, exc)
            self._populate(warm)
            for offset, length in copy.missing():
                with view[offset:offset + length] as part:
                    self.peers.read_pages_into(address, info.name, info.id, part,
                                               self.config.rpc_timeout + length / _STREAM_RATE,
                                               offset)
                copy.received(offset, length)
            return f"over ReadPages at {address}"

    @staticmethod
    def _populate(warm: Warm) -> None:
        """Allocate every page of ``warm`` before bytes are written into it anywhere
        (a sparse memfd's page allocated by a fault would be SIGBUS when memory is short)."""
        if not warm.populated:
            warm.populate(0, warm.size)
            warm.populated = True

    def complete(self, replica: Replica) -> None:
        """Fetch every missing chunk of a lazy replica; it is then an eager one."""
        fill = replica.fill
        if fill is None:
            return
        fill.ensure(0, replica.size)
        with replica.lock:
            fill, replica.fill = replica.fill, None
        if fill is not None:
            fill.close()  # every chunk is present: its channel and fd are not needed

    def prefetch(self, attachment, offset: int, length: int) -> None:
        """Make [offset, offset + length) of ``attachment``'s replica present (the caller
        checked the range)."""
        replica = attachment.segment
        fill = replica.fill
        if fill is not None and length:
            fill.ensure(offset, length)

    def register_faults(self, attachment, uffd: int, address: int, size: int) -> None:
        """Resolve the faults of a client's mapping of a lazy replica on ``uffd`` (taken
        over by this call).

        A replica that became complete since the attach (another attach made it
        eager, or a writer's) has its faults resolved all the same, by mapping the
        pages in: the mapping stays registered on the uffd while anyone holds it --
        the client's guardian takes a dup next (vas/guard.py) -- so closing ours
        would leave its first fault waiting for ever, unread."""
        replica = attachment.segment
        if not isinstance(replica, Replica) or attachment.faults is not None:
            raise InvalidArgument(f"attachment {attachment.id} is not a lazy attachment "
                                  "waiting for its userfaultfd")
        if size != replica.size:
            raise InvalidArgument(f"RegisterFaults size {human_size(size)} is not the "
                                  f"segment's {human_size(replica.size)}")
        fill = replica.fill or lazy.LazyFill.complete(replica.size)
        attachment.faults = self._fault_handler().add(uffd, fill, address, size)

    def unregister_faults(self, attachment) -> bool:
        """Stop resolving the faults of ``attachment``; whether it had registered them."""
        registration, attachment.faults = attachment.faults, None
        if registration is None:
            return False
        self._faults.remove(registration)
        return True

    def _fault_handler(self) -> faults.FaultHandler:
        """The FaultHandler, made on first use outside the lock (its threads take ~1 ms)."""
        with self._lock:
            if self._faults is not None:
                return self._faults
        handler = faults.FaultHandler(self.config.fault_timeout)
        with self._lock:
            if self._faults is None:
                self._faults, handler = handler, None
            made = self._faults
        if handler is not None:  # another RegisterFaults made one meanwhile
            handler.stop()
        return made

    # ------------------------------------------------------------------ refresh

    def refresh(self, attachment) -> types_pb2.SegmentInfo:
        """Bring ``attachment``'s replica to the newest published version (a replica with
        a live writer here holds newer bytes than any version: nothing to fetch)."""
        replica = attachment.segment
        self.bring_current(replica, writer=None)
        with replica.lock:
            return replica.info

    def bring_current(self, replica: Replica, writer=None) -> bytes | None:
        """Fetch the chunks of ``replica`` that differ from the home's; the home's hashes.

        ``writer``: the "rw" attachment this is done for (its attach), else None (a
        reader's refresh), which changes nothing -- None returned -- while a writer
        holds the replica: its chunks differ from the home's because the writer
        stored to them, and fetching the home's bytes over them would lose those
        stores (sync would then publish the home's old bytes as the new version).
        Decided inside the gate: a writer's attach makes the replica current in the
        gate too, before its client can store, so a refresh either ends before that
        or sees the writer."""
        address = self.home_address(replica.info)
        timeout = self.config.rpc_timeout + replica.size / _STREAM_RATE
        started = time.perf_counter()
        with replica.gate.passage(timeout, f"refresh of segment {replica.name}"):
            with replica.lock:
                if replica.writer is not writer:
                    if writer is None:
                        return None
                    raise Fenced(f"the writer lock of segment {replica.name} ended during "
                                 "its attach")
            version, remote = self.peers.chunk_hashes(address, replica.name, replica.id, CHUNK)
            fill = replica.fill
            with memoryview(replica.memory.mapping) as raw, raw.cast("B") as view:
                stale = stale_runs(view, remote, fill.present_map() if fill is not None else None)
                if stale and replica.relay is not None:  # its bytes change: relay no more
                    replica.relay.quiesce(timeout)
                for offset, length in stale:
                    with view[offset:offset + length] as part:
                        self.peers.read_pages_into(
                            address, replica.name, replica.id, part,
                            self.config.rpc_timeout + length / _STREAM_RATE, offset)
            with replica.lock:
                replica.adopt_version_locked(version)
        metrics.observe_since(metrics.FETCH_REFRESH, started)
        if stale:
            log.info("refresh of %s: fetched %d bytes of changed chunks from %s, now version %d",
                     replica.name, sum(length for _, length in stale), replica.info.home, version)
        return remote

    # ------------------------------------------------------------------ room and retirement

    def make_room(self, size: int, name: str) -> list:
        """Reserve ``size`` bytes for ``name``, evicting unattached replicas (oldest use
        first) when short; returns what to ``release_spare`` outside every lock
        (evicted replicas, trimmed warm memory). CapacityExceeded if it cannot fit."""
        evicted: list = []
        try:
            with self._lock:
                if size > self.store.free:
                    idle = sorted((r for r in self._current.values() if r.attachments == 0),
                                  key=lambda r: r.checked)
                    if size <= self.store.free + sum(r.size for r in idle):
                        for replica in idle:
                            if size <= self.store.free:
                                break
                            if self._retire_locked(replica):
                                evicted.append(replica)
                self.store.reserve(size, name)
        except BaseException:
            self.release_spare(evicted)
            raise
        return evicted + self.pool.trim()

    def release_spare(self, spare: list, *, later: bool = False) -> None:
        """Give back what ``make_room`` took (evicted replicas, trimmed warm memory): at
        once, for a caller about to allocate fresh pages in the room made, else
        (``later``) by the warm pool's thread between transfers."""
        for item in spare:
            if isinstance(item, Replica):
                log.info("evicted the replica of %s (%d bytes) to make room", item.name,
                         item.size)
                self._release(item, later=later)
            elif later:
                self.pool.release_later([item])
            else:
                item.release()

    def retire_name(self, name: str, lost: str | None = None) -> None:
        """Retire this node's replica of ``name`` (``lost``: as for ``retire``); callers
        pass why when the record is gone or deleting, or the home is gone."""
        with self._lock:
            replica = self._current.get(name)
        if replica is not None:
            self.retire(replica, lost)

    def retire(self, replica: Replica, lost: str | None = None, *,
               successor: bool = False) -> None:
        """Stop handing out ``replica``; freed now if unattached, else at its last detach.

        ``lost``: why the home's bytes of it are gone (deleted, home gone). A lazy
        replica's missing pages are then never fetched: the faults of readers still
        attached are poisoned (SIGBUS) at once. Without it (a newer version, an
        eviction, a writer leaving) they keep being fetched from the home.
        ``successor``: the caller fetches its successor now (no memory is prepared for
        one, see ``_release_retired``).
        """
        fill = replica.fill
        if lost and fill is not None and fill.lose(lost):
            log.warning("replica of %s (id %d): pages not fetched yet are lost: %s",
                        replica.name, replica.id, lost)
        with self._lock:
            free = self._retire_locked(replica)
        if free and successor:
            self._release(replica)
        elif free:
            self._release_retired(replica)

    def drop(self, name: str, segment_id: int) -> bool:
        """Segment ``segment_id`` is gone (Node.ReleaseReplica): retire this node's replica
        of ``name`` if it is of that incarnation or an older one, and discard a fetch
        of it in flight; True if a replica was retired."""
        with self._lock:
            self._dropped[segment_id] = None
            while len(self._dropped) > _MAX_DROPPED:
                self._dropped.popitem(last=False)
            replica = self._current.get(name)
        if replica is None or replica.id > segment_id:
            return False
        log.info("dropping the replica of %s (id %d): the segment is gone", name, replica.id)
        self.retire(replica, lost=f"segment {name} (id {replica.id}) was deleted")
        return True

    def _pages_lost(self, replica: Replica, exc: lazy.PagesLost) -> None:
        """A chunk fetch of ``replica`` found the home's bytes gone (its fill is lost
        already): retire it, and when its home is not registered any more, every
        replica of that home (their segments are gone with it)."""
        log.warning("replica of %s (id %d): pages not fetched yet are lost: %s", replica.name,
                    replica.id, exc)
        victims = [replica]
        if exc.home_gone:  # but a segment with backups lives on at a promoted one
            with self._lock:
                victims += [r for r in self._current.values()
                            if r.info.home == replica.info.home and r is not replica
                            and not r.info.backups]
        for victim in victims:
            self.retire(victim, lost=str(exc))

    def _retire_locked(self, replica: Replica) -> bool:
        """``retire`` with the table lock held; True when the caller must ``_release`` it."""
        if self._current.get(replica.name) is replica:
            del self._current[replica.name]
        with replica.lock:
            if replica.state is ReplicaState.CURRENT:
                replica.move(ReplicaState.RETIRED)
            free = replica.state is ReplicaState.RETIRED and replica.attachments <= 0
            if free:
                replica.move(ReplicaState.FREED)
        if replica.relay is not None:  # a later fetcher asks the home again
            replica.relay.close()
        if free:
            self._held.discard(replica)
            self.store.drop(replica.size)
        return free

    def _free_if_idle(self, replica: Replica) -> None:
        with self._lock:
            with replica.lock:
                free = replica.state is ReplicaState.RETIRED and replica.attachments <= 0
            if free:
                free = self._retire_locked(replica)
        if free:
            self._release_retired(replica)

    def _release_retired(self, replica: Replica) -> None:
        """Free a retired replica (deleted, replaced by a newer version, its last reader
        gone) and have the warm pool prepare memory of its size: its successor (the
        next round or version of that dataset) is likely to come. Not for evictions:
        those make room for something else."""
        self._release(replica)
        self.pool.want(replica.size)

    def _release(self, replica: Replica, *, later: bool = True) -> None:
        """Give back the memory of a FREED replica, by default by the warm pool's thread
        between transfers (nothing here waits for its pages); its report goes (no copy
        held here)."""
        _release(replica, self.pool.release_later if later else None)
        self.reporter.mark(replica)

    def report_of(self, replica: Replica) -> tuple[int, bool]:
        """(local attachments, whether a copy is held) of ``replica``'s id (a retired
        replica and its successor share the id)."""
        with self._lock:
            same = [r for r in self._held if r.id == replica.id]
            return sum(r.attachments for r in same), bool(same)

    def all(self) -> list[Replica]:
        with self._lock:
            return list(self._held)

    def usage(self) -> tuple[int, int]:
        """(replicas held, their bytes): the part of the store's usage that is replicas
        (retired ones still attached included, as in ``memory_used``)."""
        with self._lock:
            return len(self._held), sum(replica.size for replica in self._held)

    def recheck_all(self) -> None:
        """Check every replica at the next ``recheck_stale`` (after registering again:
        notices of deletes made meanwhile may have missed this node)."""
        with self._lock:
            self._recheck_all = True

    def recheck_stale(self) -> None:
        """Retire replicas whose segment is gone (the safety net behind ReleaseReplica):
        ask the coordinator about those whose record was not read for a while."""
        horizon = time.monotonic() - RECHECK_AGE
        with self._lock:
            everything, self._recheck_all = self._recheck_all, False
            due = sorted((r for r in self._current.values() if everything or r.checked < horizon),
                         key=lambda r: r.checked)[:_RECHECK_MAX]
        for first in range(0, len(due), _RECHECK_BATCH):
            batch = due[first:first + _RECHECK_BATCH]
            try:
                gone = set(self.coordinator.check_segments([(r.name, r.id) for r in batch]))
            except VasError as exc:
                log.warning("cannot check the records of %d replicas: %s", len(batch), exc)
                if everything:
                    self.recheck_all()
                return
            now = time.monotonic()
            for replica in batch:
                with replica.lock:
                    replica.checked = now
                if replica.id in gone:
                    # Gone, or deleting: then the home keeps the pages for the attachments
                    # it waits for, so readers attached here go on fetching them (and a
                    # fetch from a home that freed them is refused: PagesLost).
                    log.info("retiring the replica of %s (id %d): its segment is gone or "
                             "being deleted", replica.name, replica.id)
                    self.retire(replica)

    def home_address(self, info: types_pb2.SegmentInfo) -> str:
        """The gRPC address of the home of ``info``; Unavailable if it is not registered."""
        address = self._node_address(info.home)
        if address is None:
            raise Unavailable(f"home node {info.home} of segment {info.name} is not "
                              "registered (down?)")
        return address

    def stop(self) -> None:
        if self._faults is not None:
            self._faults.stop()
        self.homes.close()

    def free_all(self) -> None:
        """Free every replica (at shutdown, after the sessions are closed)."""
        for replica in self.all():
            with self._lock:
                self._current.pop(replica.name, None)
                with replica.lock:
                    if replica.state is ReplicaState.CURRENT:
                        replica.move(ReplicaState.RETIRED)
                    if replica.state is ReplicaState.FREED:
                        continue
                    replica.move(ReplicaState.FREED)
                self._held.discard(replica)
                self.store.drop(replica.size)
            _release(replica)  # no report: deregistering removes them all


def _release(replica: Replica, later: Callable[[list], None] | None = None) -> None:
    """Give back the memory of a FREED replica (after its fetches in flight, which write
    through the reader's own dup of the memfd): at once, or handed to ``later``."""
    fill, replica.fill = replica.fill, None
    if fill is not None:
        fill.close()
    free = replica.memory.release if later is None else (lambda: later([replica.memory]))
    if replica.relay is not None:  # after the last relay request served from it
        replica.relay.release(free)
    else:
        free()
