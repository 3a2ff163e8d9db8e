"""The agent: its parts joined by composition, and the flows that cross them.

One ``Agent`` per process. Its parts, each a module of its own:

- ``HomeSegments`` (node/homes.py): segments created here — create, attach,
  delete, ttl expiry, keeping their records current;
- ``Replicas`` (node/replicas.py): copies of segments homed elsewhere — fetch,
  lazy fill, eviction, refresh;
- ``Writers`` (node/writers.py): writer locks, keepalive, sync/publish, wait;
- ``Sessions`` (node/sessions.py): local connections and their attachments;
- ``Membership`` and ``Reporter`` (node/membership.py): registration (with
  reconciliation at start), heartbeats, attachment and replica reports;
- ``ReplicaNotices`` (node/notices.py): telling the nodes that hold replicas of
  a segment deleted or freed here to drop them;
- ``Store`` (node/store.py) and ``WarmPool`` (node/pool.py): capacity and memory;
- ``SpaceCache`` (node/spaces.py): the spaces read through this agent, kept while
  its watch of the space records says they did not change.

What is left here are the flows that need several parts: an attach (home
segment, replica or remote writer), ending an attachment, a delete, a chmod,
and the start and stop of the background threads:

- heartbeat (Membership.run; also FinishDelete retries and lazy re-reads),
- expiry (the ttl timer of HomeSegments), reporter (Reporter.run),
- writer keepalive (Writers.run_keepalive), writer deadlines (Writers.deadlines:
  fences a writer whose lease was not renewed in time), warm pool (WarmPool.run),
- notices (ReplicaNotices.run), spaces (SpaceCache.run).

The local request layer is node/localapi.py; the Node gRPC service node/service.py.
Lock order: docs/ARCHITECTURE.md "Locks" and node/locks.py.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from vas.core import validate
from vas.core.errors import InvalidArgument, NotFound, Unavailable, VasError, segment_lost
from vas.core.fetch import FetchMode, decide
from vas.core.identity import LOOPBACK, Peer, PeerKind
from vas.node.access import check_access, check_peer_access
from vas.node.backups import Backups
from vas.node.clients import CoordinatorClient, PeerClients
from vas.node.config import NodeConfig
from vas.node.datadir import DataDir, Stored
from vas.node.homes import HomeSegments
from vas.node.limits import Counts, Limit
from vas.node.membership import Membership, Reporter
from vas.node.notices import ReplicaNotices
from vas.node.pool import WarmPool
from vas.node.publish import check_runs, pieces_of
from vas.node.relay import Copy, Directory
from vas.node.replicas import Replicas
from vas.node.segments import HomeSegment, HomeState, Replica
from vas.node.sessions import Attachment, Session, Sessions
from vas.node.spaces import SpaceCache
from vas.node.store import Store
from vas.node.writers import Writers
from vas.proto import coordinator_pb2, node_pb2, types_pb2

log = logging.getLogger(__name__)

#: Deadline of the clean-up calls made while shutting down (a dead coordinator must
#: not hold up the exit: leases expire on their own), seconds.
_SHUTDOWN_RPC_TIMEOUT = 2.0
#: Most segments one CheckSegments call may name.
_CHECK_BATCH = 1000


class Agent:
    """One node agent (see the module docstring)."""

    def __init__(self, config: NodeConfig, node_id: str, address: str, socket_path: str,
                 coordinator: CoordinatorClient | None = None, peers: PeerClients | None = None,
                 data_dir: DataDir | None = None, found: list[Stored] = ()):
        self.config = config
        self.node_id = node_id
        self.address = address
        self.socket_path = socket_path
        #: host:port of this agent's bulk listener (set by the server before serving).
        self.bulk_address = ""
        self.coordinator = coordinator or CoordinatorClient(config.coordinator, config.rpc_timeout,
                                                            config.tls)
        self.peers = peers or PeerClients(config.rpc_timeout, config.tls)
        self.store = Store(config.memory, f"node {node_id}")
        self.pool = WarmPool(self.store)
        self.sessions = Sessions(node_id)
        #: Per-uid counts (node/limits.py): attachments, attaches in flight included;
        #: userfaultfds held for lazy attachments.
        self.attachment_counts = Counts(Limit.ATTACHMENTS, config.max_attachments_per_uid)
        self.fault_counts = Counts(Limit.FAULTS, config.max_faults_per_uid)
        self.reporter = Reporter(node_id, self.coordinator, config.report_delay, self._count,
                                 lambda replica: self.replicas.drop(replica.name, replica.id))
        self.replicas = Replicas(node_id, config, self.store, self.pool, self.coordinator,
                                 self.peers, self.sessions, self.reporter, self.node_address)
        #: Who pulls this node's home segments from whom (OpenBulk; node/relay.py).
        self.relays = Directory(config.relay_fanout)
        self.notices = ReplicaNotices(node_id, self.coordinator, self.peers, self.replicas.drop)
        self.writers = Writers(node_id, config, self.coordinator, self.peers,
                               self.replicas.home_address, self.replicas.retire,
                               self.cleanup_timeout, self.pool.transfer, self.node_address,
                               data_dir, homes=self.replicas.homes)
        self.backups = Backups(node_id, self.store, self.coordinator)
        self.homes = HomeSegments(node_id, config, self.store, self.coordinator, self.sessions,
                                  self.writers, self.reporter, self.replicas, self.notices,
                                  self.cleanup_timeout, data_dir)
        #: Segments found in the data dir at start whose records are still to be checked.
        self._found = list(found)
        self.spaces = SpaceCache(self.coordinator)
        self.membership = Membership(node_id, config, self.coordinator, self.reporter,
                                     self.node_info, self._held, self._home_ids,
                                     self._registered, self._chores, self.cleanup_timeout)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def node_info(self) -> types_pb2.NodeInfo:
        used, count = self.store.usage()
        replicas, replica_bytes = self.replicas.usage()
        backups = self.backups.all()  # copies held for others, like replicas
        replicas += len(backups)
        replica_bytes += sum(backup.size for backup in backups)
        return types_pb2.NodeInfo(
            id=self.node_id, address=self.address, socket=self.socket_path,
            memory_total=self.store.capacity, memory_used=used, segments=count,
            state=types_pb2.NODE_STATE_READY, replicas=replicas, replica_bytes=replica_bytes)

    def register(self, stop: threading.Event | None = None) -> bool:
        """Register with the coordinator (reconciling: the records homed here that this
        agent does not hold become lost), retrying until it answers or ``stop`` is set."""
        return self.membership.register(stop or self._stop)

    def start(self) -> None:
        """Start the background threads (after ``register``)."""
        for target, name in ((lambda: self.membership.run(self._stop), "heartbeat"),
                             (self.homes.expiry.run, "expiry"),
                             (self.homes.elsewhere.run, "attached-elsewhere"),
                             (lambda: self.reporter.run(self._stop), "reporter"),
                             (lambda: self.writers.run_keepalive(self._stop), "writer-keepalive"),
                             (self.writers.deadlines.run, "writer-deadline"),
                             (self.pool.run, "warm-pool"),
                             (lambda: self._run_restore(self._stop), "backups"),
                             (lambda: self.notices.run(self._stop), "notices")):
            thread = threading.Thread(target=target, name=f"vas-node-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        # Not joined at stop: it waits in a Watch call for up to its slice (10 s), and
        # ends at the next one, or when close() closes the coordinator channel.
        threading.Thread(target=lambda: self.spaces.run(self._stop), name="vas-node-spaces",
                         daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background threads (the last attachment reports are dropped:
        deregistering removes them anyway)."""
        self._stop.set()
        self.reporter.stop()
        self.notices.stop()
        self.writers.stop()
        self.homes.expiry.stop()
        self.homes.elsewhere.stop()
        self.pool.stop()
        self.replicas.stop()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def deregister(self) -> None:
        self.membership.deregister()

    def free_all(self) -> None:
        """Free every held segment and replica (at shutdown, after the sessions closed)."""
        self.writers.revocations.close_all()
        self.homes.free_all()
        self.replicas.free_all()
        self.backups.free_all()

    def close(self) -> None:
        self.coordinator.close()
        self.peers.close()

    def cleanup_timeout(self) -> float:
        """Deadline of a clean-up call: short while shutting down."""
        if self._stop.is_set():
            return min(self.config.rpc_timeout, _SHUTDOWN_RPC_TIMEOUT)
        return self.config.rpc_timeout

    def _held(self) -> list:
        return self.homes.all() + self.replicas.all()

    def _home_ids(self) -> list[int]:
        """Ids of the home segments whose memory is held (told to RegisterNode).

        At start, first the segments found in the data dir are checked against
        their records and adopted (or their files removed): a VasError of a record
        lookup is retried with the registration. One with chunks that failed their
        checksum is held (this agent answers its attaches with the DataLoss that
        names them, and its delete frees the files) but not told: the coordinator
        marks it lost, so every other node and ``seg stat`` say so at once."""
        refs = [(stored.manifest["name"], stored.manifest["id"]) for stored in self._found]
        gone: set[int] = set()  # absent, another id, deleting or marked lost
        for first in range(0, len(refs), _CHECK_BATCH):
            gone.update(self.coordinator.check_segments(refs[first:first + _CHECK_BATCH]))
        while self._found:
            stored = self._found[0]
            name, segment_id = stored.manifest["name"], stored.manifest["id"]
            self.homes.adopt(stored, None if segment_id in gone
                             else self.coordinator.find_segment(name))
            self._found.pop(0)
        return [segment.id for segment in self.homes.all()
                if segment.state is not HomeState.FREED and segment.damage is None]

    def _registered(self, response: coordinator_pb2.RegisterNodeResponse, again: bool) -> None:
        """After a registration: tell the nodes holding replicas of the records it marked
        lost; after registering again (the lease lapsed), check every replica and every
        home segment, since notices of deletes made meanwhile may have missed this node
        and etcd may have come back from a snapshot without their records."""
        for info in response.lost:
            self.notices.tell(info.name, info.id, info.copies)
        if again:
            self.replicas.recheck_all()
            self.homes.check_all()

    def _chores(self) -> None:
        """Periodic work of the heartbeat thread."""
        self.homes.retry_unfinished()
        self.homes.settle_doubted()
        self.homes.recheck_stale()
        self.replicas.recheck_stale()
        try:
            self.backups.recheck()
        except VasError as exc:
            log.warning("cannot check the records of the backups held: %s", exc)
        self.writers.revocations.reap()

    def _count(self, segment) -> tuple[int, bool]:
        """(attachment count, whether a replica is held) to report for ``segment``."""
        if isinstance(segment, Replica):
            return self.replicas.report_of(segment)
        with segment.lock:
            return (0 if segment.state is HomeState.FREED else max(0, segment.attachments)), False

    def node_address(self, node_id: str) -> str | None:
        """The gRPC address of live node ``node_id`` (None if it is not registered)."""
        nodes = self.coordinator.list_nodes().nodes
        return next((node.address for node in nodes if node.id == node_id), None)

    # ------------------------------------------------------------------ sessions

    def open_session(self, uid: int, gid: int, pid: int) -> Session:
        return self.sessions.open(uid, gid, pid)

    def close_session(self, session: Session) -> None:
        """The connection is gone (EOF): end all its attachments and writer locks now."""
        attachments = self.sessions.take_all(session)
        # The process may live on with its mappings, unless the agent is stopping (its
        # home pages go with it): then nothing is revoked.
        revoke = not self._stop.is_set()
        for attachment in attachments:
            self.end_attachment(attachment, revoke=revoke)
        if attachments:
            log.debug("%r closed: released %d attachments", session, len(attachments))

    # ------------------------------------------------------------------ attach

    def attach(self, session: Session, name: str, mode: str, fetch: str, support: int,
               write_protect: bool = False
               ) -> tuple[Attachment, int, types_pb2.SegmentInfo, FetchMode]:
        """(attachment, fd, record, how the pages come) of ``name`` in ``mode``;
        ``write_protect``: the client can make a home "rw" mapping revocable.
        CapacityExceeded when the caller's uid holds its most attachments already."""
        self.attachment_counts.take(session.uid)  # given back when the attachment ends
        try:
            return self._attach(session, name, mode, fetch, support, write_protect)
        except BaseException:
            self.attachment_counts.give(session.uid)
            raise

    def _attach(self, session: Session, name: str, mode: str, fetch: str, support: int,
                write_protect: bool
                ) -> tuple[Attachment, int, types_pb2.SegmentInfo, FetchMode]:
        segment = self.homes.find(name)
        if segment is not None:
            if mode == "r":
                attachment, fd = self.homes.attach_reader(session, segment)
            else:
                attachment, fd = self.homes.attach_writer(session, segment, write_protect)
            return attachment, fd, segment.info, FetchMode.HOME
        info = self.coordinator.find_segment(validate.check_name(name))
        if info is None or info.state == types_pb2.SEGMENT_STATE_DELETING:
            gone = (f"segment {name} not found" if info is None
                    else f"segment {name} is being deleted")
            # While deleting, the home keeps the pages for the attachments it waits for.
            self.replicas.retire_name(name, lost=gone if info is None else None)
            raise NotFound(gone)
        check_access(info, session, mode)
        if self._marked_lost(info):
            self.replicas.retire_name(name)
            raise segment_lost(name, info.home)
        if info.home == self.node_id:  # created here a moment ago: the reply may be in flight
            if self.homes.find_created(name) is not None or self._promoted(info):
                return self._attach(session, name, mode, fetch, support, write_protect)
            raise Unavailable(f"segment {name} (id {info.id}) is homed on node {self.node_id} "
                              "but its memory is not held here")
        if mode == "rw":
            return self._attach_remote_writer(session, info)
        how = decide(fetch, home=False, support=support)
        attachment, fd = self.replicas.attach(session, info, how)
        if how is FetchMode.LAZY and attachment.segment.fill is None:
            how = FetchMode.EAGER  # the replica was complete already: nothing to page in
        return attachment, fd, info, how

    def _marked_lost(self, info: types_pb2.SegmentInfo) -> bool:
        """Whether ``info`` is lost for good (its home restarted without it), as opposed
        to a home that is not registered now (down or cut off: it may come back with
        the memory, and the attach fails Unavailable further on). A lost record whose
        home is registered can only be marked: a live home derives ``ready``."""
        if info.state != types_pb2.SEGMENT_STATE_LOST:
            return False
        return info.home == self.node_id or self.node_address(info.home) is not None

    def _attach_remote_writer(self, session: Session, info: types_pb2.SegmentInfo):
        """The "rw" attach of a segment homed elsewhere: take the writer lock, then make
        this node's replica complete and equal to the home's bytes (the base the next
        sync() diffs against) and map it writable."""
        lease = self.writers.acquire(session.caller, info.name)
        with self.writers.renewing(lease, session):
            try:
                attachment, fd = self.replicas.attach(session, info, FetchMode.EAGER, lease)
            except BaseException:
                self.writers.release(lease)
                raise
            replica = attachment.segment
            try:
                base = self.replicas.bring_current(replica, writer=attachment)
                with replica.lock:
                    replica.synced_hashes = base
                    info = replica.info
                self.writers.track(attachment)
            except BaseException:
                # never mapped: as good as unmapped; attach() gives its slot back
                self._end(self.sessions.take(session, attachment.id), revoke=False)
                os.close(fd)
                raise
        return attachment, fd, info, FetchMode.EAGER

    def revalidate(self, session: Session, attachment_id: int) -> tuple[int | None, bool]:
        """The version of the pages ``session``'s "r" attachment ``attachment_id`` maps,
        if a fresh "r" attach would map those same pages (Client.switch reuses it then);
        None for a copy that is not the current one any more; the attach's error when
        one would fail. And whether the answer holds until the change counter moves
        (node/changes.py): True for a home segment.

        A home segment: the checks of an attach, on the cached record (no coordinator
        call). A copy: the record is read, as every remote attach reads it (gone,
        deleting, lost, permission), and the copy must be of that id, current (not
        retired) and at least at its version.
        """
        attachment = self.sessions.get(session, attachment_id)
        if attachment.mode != "r":
            raise InvalidArgument(f"attachment {attachment_id} is \"{attachment.mode}\": only "
                                  "\"r\" attachments are revalidated")
        segment = attachment.segment
        if isinstance(segment, HomeSegment):
            return self.homes.current_version(session, segment), True
        info = self.coordinator.find_segment(segment.name)
        if info is None or info.state == types_pb2.SEGMENT_STATE_DELETING:
            raise NotFound(f"segment {segment.name} not found" if info is None
                           else f"segment {segment.name} is being deleted")
        check_access(info, session, "r")
        if self._marked_lost(info):
            raise segment_lost(segment.name, info.home)
        return self.replicas.current_version(segment, info), False

    def detach(self, session: Session, attachment_id: int) -> None:
        """End ``session``'s attachment ``attachment_id`` (NotFound if it has none such);
        the client unmapped it before asking."""
        attachment = self.sessions.take(session, attachment_id)
        self.end_attachment(attachment, revoke=False)
        if attachment.mode == "rw" and isinstance(attachment.segment, HomeSegment):
            self.homes.writer_unmapped(attachment.segment)

    def end_attachment(self, attachment: Attachment, *, revoke: bool) -> None:
        """Stop resolving its faults, release its writer lock (a home writer's mapping
        write-protected first if ``revoke``: see Writers.ended), count it out.

        A revoked home writer's guard may be kept until its process exits (it still
        maps the pages): the attachment counts against its uid until then, so a
        process cannot pile up kept guards (fds here) by reconnecting."""
        give = functools.partial(self.attachment_counts.give, attachment.session.uid)
        if revoke and attachment.guard is not None:
            attachment.guard.when_closed(give)
            self._end(attachment, revoke=True)
        else:
            self._end(attachment, revoke=revoke)
            give()

    def _end(self, attachment: Attachment, *, revoke: bool) -> None:
        if self.replicas.unregister_faults(attachment):
            self.fault_counts.give(attachment.session.uid)
        if attachment.lease is not None:
            self.writers.ended(attachment, revoke=revoke)
        if isinstance(attachment.segment, HomeSegment):
            self.homes.detached(attachment)
        else:
            self.replicas.detached(attachment)

    def register_faults(self, session: Session, attachment_id: int, uffd: int, address: int,
                        size: int) -> None:
        """Resolve the faults of ``session``'s lazy attachment on ``uffd`` (taken over).
        CapacityExceeded when the uid has its most userfaultfds registered already."""
        attachment = self.sessions.get(session, attachment_id)
        self.fault_counts.take(session.uid)  # given back when the attachment ends
        try:
            self.replicas.register_faults(attachment, uffd, address, size)
        except BaseException:
            self.fault_counts.give(session.uid)
            raise

    # ------------------------------------------------------------------ delete, chmod, chown

    def delete(self, session: Session, name: str, force: bool) -> types_pb2.SegmentInfo:
        """Delete ``name``: free its memory (here, or through its home), and tell the
        nodes holding replicas of it (the reply's ``copies``) to drop them."""
        with self.homes.doubtful(name):
            return self._delete(session, name, force)

    def _delete(self, session: Session, name: str, force: bool) -> types_pb2.SegmentInfo:
        """The delete of ``name``. The nodes holding replicas are told now when the pages
        are gone now; when the home keeps them for attachments (here or elsewhere) it
        tells them once it frees them, and lazy replicas attached meanwhile go on
        fetching their pages."""
        segment = self.homes.claim(session, name)
        if segment is not None:
            info, freed = self.homes.delete_claimed(session.caller, segment, force)
        else:
            info = self.coordinator.delete_segment(caller=session.caller, name=name,
                                                   force=force)
            if info.state == types_pb2.SEGMENT_STATE_LOST:  # removed: no memory anywhere
                self.replicas.retire_name(info.name, lost=f"segment {info.name} was lost")
                freed = True
            elif info.home == self.node_id:
                try:
                    freed = self.homes.release(info.name, info.id, force)
                except NotFound:  # homed here but not held (e.g. before a restart)
                    self.homes.finish_delete(info.name, info.id)
                    freed = True
            else:
                freed = self._release_remote(info, force)
                self.replicas.retire_name(
                    info.name, lost=f"segment {info.name} was deleted" if freed else None)
        if freed:
            self.notices.tell(info.name, info.id, info.copies)
        return info

    def _release_remote(self, info: types_pb2.SegmentInfo, force: bool) -> bool:
        """Ask the home agent of ``info`` to free it; finish ourselves if nobody holds it.
        False when the home keeps the pages until the last detach; True when they are
        gone, or cannot be fetched any more (the home is not registered or did not
        answer: it sees the deleting mark at a later re-read)."""
        address = self.node_address(info.home)
        if address is None:
            log.info("home %s of deleted segment %s is gone; finishing the delete",
                     info.home, info.name)
            self.homes.finish_delete(info.name, info.id)
            return True
        try:
            return self.peers.release_segment(address, info.name, info.id, force)
        except NotFound:
            self.homes.finish_delete(info.name, info.id)
        except VasError as exc:  # the home sees the deleting mark at a later re-read
            log.warning("cannot ask node %s to release segment %s: %s", info.home, info.name, exc)
        return True

    def chmod(self, session: Session, name: str, mode: int) -> types_pb2.SegmentInfo:
        with self.homes.doubtful(name):
            info = self.coordinator.set_segment_mode(session.caller, name, mode)
        self._changed(info)
        return info

    def chown(self, session: Session, name: str, uid: int, gid: int) -> types_pb2.SegmentInfo:
        with self.homes.doubtful(name):
            info = self.coordinator.set_segment_owner(session.caller, name, uid, gid)
        self._changed(info)
        return info

    def _changed(self, info: types_pb2.SegmentInfo) -> None:
        """A chmod/chown made here holds on this home before the request returns (the
        coordinator tells a home elsewhere itself: coordinator/homes.py)."""
        if info.home == self.node_id:
            self.homes.changed_here(info)

    # ------------------------------------------------------------------ backups

    def promote(self, name: str, segment_id: int) -> types_pb2.SegmentInfo:
        """Make this node's backup of ``name`` (id ``segment_id``) its home segment, the
        record naming this node home now (Node.PromoteBackup, or this agent finding
        itself named home). Idempotent. NotFound without such a record or backup;
        Unavailable when the record names another home."""
        info = self.coordinator.get_segment(name)
        if info.id != segment_id:
            raise NotFound(f"segment {name} (id {segment_id}) not found")
        if info.home != self.node_id:
            raise Unavailable(f"segment {name} is homed on node {info.home}, not "
                              f"{self.node_id}: its backup here is not promoted")
        segment = self.homes.find(name)
        if segment is not None and segment.id == segment_id:
            return segment.info
        try:
            self.backups.promote(segment_id, info.version,
                                 lambda memory: self.homes.adopt_promoted(info, memory))
        except NotFound:
            segment = self.homes.find(name)  # a concurrent promotion adopted it
            if segment is not None and segment.id == segment_id:
                return segment.info
            raise
        self.replicas.retire_name(name)  # a replica of the old home's pages: same bytes, not needed
        return info

    def _promoted(self, info: types_pb2.SegmentInfo) -> bool:
        """Whether this node held a backup of ``info`` (whose record names it home) and
        promoted it now: the coordinator's PromoteBackup may not have arrived."""
        try:
            self.backups.get(info.id)
        except NotFound:
            return False
        self.promote(info.name, info.id)
        return True

    def _run_restore(self, stop: threading.Event) -> None:
        """Every heartbeat interval: replace the backups lost by the home segments with
        ``replicas`` (node/backup_push.py ``restore``). Its own thread: a fill moves a
        whole segment, which must not hold up the heartbeat."""
        while not stop.wait(max(self.config.heartbeat_ttl / 3, 0.1)):
            short = [segment for segment in self.homes.all()
                     if segment.info.replicas and segment.state is HomeState.LIVE]
            if not short:
                continue
            try:
                nodes = self.coordinator.list_nodes().nodes
                for segment in short:
                    self.writers.backup_push.restore(segment, nodes)
            except VasError as exc:
                log.warning("cannot restore the backups of home segments: %s", exc)

    def held_home(self, segment_id: int):
        """``homes.held``; a backup of ``segment_id`` whose record names this node home
        is promoted first (a peer asking for its pages found it home)."""
        try:
            return self.homes.held(segment_id)
        except NotFound:
            try:
                backup = self.backups.get(segment_id)
            except NotFound:
                pass
            else:
                self.promote(backup.name, segment_id)
            return self.homes.held(segment_id)

    # ------------------------------------------------------------------ serving peers

    def page_source(self, segment_id: int, offset: int, length: int,
                    peer: Peer = LOOPBACK) -> tuple[int, int]:
        """(a dup of the memfd, version) of home segment ``segment_id`` for reading
        [offset, offset + length); the caller closes the fd. NotFound unless held,
        InvalidArgument for an empty or out-of-bounds range, PermissionDenied unless
        ``peer`` may read it (``check_peer``)."""
        segment = self.held_home(segment_id)
        if length <= 0:
            raise InvalidArgument(f"invalid length {length}: must be > 0")
        validate.check_range(offset, length, segment.size)
        self.check_peer(peer, segment, "r")
        fd = segment.dup_fd()
        with segment.lock:
            return fd, segment.info.version

    def bulk_source(self, segment_id: int, offset: int, length: int, peer: Peer) -> int:
        """``page_source`` for the bulk channel (node/bulk.py)."""
        return self.page_source(segment_id, offset, length, peer)[0]

    def relay_source(self, segment_id: int, offset: int, length: int, peer: Peer) -> Copy:
        """The copy of ``segment_id`` this node relays, for a relay request of [offset,
        offset + length) (node/bulk.py), checked as ``page_source`` checks a home's."""
        copy = self.replicas.copies.find(segment_id)
        if length <= 0:
            raise InvalidArgument(f"invalid length {length}: must be > 0")
        validate.check_range(offset, length, copy.size)
        self.check_peer(peer, copy, "r")
        return copy

    def write_home(self, header: node_pb2.WritePagesHeader, peer: Peer):
        """The home segment a remote writer's publish (WritePages, a bulk write) of
        ``header`` goes to, after checking it and that ``peer`` may write it; the
        Caller in ``header`` is made the one the coordinator may believe (a user's own)."""
        if not header.id or not header.token:
            raise InvalidArgument("WritePages needs a segment id and a writer token")
        segment = self.held_home(header.id)
        self.check_peer(peer, segment, "rw")
        header.caller.CopyFrom(peer.caller(header.caller))
        return segment

    def bulk_write(self, segment_id: int, header: bytes, runs: list[tuple[int, int]],
                   peer: Peer, receive: Callable[[int], memoryview]) -> bytes:
        """A remote writer's publish over the bulk channel (node/bulk.py ``WriteSink``):
        WritePages' checks, then its publish once every byte arrived."""
        try:
            parsed = node_pb2.WritePagesHeader.FromString(header)
        except DecodeError:
            raise InvalidArgument("malformed WritePagesHeader in a bulk write") from None
        if parsed.id != segment_id:
            raise InvalidArgument(f"bulk write of segment id {segment_id} with the header "
                                  f"of id {parsed.id}")
        segment = self.write_home(parsed, peer)
        total = check_runs(runs, segment.size)
        started = time.perf_counter()
        pieces = pieces_of(runs, receive(total))
        return self.writers.write_pages(segment, parsed, pieces, started).SerializeToString()

    def check_peer(self, peer: Peer, segment, mode: str) -> None:
        """PermissionDenied unless ``peer`` may use the pages of home ``segment`` in
        ``mode`` ("r" or "rw") over TCP.

        An agent asks for its own callers, which it checked against the record
        before asking (and it may hold replicas of anything): believed. A user
        certificate is checked here, against the coordinator's current record (not
        this agent's cached copy: a chmod elsewhere must hold at once).
        """
        peer.require((PeerKind.NODE, PeerKind.USER), "use segment pages")
        if peer.kind is not PeerKind.USER:
            return
        info = self.coordinator.get_segment(segment.info.name)
        if info.id != segment.info.id:
            raise NotFound(f"segment {segment.info.name} (id {segment.info.id}) not found")
        check_peer_access(info, peer, mode)
