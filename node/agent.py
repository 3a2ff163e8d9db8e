"""The agent's policy: what each local request and each cluster event does.

One ``Agent`` per process. It owns the ``Store`` of home segments and replicas
(copies of segments homed elsewhere, see "Data plane" in docs/ARCHITECTURE.md),
the sessions (one per local connection), the attachments and writer locks, and
five background threads:

- heartbeat: ``Heartbeat`` every ttl/3 (re-registers on NOT_FOUND), retries of
  ``FinishDelete`` calls that failed, and a lazy re-read of a few held records
  and replicas not read for a while (the safety net for a lost notification);
- expiry: one timer for the segments created with a ttl: at expiry it re-reads
  the record (etcd removes it with its lease) and frees the segment once gone;
- reporter: ``ReportAttachments``, debounced, so attach/detach never wait for it;
- writer keepalive: ``RenewWriter`` every writer_ttl/3 for each live "rw" attachment;
- warm pool: prepares fresh replica memory after a fetch (node/pool.py).

The home agent is the authority for the cached records of its segments; it does
not watch the coordinator (streaming every change to every agent costs each
create and delete about a millisecond of CPU). Changes reach it instead by:
its own requests; ``Node.ReleaseSegment`` (a delete made through another agent);
``Node.SegmentChanged`` (a chmod/chown made through another agent: re-read the
record); its expiry timer (ttl); and the lazy re-read in the heartbeat thread.

Locking: one lock (``_lock``) guards the store, sessions, attachments and the
report queue. It is held only for dictionary work; every gRPC call and every
slow syscall (fallocate, punching out pages) happens outside it. That keeps a
local "r" attach of a home segment to a few dictionary operations and one
``dup``: no coordinator round trip.

Request handlers take ``(session, request, response)``, fill ``response`` and
return the fds to pass with it (the caller closes them after sending); they
raise ``vas.errors`` exceptions for the caller to put into the response.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import os
import select
import threading
import time

import grpc

from vas import _native, validate
from vas.core.fetch import FetchMode, decide as decide_fetch
from vas.errors import (AlreadyExists, Busy, Fenced, InvalidArgument, NotFound,
                        PermissionDenied, Unavailable, VasError)
from vas.node import bulk, lazy
from vas.node import store as store_mod
from vas.node.clients import CoordinatorClient, PeerClients
from vas.node.config import NodeConfig
from vas.node.pool import Warm, WarmPool, release_all
from vas.node.publish import PublishMixin
from vas.node.store import Segment, Store
from vas.proto import LOCAL_PROTOCOL, coordinator_pb2, local_pb2, types_pb2

log = logging.getLogger(__name__)

#: Ids of home segments changed while a create may still be in flight (see ``_tombstones``).
_MAX_TOMBSTONES = 4096
#: What ``_tombstones`` remembers of an id: it was marked deleting (free it and
#: call FinishDelete), or its record changed (re-read it).
_DELETING, _CHANGED = "deleting", "changed"
#: Seconds after a ttl segment's expiry before its record is re-read (etcd checks
#: for expired leases every 500 ms), and the longest pause between re-reads of a
#: record that outlived its expiry.
_EXPIRY_MARGIN = 0.2
_EXPIRY_RETRY_MAX = 5.0
#: The heartbeat thread re-reads at most this many held records per beat, those
#: not read for ``_RECHECK_AGE`` seconds (heals a lost SegmentChanged/ReleaseSegment).
_RECHECK_BATCH = 8
_RECHECK_AGE = 60.0
#: Longest pause between retries of a failed background call, seconds.
_MAX_BACKOFF = 5.0
#: Replicas up to this size are fetched with one ReadPages stream (no bulk
#: connections to set up).
_SMALL_FETCH = 4 << 20
#: gRPC fallback streams are given this many bytes per second (on top of the rpc
#: timeout) before their deadline.
_FALLBACK_RATE = 50e6
#: Deadline of the clean-up calls made while shutting down (a dead coordinator must
#: not hold up the exit: leases expire on their own), seconds.
_SHUTDOWN_RPC_TIMEOUT = 2.0


class Unimplemented(VasError):
    """A request type this agent does not know (a newer client)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Session:
    """The state of one local connection: who is calling and what it holds."""

    __slots__ = ("uid", "gid", "pid", "caller", "attachments", "last_seen", "busy", "sock")

    def __init__(self, uid: int, gid: int, pid: int, node_id: str):
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.caller = types_pb2.Caller(uid=uid, gid=gid, pid=pid, node=node_id)
        self.attachments: dict[int, Attachment] = {}
        # Liveness for writer leases: when the client last sent a request, and
        # whether one is being served now (a long attach or wait proves it alive).
        self.last_seen = time.monotonic()
        self.busy = False
        self.sock = None  # the connection (set by the local server), for hung_up()

    def alive_within(self, seconds: float) -> bool:
        """Whether the client showed it was alive in the last ``seconds``."""
        return self.busy or time.monotonic() - self.last_seen <= seconds

    def hung_up(self) -> bool:
        """Whether the client closed its end (checked without reading from it)."""
        if self.sock is None:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _, events in poller.poll(0))

    def __repr__(self) -> str:
        return f"<Session pid={self.pid} uid={self.uid} gid={self.gid}>"


class Attachment:
    """One local attachment; "rw" ones carry the writer lock's token and lease."""

    __slots__ = ("id", "segment", "mode", "session", "token", "lease_id", "fenced", "uffd")

    def __init__(self, attachment_id: int, segment: Segment, mode: str, session: Session,
                 token: int = 0, lease_id: int = 0):
        self.id = attachment_id
        self.segment = segment
        self.mode = mode
        self.session = session
        self.token = token
        self.lease_id = lease_id
        self.fenced = False
        self.uffd = -1  # the client's userfaultfd of a lazy attachment (RegisterFaults)


class Agent(PublishMixin):
    """Policy of one node agent (see the module docstring)."""

    def __init__(self, config: NodeConfig, node_id: str, address: str, socket_path: str,
                 coordinator: CoordinatorClient | None = None, peers: PeerClients | None = None):
        self.config = config
        self.node_id = node_id
        self.address = address
        self.socket_path = socket_path
        self.coordinator = coordinator or CoordinatorClient(config.coordinator, config.rpc_timeout)
        self.peers = peers or PeerClients(config.rpc_timeout)
        self.store = Store(config.memory, f"node {node_id}")
        #: host:port of this agent's bulk listener (set by the server before serving).
        self.bulk_address = ""

        self._lock = threading.Lock()
        self._replicas: dict[str, Segment] = {}            # name -> current replica
        self._fetching: dict[str, threading.Event] = {}    # name -> set when its fetch ends
        self._pool = WarmPool(self.store, self._lock)
        self._faults: lazy.FaultHandler | None = None      # started by the first RegisterFaults
        self._homes = lazy.Homes(self._node_address, self.peers.open_bulk, config.rpc_timeout)
        self._attachment_ids = itertools.count(1)
        self._writers: dict[int, Attachment] = {}          # attachment id -> "rw" attachment
        self._dirty: dict[int, Segment] = {}               # segment id -> segment to report
        # Creates between their CreateSegment call and holding the segment; while
        # any is in flight, news about ids not held yet are kept in _tombstones:
        # id -> (_DELETING | _CHANGED, name), applied when the create
        # finishes; the rest is settled when no create is in flight any more.
        self._creating = 0
        self._tombstones: collections.OrderedDict[int, tuple[str, str]] = \
            collections.OrderedDict()
        self._unfinished: dict[int, str] = {}              # FinishDelete to retry: id -> name
        self._freeing: dict[int, threading.Event] = {}     # id -> set once freed and finished

        self._lease_id = 0
        self._node_ttl = config.heartbeat_ttl
        self._stop = threading.Event()
        self._report_wake = threading.Event()
        # Re-reads of records are serialized, so a later read is never overwritten
        # by an earlier one.
        self._refresh_lock = threading.Lock()
        # The expiry timer: heap of (monotonic deadline, segment id, retries so far).
        self._expiry_cv = threading.Condition(threading.Lock())
        self._expiry: list[tuple[float, int, int]] = []
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def node_info(self) -> types_pb2.NodeInfo:
        with self._lock:
            used, count = self.store.used, len(self.store)
        return types_pb2.NodeInfo(
            id=self.node_id, address=self.address, socket=self.socket_path,
            memory_total=self.store.capacity, memory_used=used, segments=count,
            state=types_pb2.NODE_STATE_READY)

    def register(self, stop: threading.Event | None = None) -> bool:
        """Register with the coordinator, retrying until it answers or ``stop`` is set."""
        backoff = 0.1
        while True:
            try:
                self._register_once()
                return True
            except VasError as exc:
                log.warning("cannot register node %s with coordinator %s: %s; retrying",
                            self.node_id, self.coordinator.target, exc)
            if (stop or self._stop).wait(backoff):
                return False
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _register_once(self) -> None:
        response = self.coordinator.call("RegisterNode", coordinator_pb2.RegisterNodeRequest(
            node=self.node_info(), ttl_seconds=self.config.heartbeat_ttl))
        with self._lock:
            self._lease_id = response.lease_id
            self._node_ttl = response.ttl_seconds or self.config.heartbeat_ttl
            # Reports live under the node lease: a new lease starts with none.
            for segment in self.store:
                if segment.attachments:
                    self._dirty[segment.id] = segment
        self._report_wake.set()
        log.info("registered node %s (lease %x, ttl %ds)", self.node_id, response.lease_id,
                 self._node_ttl)

    def start(self) -> None:
        """Start the background threads (after ``register``)."""
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._expiry_loop, "expiry"),
                             (self._report_loop, "reporter"),
                             (self._writer_keepalive_loop, "writer-keepalive"),
                             (self._pool.run, "warm-pool")):
            thread = threading.Thread(target=target, name=f"vas-node-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background threads (the last attachment reports are dropped:
        deregistering removes them anyway)."""
        self._stop.set()
        self._report_wake.set()
        with self._expiry_cv:
            self._expiry_cv.notify()
        with self._lock:
            pooled = self._pool.stop_locked()
        release_all(pooled)
        if self._faults is not None:
            self._faults.stop()
        self._homes.close()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def deregister(self) -> None:
        """Revoke the node lease: the node record and its attachment reports vanish."""
        with self._lock:
            lease = self._lease_id
        if not lease:
            return
        try:
            self.coordinator.call("DeregisterNode", coordinator_pb2.DeregisterNodeRequest(
                node_id=self.node_id, lease_id=lease), self._cleanup_timeout())
            log.info("deregistered node %s", self.node_id)
        except VasError as exc:
            log.warning("cannot deregister node %s: %s (its lease expires on its own)",
                        self.node_id, exc)

    def free_all(self) -> None:
        """Free every held segment (at shutdown, after the sessions are closed)."""
        with self._lock:
            segments = list(self.store) + list(self.store.replicas)
            for segment in segments:
                self.store.remove(segment)
            self._replicas.clear()
        for segment in segments:
            _release(segment)

    def close(self) -> None:
        self.coordinator.close()
        self.peers.close()

    # ------------------------------------------------------------------ sessions

    def open_session(self, uid: int, gid: int, pid: int) -> Session:
        return Session(uid, gid, pid, self.node_id)

    def close_session(self, session: Session) -> None:
        """The connection is gone (EOF): release all its attachments and writer locks now."""
        with self._lock:
            attachments = list(session.attachments.values())
            session.attachments.clear()
            actions = [self._detach_locked(attachment) for attachment in attachments]
        if attachments:
            log.debug("%r closed: released %d attachments", session, len(attachments))
            self._report_wake.set()
        for action in actions:
            self._after_detach(*action)

    # ------------------------------------------------------------------ local requests

    def hello(self, session: Session, request: local_pb2.HelloRequest,
              response: local_pb2.LocalResponse) -> list[int]:
        if request.protocol != LOCAL_PROTOCOL:
            raise InvalidArgument(f"unsupported local protocol {request.protocol}: "
                                  f"this agent speaks {LOCAL_PROTOCOL}")
        response.hello.protocol = LOCAL_PROTOCOL
        response.hello.node.CopyFrom(self.node_info())
        response.hello.caller.CopyFrom(session.caller)
        return []

    def create(self, session: Session, request: local_pb2.CreateRequest,
               response: local_pb2.LocalResponse) -> list[int]:
        name = validate.check_name(request.name)
        size = validate.check_size(request.size)
        mode = validate.check_mode(request.mode)
        ttl = request.ttl_seconds
        if not math.isfinite(ttl) or ttl < 0:
            raise InvalidArgument(f"invalid ttl {ttl!r}: must be a finite number of seconds >= 0")
        with self._lock:
            existing = self.store.by_name.get(name)
            if existing is not None:
                if not request.exist_ok:
                    raise AlreadyExists(f"segment {name} already exists")
                response.segment.CopyFrom(existing.info)
                return []
            spare = self._reserve_locked(size, name) + self._pool.trim_locked()
        self._release_spare(spare)
        try:
            fd, ro_fd = store_mod.allocate(name, size)
        except BaseException:
            with self._lock:
                self.store.unreserve(size)
            raise
        with self._lock:
            self._creating += 1
        started = time.monotonic()
        try:
            info = self.coordinator.call("CreateSegment", coordinator_pb2.CreateSegmentRequest(
                caller=session.caller, name=name, size=size, mode=mode, home=self.node_id,
                replicas=request.replicas, ttl_seconds=ttl))
        except BaseException as exc:
            with self._lock:
                self.store.unreserve(size)
                leftover = self._create_done_locked()
            store_mod.release(fd, ro_fd, size)
            self._settle(leftover)
            if isinstance(exc, AlreadyExists) and request.exist_ok:
                response.segment.CopyFrom(self.coordinator.call(
                    "GetSegment", coordinator_pb2.GetSegmentRequest(name=name)))
                return []
            raise
        if info.size != size:  # the coordinator rounds like we do; never hand out a short fd
            log.error("coordinator created %s with size %d, not %d", name, info.size, size)
        segment = Segment(info, fd, ro_fd)
        with self._lock:
            self.store.add(segment)
            news = self._tombstones.pop(info.id, None)
            leftover = self._create_done_locked()
        if info.expires:
            # The lease was granted after ``started``: it cannot expire before this.
            self._arm_expiry(info.id, started + (info.expires - info.created) + _EXPIRY_MARGIN)
        if news is not None:  # changed elsewhere while we were still creating it
            if news[0] == _CHANGED:
                try:
                    self._recheck(segment)
                except VasError as exc:  # the heartbeat's re-reads catch up later
                    log.warning("cannot re-read segment %s: %s", name, exc)
            else:
                log.info("segment %s (id %d) was deleted during its create", name, info.id)
                self._begin_delete(segment, finish=news[0] == _DELETING, force=True)
        self._settle(leftover)
        response.segment.CopyFrom(info)
        return []

    def _create_done_locked(self) -> list[tuple[int, str]]:
        """A create left flight; when it was the last, drop the tombstones and return
        the ids (with names) whose FinishDelete is still due (see ``_settle``)."""
        self._creating -= 1
        if self._creating or not self._tombstones:
            return []
        leftover = [(segment_id, name) for segment_id, (news, name) in self._tombstones.items()
                    if news == _DELETING]
        self._tombstones.clear()
        return leftover

    def _settle(self, leftover: list[tuple[int, str]]) -> None:
        """Finish deletes of ids homed here that no create turned out to hold."""
        for segment_id, name in leftover:
            log.info("segment %s (id %d) is homed here but not held; finishing its delete",
                     name, segment_id)
            self._finish_delete(name, segment_id)

    def attach(self, session: Session, request: local_pb2.AttachRequest,
               response: local_pb2.LocalResponse) -> list[int]:
        name, mode = request.name, request.mode
        if mode != "r" and mode != "rw":
            validate.check_attach_mode(mode)
        if request.fetch:
            validate.check_fetch(request.fetch)
        with self._lock:
            # Held names were checked at create; others are checked below.
            segment = self.store.by_name.get(name)
            if segment is not None:
                if segment.info.state == types_pb2.SEGMENT_STATE_DELETING:
                    raise NotFound(f"segment {name} is being deleted")
                self._check_access(segment.info, session, mode)
                if mode == "r":
                    # The hot path: no coordinator call, a few dict operations and a dup.
                    fd = os.dup(segment.ro_fd)
                    attachment = self._add_attachment_locked(session, segment, "r")
                    body = response.attach
                    body.segment.CopyFrom(segment.info)
                    body.attachment_id = attachment.id
                    body.fetch = FetchMode.HOME.to_proto()
                    return [fd]
                if segment.writer is not None:
                    raise Busy(f'segment {name} is already attached "rw" on node {self.node_id}')
                segment.writer = Segment.PENDING
        if segment is None:
            # Decided once (vas/core/fetch.py); a remote "rw" attach is fetched whole.
            how = decide_fetch("eager" if mode == "rw" else request.fetch or "lazy",
                               home=False, support=request.fault_support)
            fds = self._attach_elsewhere(session, validate.check_name(name), mode,
                                         "lazy" if how is FetchMode.LAZY else "eager", response)
            if how is not FetchMode.LAZY:  # a complete replica: say why it was fetched whole
                response.attach.fetch = how.to_proto()
            return fds
        fds = self._attach_writer(session, segment, response)
        response.attach.fetch = FetchMode.HOME.to_proto()
        return fds

    def _attach_elsewhere(self, session: Session, name: str, mode: str, fetch: str,
                          response: local_pb2.LocalResponse) -> list[int]:
        """Attach of a name this agent is not home for: a replica of the home's pages.

        Every such attach reads the record (GetSegment): it decides access with
        the same mode-bit rules and tells whether the replica is still current.
        """
        try:
            info = self.coordinator.call("GetSegment", coordinator_pb2.GetSegmentRequest(name=name))
        except NotFound:
            self._retire_replica(name)
            raise
        if info.state == types_pb2.SEGMENT_STATE_DELETING:
            self._retire_replica(name)
            raise NotFound(f"segment {name} is being deleted")
        self._check_access(info, session, mode)
        if info.home == self.node_id:
            raise Unavailable(f"segment {name} (id {info.id}) is homed on node {self.node_id} "
                              "but its memory is not held here")
        if mode == "rw":
            return self._attach_remote_writer(session, info, response)
        return self._attach_replica(session, info, fetch, response)

    def _attach_remote_writer(self, session: Session, info: types_pb2.SegmentInfo,
                              response: local_pb2.LocalResponse) -> list[int]:
        """The "rw" attach of a segment homed elsewhere: take the writer lock, then make
        this node's replica complete and equal to the home's bytes (the base the next
        sync() diffs against) and map it writable."""
        lock = self._acquire_writer(session, info.name)
        try:
            fds = self._attach_replica(session, info, "eager", response, lock)
        except BaseException:
            self._release_writer(info.name, lock.token, lock.lease_id)
            raise
        attachment_id = response.attach.attachment_id
        try:
            with self._lock:
                replica = self._attachment_locked(session, attachment_id).segment
            replica.synced_hashes = self._bring_current(replica)
            with self._lock:
                response.attach.segment.CopyFrom(replica.info)
        except BaseException:
            self._drop_attachment(session, attachment_id)
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _acquire_writer(self, session: Session, name: str) -> coordinator_pb2.AcquireWriterResponse:
        return self.coordinator.call("AcquireWriter", coordinator_pb2.AcquireWriterRequest(
            caller=session.caller, name=name, ttl_seconds=self.config.writer_ttl))

    # ------------------------------------------------------------------ replicas

    def _attach_replica(self, session: Session, info: types_pb2.SegmentInfo, fetch: str,
                        response: local_pb2.LocalResponse,
                        writer: coordinator_pb2.AcquireWriterResponse | None = None
                        ) -> list[int]:
        """Hand out this node's replica of ``info``, fetching it first unless it is current
        (writable, as the attachment holding ``writer``'s lock, when given).

        One fetch per name at a time: a concurrent attach waits for it and then
        reuses its replica.
        """
        deadline = time.monotonic() + self.config.rpc_timeout + info.size / _FALLBACK_RATE
        while True:
            with self._lock:
                replica = self._replicas.get(info.name)
                fill = None
                if (replica is not None and replica.id == info.id
                        and replica.info.version >= info.version):
                    fill = replica.lazy
                    if fill is None or fetch == "lazy":
                        return self._hand_out_replica_locked(session, replica, info, response,
                                                             writer)
                pending = self._fetching.get(info.name)
                if pending is None and fill is None:
                    stale = self._retire_locked(replica) if replica is not None else None
                    done = self._fetching[info.name] = threading.Event()
                    break
            if fill is not None and pending is None:  # eager attach of a lazy replica
                self._complete(replica, fill)
            elif not pending.wait(max(0.0, deadline - time.monotonic())):
                raise Unavailable(f"timed out waiting for the fetch of segment {info.name}")
        try:
            if stale is not None:
                self._free(stale)
            replica = self._fetch_replica(info, fetch)
            with self._lock:
                self._replicas[info.name] = replica
                self.store.add_replica(replica)
                return self._hand_out_replica_locked(session, replica, info, response, writer)
        finally:
            with self._lock:
                del self._fetching[info.name]
            done.set()

    def _hand_out_replica_locked(self, session: Session, replica: Segment,
                                 info: types_pb2.SegmentInfo, response: local_pb2.LocalResponse,
                                 writer: coordinator_pb2.AcquireWriterResponse | None = None
                                 ) -> list[int]:
        if writer is not None and replica.writer is not None:
            raise Busy(f'segment {info.name} is already attached "rw" on node {self.node_id}')
        replica.checked = time.monotonic()
        body = response.attach
        body.segment.CopyFrom(info)
        if writer is None:
            fd = os.dup(replica.ro_fd)
            attachment = self._add_attachment_locked(session, replica, "r")
        else:
            fd = os.dup(replica.fd)
            attachment = self._add_writer_locked(session, replica, writer, body)
        body.attachment_id = attachment.id
        # A lazy attach of a replica that is complete already has nothing to fault in.
        body.fetch = (FetchMode.LAZY if replica.lazy is not None else FetchMode.EAGER).to_proto()
        return [fd]

    def _add_writer_locked(self, session: Session, segment: Segment,
                           lock: coordinator_pb2.AcquireWriterResponse,
                           body: local_pb2.AttachResponse) -> Attachment:
        """Register the "rw" attachment holding ``lock``; fills the writer fields of ``body``."""
        attachment = self._add_attachment_locked(session, segment, "rw", lock.token,
                                                 lock.lease_id)
        segment.writer = attachment
        self._writers[attachment.id] = attachment
        body.writable = True
        body.token = lock.token
        body.keepalive_seconds = self.config.writer_ttl / 3
        return attachment

    def _complete(self, replica: Segment, fill: lazy.LazyFill) -> None:
        """Fetch every missing chunk of a lazy replica; it is then an eager one."""
        fill.ensure(0, replica.size)
        replica.lazy = None
        fill.close()  # every chunk is present: its channel and fd are not needed

    def _fetch_replica(self, info: types_pb2.SegmentInfo, fetch: str) -> Segment:
        """A new replica holding every byte of ``info`` (capacity reserved and held by the
        caller's ``add_replica``); on any failure nothing is left behind. For
        fetch="lazy" it holds none yet: chunks come on demand (node/lazy.py)."""
        if fetch == "lazy":
            return self._lazy_replica(info)
        with self._lock:
            spare = self._reserve_locked(info.size, info.name)
            warm = self._pool.take_locked(info.size)
            spare += self._pool.trim_locked()
        self._release_spare(spare)
        try:
            address = self._home_address(info)
            if warm is None:
                warm = Warm(info.size, populate=False)
            started = time.monotonic()
            self._transfer(address, info, warm)
        except BaseException:
            with self._lock:
                self.store.unreserve(info.size)
            if warm is not None:
                release_all([warm])
            raise
        finally:
            with self._lock:  # prepared after the transfer, not competing with it for CPU
                unwanted = self._pool.want_locked(info.size)
            release_all(unwanted)
        elapsed = time.monotonic() - started
        log.info("replica of %s (id %d, version %d): fetched %d bytes from %s in %.3f s "
                 "(%.2f GB/s, %s memory)", info.name, info.id, info.version, info.size,
                 info.home, elapsed, info.size / max(elapsed, 1e-9) / 1e9,
                 "warm" if warm.populated else "cold")
        replica = Segment(info, warm.fd, warm.ro_fd)
        replica.replica = True
        replica.mapping = warm.mapping
        return replica

    def _lazy_replica(self, info: types_pb2.SegmentInfo) -> Segment:
        """A replica of ``info`` whose chunks are fetched on first touch or prefetch.

        Its memfd is sparse (not from the warm pool, whose pages are allocated):
        a client's read of a missing page must raise a userfault. Nothing here
        costs per byte, and the home is not called: its state in the record
        says it is registered, and its address and bulk channel come from
        ``self._homes`` (looked up in the background on a first attach).
        """
        if info.state != types_pb2.SEGMENT_STATE_READY:
            raise Unavailable(f"home node {info.home} of segment {info.name} is not "
                              "registered (down?)")
        with self._lock:
            spare = self._reserve_locked(info.size, info.name)
            spare += self._pool.trim_locked()
        fd = ro_fd = -1
        try:
            fd, ro_fd = store_mod.allocate("replica", info.size, reserve=False)
            mapping = _native.mmap(fd, info.size, writable=True)
        except BaseException:
            with self._lock:
                self.store.unreserve(info.size)
            if fd >= 0:
                store_mod.release(fd, ro_fd, info.size)
            self._release_spare(spare)
            raise
        replica = Segment(info, fd, ro_fd)
        replica.replica = True
        replica.mapping = mapping
        reader = self._chunk_fetcher(info, replica)
        replica.lazy = lazy.LazyFill(info.size, reader)
        threading.Thread(target=self._after_lazy_attach, args=(reader, spare),
                         name="vas-node-lazy-attach", daemon=True).start()
        log.info("replica of %s (id %d, version %d, %d bytes) from %s: lazy", info.name,
                 info.id, info.version, info.size, info.home)
        return replica

    def _after_lazy_attach(self, reader: lazy.HomeReader, spare: list) -> None:
        """The slow parts of a lazy attach, off its path (one thread: each start costs
        ~0.4 ms there): the home's bulk channel before the first fault, then, at
        SCHED_IDLE, the room taken from evicted replicas and the warm pool (punching
        out a GiB takes ~0.25-0.3 s; a lazy replica takes its memory only as chunks
        arrive)."""
        reader.prepare()
        try:  # this thread only: resolving faults comes first
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass
        self._release_spare(spare)

    def _start_faults(self) -> None:
        """Create the FaultHandler outside the lock (starting its threads takes ~1 ms)."""
        with self._lock:
            if self._faults is not None:
                return
        handler = lazy.FaultHandler()
        with self._lock:
            if self._faults is None:
                self._faults, handler = handler, None
        if handler is not None:  # another RegisterFaults made one meanwhile
            handler.stop()

    def _chunk_fetcher(self, info: types_pb2.SegmentInfo, replica: Segment) -> lazy.HomeReader:
        """``fetch(offset, length)`` for a LazyFill: chunk requests on the home's bulk
        channel (``lazy.HomeReader``), ReadPages into the replica's mapping as the
        fallback."""
        def read_pages(address: str, offset: int, length: int) -> None:
            timeout = self.config.rpc_timeout + length / _FALLBACK_RATE
            with memoryview(replica.mapping) as raw, raw.cast("B") as view, \
                    view[offset:offset + length] as part:
                self.peers.read_pages_into(address, info.name, info.id, part, timeout, offset)
        return lazy.HomeReader(self._homes, info.home, info.name, info.id, replica.fd,
                               read_pages)

    def _transfer(self, address: str, info: types_pb2.SegmentInfo, warm: Warm) -> None:
        """Copy the home's bytes into ``warm``: ReadPages for small segments, else the
        bulk channel, falling back to ReadPages when the bulk connections fail."""
        fallback_timeout = self.config.rpc_timeout + info.size / _FALLBACK_RATE
        with memoryview(warm.mapping) as raw, raw.cast("B") as view:
            if info.size > _SMALL_FETCH:
                opened = self.peers.open_bulk(address, info.name, info.id)
                if opened.size != info.size:
                    raise Unavailable(f"home {info.home} holds segment {info.name} with "
                                      f"{opened.size} bytes, not {info.size}")
                try:
                    bulk.fetch(opened.address, info.id, view,
                               streams=self.config.fetch_streams,
                               timeout=self.config.rpc_timeout, prepare=warm.populate)
                    return
                except Unavailable as exc:
                    log.warning("bulk fetch of %s from %s failed: %s; using ReadPages",
                                info.name, opened.address, exc)
            self.peers.read_pages_into(address, info.name, info.id, view, fallback_timeout)

    def prefetch(self, session: Session, request: local_pb2.PrefetchRequest,
                 response: local_pb2.LocalResponse) -> list[int]:
        """Ensure a range of an attachment's pages is present here (bounds-checked).

        Home pages and eager replicas are complete, so this returns at once; a
        lazy replica fetches the missing chunks of the range.
        """
        with self._lock:
            attachment = self._attachment_locked(session, request.attachment_id)
            size = attachment.segment.size
            fill = attachment.segment.lazy
        length = request.length or max(0, size - request.offset)
        validate.check_range(request.offset, length, size)
        if fill is not None and length:
            fill.ensure(request.offset, length)
        response.empty.SetInParent()
        return []

    def register_faults(self, session: Session, request: local_pb2.RegisterFaultsRequest,
                        response: local_pb2.LocalResponse, fds: list[int]) -> list[int]:
        """Take the client's userfaultfd of a lazy attachment and resolve its faults."""
        if len(fds) != 1:
            raise InvalidArgument(f"RegisterFaults carries one userfaultfd, not {len(fds)} fds")
        self._start_faults()
        with self._lock:
            attachment = self._attachment_locked(session, request.attachment_id)
            fill = attachment.segment.lazy
            if fill is None or attachment.uffd >= 0:
                raise InvalidArgument(f"attachment {request.attachment_id} is not a lazy "
                                      "attachment waiting for its userfaultfd")
            if request.size != attachment.segment.size:
                raise InvalidArgument(f"RegisterFaults size {request.size} is not the "
                                      f"segment's {attachment.segment.size}")
            attachment.uffd = fds.pop()
            self._faults.add(attachment.uffd, fill, request.address, request.size)
        response.empty.SetInParent()
        return []

    # ------------------------------------------------------------------ serving peers

    def held_info(self, segment_id: int) -> types_pb2.SegmentInfo:
        """The cached record of home segment ``segment_id``; NotFound unless held."""
        with self._lock:
            return self._held_locked(segment_id).info

    def page_source(self, segment_id: int, offset: int, length: int) -> tuple[int, int]:
        """(a dup of the memfd, version) of home segment ``segment_id`` for reading
        [offset, offset + length); the caller closes the fd. NotFound unless held,
        InvalidArgument for an empty or out-of-bounds range."""
        with self._lock:
            segment = self._held_locked(segment_id)
            if length <= 0:
                raise InvalidArgument(f"invalid length {length}: must be > 0")
            validate.check_range(offset, length, segment.size)
            return os.dup(segment.fd), segment.info.version

    def bulk_source(self, segment_id: int, offset: int, length: int) -> int:
        """``page_source`` for the bulk channel (node/bulk.py)."""
        return self.page_source(segment_id, offset, length)[0]

    def _held_locked(self, segment_id: int) -> Segment:
        segment = self.store.by_id.get(segment_id)
        if segment is None or segment.freed:
            raise NotFound(f"segment id {segment_id} is not held by node {self.node_id}")
        return segment

    def _retire_replica(self, name: str) -> None:
        """The record of ``name`` is gone or deleting: drop this node's replica of it."""
        with self._lock:
            replica = self._replicas.get(name)
            free = self._retire_locked(replica) if replica is not None else None
        if free is not None:
            self._free(free)

    def _retire_locked(self, replica: Segment) -> Segment | None:
        """Stop handing out ``replica``; returns it if it must be ``_free``\\ d now (unattached),
        else it is freed at its last detach."""
        if self._replicas.get(replica.name) is replica:
            del self._replicas[replica.name]
        if replica.deleting:
            return None
        replica.deleting = True
        if replica.attachments > 0:
            return None
        self._remove_locked(replica)
        return replica

    def _reserve_locked(self, size: int, name: str) -> list:
        """Reserve ``size`` bytes for ``name``, evicting unattached replicas (oldest use
        first) when short; returns what to ``_release_spare`` outside the lock (evicted
        replicas, trimmed warm memory). Raises CapacityExceeded if it still does not fit."""
        spare: list = []
        if size > self.store.capacity - self.store.used:
            idle = sorted((r for r in self._replicas.values() if r.attachments == 0),
                          key=lambda r: r.checked)
            if size <= self.store.free + sum(r.size for r in idle):  # else evict nothing
                for replica in idle:
                    if size <= self.store.capacity - self.store.used:
                        break
                    spare.append(self._retire_locked(replica))
        self.store.reserve(size, name)
        return spare

    def _release_spare(self, spare: list) -> None:
        for item in spare:
            if isinstance(item, Segment):
                log.info("evicted the replica of %s (%d bytes) to make room", item.name,
                         item.size)
                self._free(item)
            else:
                release_all([item])

    def _attach_writer(self, session: Session, segment: Segment,
                       response: local_pb2.LocalResponse) -> list[int]:
        """The "rw" attach of a home segment: take the cluster-wide writer lock first."""
        try:
            lock = self._acquire_writer(session, segment.name)
        except BaseException:
            with self._lock:
                if segment.writer is Segment.PENDING:
                    segment.writer = None
            raise
        with self._lock:
            if segment.writer is Segment.PENDING:
                segment.writer = None
            gone = segment.deleting or segment.freed
            if not gone:
                fd = os.dup(segment.fd)
                body = response.attach
                body.segment.CopyFrom(segment.info)
                body.attachment_id = self._add_writer_locked(session, segment, lock, body).id
        if gone:
            self._release_writer(segment.name, lock.token, lock.lease_id)
            raise NotFound(f"segment {segment.name} is being deleted")
        return [fd]

    def _check_access(self, info: types_pb2.SegmentInfo, session: Session, mode: str) -> None:
        if not store_mod.may_attach(info, session.uid, session.gid, mode):
            raise PermissionDenied(
                f"permission denied: uid {session.uid} gid {session.gid} may not attach "
                f"segment {info.name} (mode 0o{info.mode:03o}, owner {info.uid}:{info.gid}) "
                f"{mode!r}")

    def _add_attachment_locked(self, session: Session, segment: Segment, mode: str,
                               token: int = 0, lease_id: int = 0) -> Attachment:
        attachment = Attachment(next(self._attachment_ids), segment, mode, session, token,
                                lease_id)
        session.attachments[attachment.id] = attachment
        segment.attachments += 1
        self._dirty[segment.id] = segment
        self._wake_reporter()
        return attachment

    def _wake_reporter(self) -> None:
        if not self._report_wake.is_set():  # set() takes a lock and notifies: skip if set
            self._report_wake.set()

    def detach(self, session: Session, request: local_pb2.DetachRequest,
               response: local_pb2.LocalResponse) -> list[int]:
        self._drop_attachment(session, request.attachment_id)
        response.detach.SetInParent()
        return []

    def _drop_attachment(self, session: Session, attachment_id: int) -> None:
        """Release one attachment of ``session`` (its writer lock too); NotFound if unknown."""
        with self._lock:
            attachment = self._attachment_locked(session, attachment_id)
            del session.attachments[attachment_id]
            action = self._detach_locked(attachment)
        self._wake_reporter()
        if action[0] is not None or action[1] is not None:
            self._after_detach(*action)

    def _attachment_locked(self, session: Session, attachment_id: int) -> Attachment:
        attachment = session.attachments.get(attachment_id)
        if attachment is None:
            raise NotFound(f"no attachment {attachment_id} on this connection")
        return attachment

    def _detach_locked(self, attachment: Attachment):
        """Drop ``attachment`` from its segment; returns what ``_after_detach`` must do."""
        segment = attachment.segment
        segment.attachments -= 1
        if attachment.uffd >= 0:
            self._faults.remove(attachment.uffd)
            attachment.uffd = -1
        writer = None
        if attachment.mode == "rw":
            self._writers.pop(attachment.id, None)
            if segment.writer is attachment:
                segment.writer = None
            if not attachment.fenced:
                writer = (segment.name, attachment.token, attachment.lease_id)
            self._drop_written_replica_locked(segment)
        free = None
        if not segment.freed:
            self._dirty[segment.id] = segment
            if segment.deleting and segment.attachments <= 0:
                self._remove_locked(segment)
                free = segment
        return writer, free

    def _drop_written_replica_locked(self, segment: Segment) -> None:
        """A writer left (or lost its lock on) ``segment``: if it is a replica it may hold
        writes never published, so later attaches must not see it; it is freed at its
        last detach (``_detach_locked``)."""
        if segment.replica and self._replicas.get(segment.name) is segment:
            del self._replicas[segment.name]
            segment.deleting = True

    def _after_detach(self, writer, free: Segment | None) -> None:
        if writer is not None:
            self._release_writer(*writer)
        if free is not None:
            self._free(free)

    def _cleanup_timeout(self) -> float:
        if self._stop.is_set():
            return min(self.config.rpc_timeout, _SHUTDOWN_RPC_TIMEOUT)
        return self.config.rpc_timeout

    def _release_writer(self, name: str, token: int, lease_id: int) -> None:
        try:
            self.coordinator.call("ReleaseWriter", coordinator_pb2.ReleaseWriterRequest(
                name=name, token=token, lease_id=lease_id), self._cleanup_timeout())
        except VasError as exc:  # the lease runs out on its own within writer_ttl
            log.warning("cannot release the writer lock of %s (token %d): %s", name, token, exc)

    def stat(self, session: Session, request: coordinator_pb2.GetSegmentRequest,
             response: local_pb2.LocalResponse) -> list[int]:
        name = validate.check_name(request.name)
        response.segment.CopyFrom(self.coordinator.call(
            "GetSegment", coordinator_pb2.GetSegmentRequest(name=name)))
        return []

    def list(self, session: Session, request: coordinator_pb2.ListSegmentsRequest,
             response: local_pb2.LocalResponse) -> list[int]:
        response.list.CopyFrom(self.coordinator.call("ListSegments", request))
        return []

    def delete(self, session: Session, request: local_pb2.DeleteRequest,
               response: local_pb2.LocalResponse) -> list[int]:
        name = validate.check_name(request.name)
        segment = self._claim_unattached(name)
        if segment is not None:
            response.segment.CopyFrom(self._delete_unattached(session, segment))
            return []
        info = self.coordinator.call("DeleteSegment", coordinator_pb2.DeleteSegmentRequest(
            caller=session.caller, name=name, force=request.force))
        response.segment.CopyFrom(info)
        if info.home == self.node_id:
            try:
                self.release_segment(info.name, info.id, request.force)
            except NotFound:  # homed here but not held (e.g. before a restart): nothing to free
                self._finish_delete(info.name, info.id)
        else:
            self._retire_replica(info.name)
            self._release_remote(info, request.force)
        return []

    def _claim_unattached(self, name: str) -> Segment | None:
        """The unattached home segment ``name``, hidden from new attaches; else None.

        The common delete: nobody holds the segment, so the record can go in the
        same coordinator call as the owner check (one etcd transaction, no
        FinishDelete) and the pages right after.
        """
        with self._lock:
            segment = self.store.by_name.get(name)
            if segment is None or segment.deleting or segment.attachments or segment.writer:
                return None
            segment.deleting = True
            self.store.unname(segment)
            return segment

    def _delete_unattached(self, session: Session, segment: Segment) -> types_pb2.SegmentInfo:
        """Remove the record of a claimed segment (owner check included), then free it."""
        try:
            info = self.coordinator.call("DeleteSegment", coordinator_pb2.DeleteSegmentRequest(
                caller=session.caller, name=segment.name, finish=True, id=segment.id))
        except VasError:
            with self._lock:  # refused (e.g. not the owner): the segment lives on
                segment.deleting = False
                self.store.by_name.setdefault(segment.name, segment)
            raise
        # The record is gone: free now (or wait for a re-read that got here first).
        self._begin_delete(segment, finish=False, force=False)
        return info

    def _release_remote(self, info: types_pb2.SegmentInfo, force: bool) -> None:
        """Ask the home agent of ``info`` to free it; finish ourselves if nobody holds it."""
        address = self._node_address(info.home)
        if address is None:
            log.info("home %s of deleted segment %s is gone; finishing the delete",
                     info.home, info.name)
            self._finish_delete(info.name, info.id)
            return
        try:
            self.peers.release_segment(address, info.name, info.id, force)
        except NotFound:
            self._finish_delete(info.name, info.id)
        except VasError as exc:  # the home sees the deleting mark at a later re-read
            log.warning("cannot ask node %s to release segment %s: %s", info.home, info.name, exc)

    def chmod(self, session: Session, request: local_pb2.ChmodRequest,
              response: local_pb2.LocalResponse) -> list[int]:
        name = validate.check_name(request.name)
        mode = validate.check_mode(request.mode)
        info = self.coordinator.call("SetSegmentMode", coordinator_pb2.SetSegmentModeRequest(
            caller=session.caller, name=name, mode=mode))
        self._changed_here(info)
        response.segment.CopyFrom(info)
        return []

    def chown(self, session: Session, request: local_pb2.ChownRequest,
              response: local_pb2.LocalResponse) -> list[int]:
        name = validate.check_name(request.name)
        info = self.coordinator.call("SetSegmentOwner", coordinator_pb2.SetSegmentOwnerRequest(
            caller=session.caller, name=name, uid=request.uid, gid=request.gid))
        self._changed_here(info)
        response.segment.CopyFrom(info)
        return []

    def nodes(self, session: Session, request: coordinator_pb2.ListNodesRequest,
              response: local_pb2.LocalResponse) -> list[int]:
        response.nodes.CopyFrom(self.coordinator.call("ListNodes", request))
        self._patch_own_usage(response.nodes.nodes)
        return []

    def _patch_own_usage(self, nodes) -> None:
        """Show this node's live usage: its record holds the last heartbeat's (ttl/3 old)."""
        with self._lock:
            used, count = self.store.used, len(self.store)
        for node in nodes:
            if node.id == self.node_id:
                node.memory_used, node.segments = used, count

    def status(self, session: Session, request: coordinator_pb2.ClusterStatusRequest,
               response: local_pb2.LocalResponse) -> list[int]:
        response.status.CopyFrom(self.coordinator.call("ClusterStatus", request))
        self._patch_own_usage(response.status.nodes)
        return []

    def space(self, session: Session, request: local_pb2.LocalSpaceRequest,
              response: local_pb2.LocalResponse) -> list[int]:
        """Space operations: checked, then forwarded with the caller filled in."""
        op = request.WhichOneof("op")
        call = self.coordinator.call
        if op == "create":
            response.space_info.CopyFrom(call("CreateSpace", coordinator_pb2.CreateSpaceRequest(
                caller=session.caller, name=validate.check_name(request.create.name, "space"),
                mode=validate.check_mode(request.create.mode))))
        elif op == "get":
            response.space_info.CopyFrom(call("GetSpace", coordinator_pb2.GetSpaceRequest(
                name=validate.check_name(request.get.name, "space"))))
        elif op == "list":
            response.spaces.CopyFrom(call("ListSpaces", request.list))
        elif op == "delete":
            call("DeleteSpace", coordinator_pb2.DeleteSpaceRequest(
                caller=session.caller, name=validate.check_name(request.delete.name, "space")))
            response.empty.SetInParent()
        elif op == "add":
            response.space_info.CopyFrom(call("SpaceAdd", coordinator_pb2.SpaceAddRequest(
                caller=session.caller, space=validate.check_name(request.add.space, "space"),
                segment=validate.check_name(request.add.segment),
                mode=validate.check_attach_mode(request.add.mode))))
        elif op == "remove":
            response.space_info.CopyFrom(call("SpaceRemove", coordinator_pb2.SpaceRemoveRequest(
                caller=session.caller, space=validate.check_name(request.remove.space, "space"),
                segment=validate.check_name(request.remove.segment))))
        else:
            raise Unimplemented("unknown space operation")
        return []

    # ------------------------------------------------------------------ deletion

    def release_segment(self, name: str, segment_id: int, force: bool) -> bool:
        """Free home segment ``segment_id`` once unattached (at once if ``force``).

        Called for a local delete and by another agent (Node.ReleaseSegment).
        Returns True when freed now. Raises NotFound if this agent does not
        hold that id (and no create is in flight that may turn out to hold it).
        """
        with self._lock:
            segment = self.store.by_id.get(segment_id)
            done = self._freeing.get(segment_id)
            if segment is None and done is None:
                if self._tombstone_locked(segment_id, name, _DELETING):
                    return False  # the create in flight (or _settle) frees and finishes it
                raise NotFound(f"segment {name} (id {segment_id}) is not held by node "
                               f"{self.node_id}")
        if segment is None:  # being freed by another thread: wait until it finished
            done.wait(self.config.rpc_timeout)
            return True
        return self._begin_delete(segment, finish=True, force=force)

    def _begin_delete(self, segment: Segment, *, finish: bool, force: bool) -> bool:
        """Mark ``segment`` deleting; free it now if unattached or ``force``.

        ``finish``: the coordinator's record still exists and needs FinishDelete
        after the pages are gone (False when the record vanished, e.g. ttl expiry).
        """
        revoked: list[Attachment] = []
        done = None
        free_now = False
        with self._lock:
            segment.finish = segment.finish or finish
            first = not segment.deleting
            if first:
                segment.deleting = True
                self.store.unname(segment)
            if segment.freed:
                # Another thread frees it (e.g. a re-read saw the deleting mark first):
                # return once it is done, so the name is free when the delete returns.
                done = self._freeing.get(segment.id)
            elif segment.attachments > 0 and not force:
                if first:
                    log.info("segment %s (id %d) deleting: freed at its last detach "
                             "(%d attached)", segment.name, segment.id, segment.attachments)
                return False
            else:
                if segment.attachments > 0:  # force: revoke; the sessions keep stale entries
                    revoked = [a for a in self._writers.values() if a.segment is segment]
                    for attachment in revoked:
                        attachment.fenced = True
                        del self._writers[attachment.id]
                    segment.writer = None
                    log.info("segment %s (id %d) force-deleted with %d attachments",
                             segment.name, segment.id, segment.attachments)
                self._remove_locked(segment)
                free_now = True
        if not free_now:
            if done is not None:
                done.wait(self.config.rpc_timeout)
            return True
        if self._dirty:  # a force-deleted segment's count to report
            self._wake_reporter()
        for attachment in revoked:
            self._release_writer(segment.name, attachment.token, attachment.lease_id)
        self._free(segment)
        return True

    def _remove_locked(self, segment: Segment) -> None:
        """Stop holding ``segment``; the caller then ``_free``\\ s it outside the lock."""
        self.store.remove(segment)
        if segment.attachments:  # force: report count 0 so the coordinator drops it
            self._dirty[segment.id] = segment  # (a count already 0 was reported at detach)
        self._freeing[segment.id] = threading.Event()

    def _free(self, segment: Segment) -> None:
        """Give back the memory of a removed segment and, if needed, finish its delete."""
        try:
            _release(segment)
            log.debug("freed segment %s (id %d, %d bytes)", segment.name, segment.id, segment.size)
            if segment.finish:
                self._finish_delete(segment.name, segment.id)
        finally:
            with self._lock:
                done = self._freeing.pop(segment.id, None)
            if done is not None:
                done.set()

    def _finish_delete(self, name: str, segment_id: int) -> None:
        """Remove the coordinator's record of a freed segment (retried in the background)."""
        try:
            self.coordinator.call("FinishDelete", coordinator_pb2.FinishDeleteRequest(
                name=name, id=segment_id), self._cleanup_timeout())
            with self._lock:
                self._unfinished.pop(segment_id, None)
        except VasError as exc:
            log.warning("FinishDelete of %s (id %d) failed: %s; will retry", name, segment_id, exc)
            with self._lock:
                self._unfinished[segment_id] = name

    def _tombstone_locked(self, segment_id: int, name: str, news: str) -> bool:
        """Remember ``news`` of an id not held, if a create in flight may hold it;
        returns whether it was remembered. A removal outranks a change."""
        if not self._creating:
            return False
        known = self._tombstones.get(segment_id)
        if news == _CHANGED and known is not None:
            return True
        if known is None or known[0] != _DELETING:  # keep a FinishDelete that is due
            self._tombstones[segment_id] = (news, name)
        while len(self._tombstones) > _MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        return True

    # ------------------------------------------------------------------ record changes

    def segment_changed(self, name: str, segment_id: int) -> None:
        """The record of home segment ``segment_id`` changed elsewhere: re-read it now.

        Called by another agent (Node.SegmentChanged) after a chmod/chown there.
        Raises NotFound if this agent does not hold that id (and no create is in
        flight that may turn out to hold it).
        """
        with self._lock:
            segment = self.store.by_id.get(segment_id)
            if segment is None:
                if self._tombstone_locked(segment_id, name, _CHANGED):
                    return  # the create in flight re-reads it
                raise NotFound(f"segment {name} (id {segment_id}) is not held by node "
                               f"{self.node_id}")
        self._recheck(segment)

    def _recheck(self, segment: Segment) -> bool:
        """Re-read the record of held ``segment`` and act on it; True if it lives on.

        Same id, not deleting: adopt it as the cached record. Marked deleting:
        free it (at once if unattached, else at the last detach) and finish the
        delete. Gone, or the name now has another id (ttl expiry, or a delete
        whose notification was lost): free it likewise; nothing to finish.
        Raises VasError when the coordinator cannot answer.
        """
        with self._refresh_lock:
            if segment.freed or segment.deleting:
                return False
            try:
                info = self.coordinator.call(
                    "GetSegment", coordinator_pb2.GetSegmentRequest(name=segment.name))
            except NotFound:
                info = None
            with self._lock:
                segment.checked = time.monotonic()
                current = info is not None and info.id == segment.id
                if current and not segment.freed:
                    segment.info = info
            if not current:
                log.info("segment %s (id %d) was removed from the cluster (ttl or delete)",
                         segment.name, segment.id)
                self._begin_delete(segment, finish=False, force=False)
                return False
            if info.state == types_pb2.SEGMENT_STATE_DELETING:
                self._begin_delete(segment, finish=True, force=False)
                return False
            return True

    def _changed_here(self, info: types_pb2.SegmentInfo) -> None:
        """A chmod/chown made through this agent: bring the home's cached record up to date."""
        if info.home == self.node_id:
            with self._lock:
                segment = self.store.by_id.get(info.id)
            if segment is None:
                return
            try:  # re-read rather than adopt ``info``: a later change may have landed
                self._recheck(segment)
            except VasError as exc:
                log.warning("cannot re-read segment %s: %s; keeping the changed record",
                            info.name, exc)
                with self._lock:
                    if not segment.freed:
                        segment.info = info
            return
        try:
            address = self._node_address(info.home)
            if address is not None:
                self.peers.segment_changed(address, info.name, info.id)
        except NotFound:  # the home no longer holds it: nothing is cached there
            pass
        except VasError as exc:  # the home re-reads its records on its own (heartbeat)
            log.warning("cannot tell node %s that segment %s changed: %s", info.home,
                        info.name, exc)

    def _node_address(self, node_id: str) -> str | None:
        """The gRPC address of live node ``node_id`` (None if it is not registered)."""
        nodes = self.coordinator.call("ListNodes", coordinator_pb2.ListNodesRequest()).nodes
        return next((node.address for node in nodes if node.id == node_id), None)

    def _home_address(self, info: types_pb2.SegmentInfo) -> str:
        """The gRPC address of the home of ``info``; Unavailable if it is not registered."""
        address = self._node_address(info.home)
        if address is None:
            raise Unavailable(f"home node {info.home} of segment {info.name} is not "
                              "registered (down?)")
        return address

    def _arm_expiry(self, segment_id: int, deadline: float, retries: int = 0) -> None:
        """Re-read the record of ``segment_id`` at ``deadline`` (``time.monotonic()``)."""
        with self._expiry_cv:
            heapq.heappush(self._expiry, (deadline, segment_id, retries))
            if self._expiry[0][1] == segment_id:  # new earliest deadline: wake the timer
                self._expiry_cv.notify()

    def _expire(self, segment_id: int, retries: int) -> None:
        """A ttl segment's expiry passed: free it once etcd removed its record."""
        with self._lock:
            segment = self.store.by_id.get(segment_id)
        if segment is None:
            return
        try:
            alive = self._recheck(segment)
        except VasError as exc:
            log.warning("cannot re-read expired segment %s: %s; retrying", segment.name, exc)
            alive = True
        if alive:  # not removed yet (etcd's lease clock, a leader change): look again
            delay = min(_EXPIRY_MARGIN * 2 ** (retries + 1), _EXPIRY_RETRY_MAX)
            self._arm_expiry(segment_id, time.monotonic() + delay, retries + 1)

    def _recheck_stale(self) -> None:
        """Re-read a few held records not read for a while (a lost notification heals)."""
        horizon = time.monotonic() - _RECHECK_AGE
        with self._lock:
            stale = [s for s in self.store.by_id.values()
                     if s.checked < horizon and not s.deleting]
        stale.sort(key=lambda segment: segment.checked)
        for segment in stale[:_RECHECK_BATCH]:
            try:
                self._recheck(segment)
            except VasError as exc:
                log.warning("cannot re-read segment %s: %s", segment.name, exc)
                return

    def _recheck_replicas(self) -> None:
        """Drop replicas whose segment was deleted (nobody tells a replica's node), checking
        a few not used for a while per beat."""
        horizon = time.monotonic() - _RECHECK_AGE
        with self._lock:
            stale = sorted((r for r in self._replicas.values() if r.checked < horizon),
                           key=lambda r: r.checked)[:_RECHECK_BATCH]
        for replica in stale:
            try:
                info = self.coordinator.call(
                    "GetSegment", coordinator_pb2.GetSegmentRequest(name=replica.name))
            except NotFound:
                info = None
            except VasError as exc:
                log.warning("cannot re-read segment %s: %s", replica.name, exc)
                return
            replica.checked = time.monotonic()
            if info is None or info.id != replica.id or \
                    info.state == types_pb2.SEGMENT_STATE_DELETING:
                log.info("dropping the replica of %s: its segment was deleted", replica.name)
                with self._lock:
                    free = self._retire_locked(replica)
                if free is not None:
                    self._free(free)

    # ------------------------------------------------------------------ background threads

    def _heartbeat_loop(self) -> None:
        interval = self._node_ttl / 3
        while not self._stop.wait(interval):
            interval = self._node_ttl / 3
            with self._lock:
                request = coordinator_pb2.HeartbeatRequest(
                    node_id=self.node_id, lease_id=self._lease_id, memory_used=self.store.used,
                    segments=len(self.store), state=types_pb2.NODE_STATE_READY)
                unfinished = dict(self._unfinished)
            try:
                self.coordinator.call("Heartbeat", request)
            except NotFound:
                log.warning("node lease of %s expired; registering again", self.node_id)
                try:
                    self._register_once()
                except VasError as exc:
                    log.warning("cannot register again: %s", exc)
                    interval = min(interval, 1.0)
            except VasError as exc:
                log.warning("heartbeat of %s failed: %s", self.node_id, exc)
                interval = min(interval, 1.0)
            for segment_id, name in unfinished.items():
                self._finish_delete(name, segment_id)
            self._recheck_stale()
            self._recheck_replicas()

    def _expiry_loop(self) -> None:
        while not self._stop.is_set():
            with self._expiry_cv:
                if self._stop.is_set():  # checked under the lock stop() notifies with
                    return
                now = time.monotonic()
                due = []
                while self._expiry and self._expiry[0][0] <= now:
                    due.append(heapq.heappop(self._expiry))
                if not due:
                    self._expiry_cv.wait(self._expiry[0][0] - now if self._expiry else None)
                    continue
            for _, segment_id, retries in due:
                if self._stop.is_set():
                    return
                try:
                    self._expire(segment_id, retries)
                except Exception:  # one bad segment must not end the timer
                    log.exception("cannot expire segment id %d", segment_id)

    def _report_loop(self) -> None:
        while True:
            self._report_wake.wait()
            if self._stop.wait(self.config.report_delay):
                return
            self._report_wake.clear()
            with self._lock:
                dirty, self._dirty = self._dirty, {}
                lease = self._lease_id
                counts = [coordinator_pb2.AttachmentCount(
                    name=s.name, id=s.id, count=self._count_locked(s)) for s in dirty.values()]
            if not counts:
                continue
            try:
                self.coordinator.call("ReportAttachments", coordinator_pb2.ReportAttachmentsRequest(
                    node_id=self.node_id, lease_id=lease, counts=counts))
            except VasError as exc:
                log.warning("cannot report attachments: %s; retrying", exc)
                with self._lock:
                    for segment_id, segment in dirty.items():
                        self._dirty.setdefault(segment_id, segment)
                self._report_wake.set()
                if self._stop.wait(1.0):
                    return

    def _count_locked(self, segment: Segment) -> int:
        """Local attachments of ``segment``'s id to report (a retired replica and its
        successor share the id)."""
        if segment.replica:
            return sum(r.attachments for r in self.store.replicas if r.id == segment.id)
        return 0 if segment.freed else max(0, segment.attachments)

    def _writer_keepalive_loop(self) -> None:
        interval = max(self.config.writer_ttl / 3, 0.1)
        while not self._stop.wait(interval):
            with self._lock:
                writers = list(self._writers.values())
            for attachment in writers:
                if attachment.fenced:
                    continue
                if not attachment.session.alive_within(self.config.writer_ttl * 2 / 3):
                    # Stopped or hung: let the lease lapse so another writer can take over.
                    log.warning("writer of %s (pid %d) sent no keepalive for %.1f s: not "
                                "renewing its lock", attachment.segment.name,
                                attachment.session.pid,
                                time.monotonic() - attachment.session.last_seen)
                    continue
                try:
                    self.coordinator.call("RenewWriter", coordinator_pb2.RenewWriterRequest(
                        name=attachment.segment.name, token=attachment.token,
                        lease_id=attachment.lease_id))
                except Fenced as exc:
                    log.warning("writer lock of %s (token %d) lapsed: %s", attachment.segment.name,
                                attachment.token, exc)
                    self._fenced(attachment)
                except VasError as exc:
                    log.warning("cannot renew the writer lock of %s: %s", attachment.segment.name,
                                exc)


def _release(segment: Segment) -> None:
    """Give back the memory of a removed segment or replica and close its fds.

    The pages are punched out before the agent's mapping goes: munmap of a
    populated GiB holds this process's mmap lock for ~0.1 s (every mmap, e.g. a
    lazy attach's, waits), of an emptied one only briefly."""
    if segment.lazy is not None:
        segment.lazy.close()  # waits for fetches in flight into it
    store_mod.release(segment.fd, segment.ro_fd, segment.size)
    if segment.mapping is not None:
        segment.mapping.close()
