"""Home segments: create, attach, delete, ttl expiry and keeping their records current.

The home agent is the authority for the cached records of its segments; it does
not watch the coordinator (streaming every change to every agent costs each
create and delete about a millisecond of CPU). Changes reach it instead by: its
own requests; ``Node.ReleaseSegment`` (a delete made through another agent);
``Node.SegmentChanged`` (a chmod/chown made elsewhere: re-read the record); the
expiry timer (ttl); and a lazy re-read of records not read for a while
(``recheck_stale``, from the heartbeat: the safety net for a lost notification).

News about an id not held yet while a create is in flight (a ReleaseSegment or
SegmentChanged can overtake the CreateSegment response) is kept by id
(tombstones) and applied when the create finishes; when no create is in flight
any more, the remaining deletes are finished and the tombstones dropped.

Life cycle (node/segments.py): LIVE -> DELETING -> FREED, one verb per step:
``begin_delete`` (no new attaches; freed now if unattached or forced) and
``_free`` (the memory goes, then the record if it waits for FinishDelete). The
delete of an unattached segment first ``claim``s it (CLAIMED: attaches are
refused while the coordinator call runs): the record and the pages then go in
one coordinator call, or it is LIVE again if the coordinator refuses.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import threading
import time

from vas.core.errors import AlreadyExists, Busy, NotFound, Unavailable, VasError
from vas.node import locks, metrics
from vas.node.access import check_access
from vas.node.datadir import Damage
from vas.node.publish import hashes, zero_hashes
from vas.node.revoke import Guard, pidfd_of
from vas.node.segments import HomeSegment, HomeState, WriterState
from vas.node.store import Memory
from vas.node.timer import Timer
from vas.node.writers import PARALLEL_COPY_MIN
from vas.proto import types_pb2

log = logging.getLogger(__name__)

#: A create that says its caller copies every byte in at once (``allocate_on_write``)
#: leaves pages unreserved from this size on: the size from which ``WriteFrom`` copies
#: into the agent's mapping on two threads (node/writers.py), so each page is
#: allocated by that copy (``_allocate``).
ALLOCATE_ON_WRITE_MIN = PARALLEL_COPY_MIN
#: Ids of home segments changed while a create may still be in flight.
_MAX_TOMBSTONES = 4096
#: What a tombstone remembers of an id: it was deleted (free it and FinishDelete),
#: or its record changed (re-read it).
_DELETED, _CHANGED = "deleted", "changed"
#: Seconds after a ttl segment's expiry before its record is re-read (etcd checks
#: for expired leases every 500 ms), and the longest pause between re-reads of a
#: record that outlived its expiry.
_EXPIRY_MARGIN = 0.2
_EXPIRY_RETRY_MAX = 5.0
#: Seconds between looks at the attachment reports of a deleted segment that other
#: nodes still have attached (their agents report a detach within ~50 ms).
ELSEWHERE_RECHECK = 0.25
#: Seconds a delete waits, looking every ``ELSEWHERE_RECHECK / 5``, for the reports of
#: other nodes' attachments to clear before leaving the segment deleting: a reader
#: there that detached just before (its report not in yet) must not keep the name taken.
ELSEWHERE_GRACE = 1.0
#: ``recheck_stale`` re-reads at most this many records per call, those not read
#: for ``RECHECK_AGE`` seconds.
RECHECK_BATCH = 8
RECHECK_AGE = 60.0
#: Home segments asked about per CheckSegments call (``check_all``).
CHECK_BATCH = 128
#: How many answered reads (one per heartbeat) look for the record of a create that
#: was answered Unavailable (``settle_doubted``).
DOUBT_READS = 2


class HomeSegments:
    """The segments this agent is home for (see the module docstring).

    Locking: ``_lock`` (rank HOMES) guards the tables (by name, by id), the
    creates in flight, the tombstones and the FinishDelete calls to retry; each
    segment's own lock guards its state. No lock is held across a coordinator call.
    """

    def __init__(self, node_id: str, config, store, coordinator, sessions, writers,
                 reporter, replicas, notices, cleanup_timeout, data_dir=None):
        self.node_id = node_id
        self.config = config
        self.store = store
        self.coordinator = coordinator
        self.sessions = sessions
        self.writers = writers
        self.reporter = reporter
        self.replicas = replicas          # make_room: creates may evict idle replicas
        self.notices = notices            # the replicas elsewhere of what is freed here
        self._cleanup_timeout = cleanup_timeout
        self.data_dir = data_dir          # node/datadir.py: home segments in files, or None
        self._lock = locks.Lock("homes", locks.Rank.HOMES)
        self._by_name: dict[str, HomeSegment] = {}
        self._by_id: dict[int, HomeSegment] = {}
        self._creating: dict[str, threading.Event] = {}  # name -> set when its create ends
        self._tombstones: collections.OrderedDict[int, tuple[str, str]] = \
            collections.OrderedDict()
        self._unfinished: dict[int, str] = {}  # FinishDelete to retry: id -> name
        self._doubted: dict[str, int] = {}  # creates answered Unavailable: name -> reads left
        self._last_size = 0  # of the last create (see _expect)
        self.expiry = Timer(self._expire, "expiry")
        self.elsewhere = Timer(self._recheck_elsewhere, "attached elsewhere")

    # ------------------------------------------------------------------ lookups

    def find(self, name: str) -> HomeSegment | None:
        """The home segment ``name`` (any state), or None if not homed here."""
        with self._lock:
            return self._by_name.get(name)

    def find_created(self, name: str) -> HomeSegment | None:
        """``find``, after waiting (at most the rpc timeout) for a create of ``name`` in
        flight here: its record is visible in the cluster before its reply arrives."""
        with self._lock:
            creating = self._creating.get(name)
        if creating is not None:
            creating.wait(self.config.rpc_timeout)
        return self.find(name)

    def held(self, segment_id: int) -> HomeSegment:
        """Home segment ``segment_id`` while its memory is held; NotFound otherwise."""
        with self._lock:
            segment = self._by_id.get(segment_id)
        if segment is None or segment.state is HomeState.FREED:
            raise NotFound(f"segment id {segment_id} is not held by node {self.node_id}")
        segment.check_intact()
        return segment

    def all(self) -> list[HomeSegment]:
        with self._lock:
            return list(self._by_id.values())

    # ------------------------------------------------------------------ create

    def create(self, caller, name: str, size: int, mode: int, replicas: int, ttl: float,
               exist_ok: bool, meta: dict[str, str] | None = None, *,
               allocate_on_write: bool = False) -> types_pb2.SegmentInfo:
        """Reserve room, make the memfd, then the record (home = here, owner = caller).

        Any failure gives the memory and the reservation back. ``exist_ok``
        returns the existing record instead of AlreadyExists. ``allocate_on_write``:
        the caller copies every byte in at once (``_allocate``).
        """
        existing = self.find(name)
        if existing is not None and existing.state in (HomeState.LIVE, HomeState.CLAIMED):
            if not exist_ok:
                raise AlreadyExists(f"segment {name} already exists")
            return existing.info
        self.replicas.release_spare(self.replicas.make_room(size, name))
        try:
            memory = self._allocate(name, size, allocate_on_write)
        except BaseException:
            self.store.unreserve(size)
            raise
        with self._lock:
            created = self._creating[name] = threading.Event()
        started = time.monotonic()
        try:
            # The node lease proves to the coordinator that this agent, which holds the
            # memory, makes the record (a record is never ready without memory).
            info = self.coordinator.create_segment(caller=caller, name=name, size=size,
                                                   mode=mode, home=self.node_id,
                                                   replicas=replicas, ttl_seconds=ttl,
                                                   lease_id=self.reporter.lease_id,
                                                   meta=meta or {})
        except BaseException as exc:
            self.store.unreserve(size)
            memory.release()
            if isinstance(exc, Unavailable):
                with self._lock:
                    self._doubted[name] = DOUBT_READS
            self._settle(self._create_done(name, created))
            if isinstance(exc, AlreadyExists) and exist_ok:
                return self.coordinator.get_segment(name)
            raise
        if info.size != size:  # the coordinator rounds like we do; never hand out a short fd
            log.error("coordinator created %s with size %d, not %d", name, info.size, size)
        segment = HomeSegment(info, memory)
        if info.backups:  # what they hold: zeros, like these new pages
            segment.pushed_hashes = zero_hashes(size)
        self.store.hold(size)
        with self._lock:
            self._by_name[name] = segment
            self._by_id[info.id] = segment
            news = self._tombstones.pop(info.id, None)
        leftover = self._create_done(name, created)
        if info.backups:  # create returns once they hold their copies (or are dropped)
            self._hold_backups(segment)
        if info.expires:  # the lease was granted after ``started``: it cannot expire before
            self.expiry.arm(info.id, started + (info.expires - info.created) + _EXPIRY_MARGIN)
        if self.data_dir is not None:
            self._keep(segment)
        if news is not None:
            self._apply_news(segment, news[0])
        self._settle(leftover)
        return info

    def _allocate(self, name: str, size: int, allocate_on_write: bool = False) -> Memory:
        """The memory of a new home segment: a file of the data dir, else a memfd (from
        the warm pool when prepared).

        A fresh memfd has every page reserved (``fallocate``), except for a segment of
        ``ALLOCATE_ON_WRITE_MIN`` bytes or more whose creator copies every byte in at
        once (``allocate_on_write``: a put of an array, whose ``WriteFrom`` copies into
        the agent's mapping). Its pages are then allocated by that copy, each as it is
        written: one pass over fresh memory instead of two (``fallocate``, then the
        copy's faults zeroing each page before writing it). A 1 GiB put into fresh
        memory took 0.53-0.90 s so against 0.67-1.03 s on the development VM (six runs
        each). Safe for the agent: the copy's page faults are the kernel's own
        (``process_vm_readv``), so memory the kernel cannot give fails the copy
        (EFAULT: the put fails and deletes the segment), never a SIGBUS."""
        if self.data_dir is not None:
            return self.data_dir.allocate(name, size)
        memory = self.replicas.pool.take(size)
        if memory is None:
            sparse = allocate_on_write and size >= ALLOCATE_ON_WRITE_MIN
            memory = Memory.allocate(name, size, reserve=not sparse, mapped=sparse)
        self._expect(size)
        return memory

    def _keep(self, segment: HomeSegment) -> None:
        """Name a new segment's file by its id and write its manifest, before the create
        is acknowledged; if that fails the segment and its record go again."""
        try:
            zeros = self.data_dir.keep(segment.memory, segment.info)
        except OSError as exc:
            self.begin_delete(segment, finish=True, force=True)
            raise Unavailable(f"cannot keep segment {segment.name} in --data-dir "
                              f"{self.data_dir.path}: {exc.strerror or exc}") from exc
        with segment.lock:
            segment.kept_hashes = zeros

    def _hold_backups(self, segment: HomeSegment) -> None:
        """Have the backup nodes of new ``segment`` make their copies; those that cannot
        are dropped from the record (it reads degraded)."""
        try:
            info = self.writers.backup_push.hold(segment.info)
        except VasError as exc:  # the record still names them: the next sync drops them
            log.warning("segment %s: cannot settle its backups: %s", segment.name, exc)
            return
        with segment.lock:
            segment.info = info

    def adopt_promoted(self, info: types_pb2.SegmentInfo, memory: Memory) -> HomeSegment:
        """Make ``memory`` (a promoted backup's, holding version ``info.version``, its
        capacity held already) the home segment of ``info``, whose record names this
        node home now."""
        segment = HomeSegment(info, memory)
        if info.backups:
            with segment.pages() as view:
                segment.pushed_hashes = hashes(view)
        with self._lock:
            self._by_name[info.name] = segment
            self._by_id[info.id] = segment
        if info.expires:
            left = max(0.0, info.expires - time.time())
            self.expiry.arm(info.id, time.monotonic() + left + _EXPIRY_MARGIN)
        log.warning("now home of segment %s (id %d, version %d): its backup here was "
                    "promoted", info.name, info.id, info.version)
        return segment

    def _expect(self, size: int) -> None:
        """After a create of ``size`` bytes: when the one before had that size too (shards),
        have the warm pool prepare the next one. Not after a first or one-off create, nor
        after one that replaced a freed segment of its size (``_replaced`` asks at the
        next free): preparing a GiB costs ~1 s of CPU beside what the node serves."""
        with self._lock:
            again, self._last_size = self._last_size == size, size
        if again:
            self.replicas.pool.want(size)

    def _replaced(self, size: int) -> None:
        """A segment of ``size`` bytes was freed: the next create of that size is likely
        its replacement (rounds of ``vas.ray.put``, a dataset rewritten), so have the
        warm pool prepare one now, between that delete and the create, rather than
        beside the create's readers; that create then counts as a first one (it does not
        ask the pool again). With a data dir creates never take from the pool."""
        if self.data_dir is not None:
            return
        with self._lock:
            if self._last_size == size:
                self._last_size = 0
        self.replicas.pool.want(size)

    def _create_done(self, name: str, created: threading.Event) -> list[tuple[int, str]]:
        """The create of ``name`` left flight; when it was the last, drop the tombstones
        and return the ids (with names) whose FinishDelete is still due."""
        with self._lock:
            if self._creating.get(name) is created:
                del self._creating[name]
            created.set()
            if self._creating or not self._tombstones:
                return []
            leftover = [(segment_id, name) for segment_id, (news, name)
                        in self._tombstones.items() if news == _DELETED]
            self._tombstones.clear()
        return leftover

    def _settle(self, leftover: list[tuple[int, str]]) -> None:
        """Finish deletes of ids homed here that no create turned out to hold."""
        for segment_id, name in leftover:
            log.info("segment %s (id %d) is homed here but not held; finishing its delete",
                     name, segment_id)
            self.finish_delete(name, segment_id)

    def _apply_news(self, segment: HomeSegment, news: str) -> None:
        if news == _CHANGED:
            try:
                self.recheck(segment)
            except VasError as exc:  # recheck_stale catches up later
                log.warning("cannot re-read segment %s: %s", segment.name, exc)
        else:
            log.info("segment %s (id %d) was deleted during its create", segment.name,
                     segment.id)
            self.begin_delete(segment, finish=True, force=True)

    def _tombstone(self, segment_id: int, name: str, news: str) -> bool:
        """Remember ``news`` of an id not held, if a create in flight may hold it;
        whether it was remembered. A delete outranks a change."""
        with self._lock:
            if not self._creating:
                return False
            known = self._tombstones.get(segment_id)
            if news == _CHANGED and known is not None:
                return True
            if known is None or known[0] != _DELETED:
                self._tombstones[segment_id] = (news, name)
            while len(self._tombstones) > _MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)
            return True

    # ------------------------------------------------------------------ restart

    def adopt(self, stored, record: types_pb2.SegmentInfo | None) -> None:
        """Hold ``stored``, a segment found in the data dir at start (node/datadir.py),
        if ``record`` (its coordinator record now, None if gone or marked lost) still
        names it; otherwise remove its files. Runs before registering; the caller
        checked that everything stored fits in ``--memory``.

        Chunks that failed their checksum are reported (log, metric) and the segment
        is held but never served (``HomeSegment.damage``): delete it.
        """
        manifest, memory = stored.manifest, stored.memory
        why = _not_adoptable(record, manifest["id"], self.node_id)
        if why:
            log.info("segment %s (id %d) in the data dir is not kept: %s", manifest["name"],
                     manifest["id"], why)
            memory.release()
            return
        self.store.reserve(memory.size, record.name)
        self.store.hold(memory.size)
        segment = HomeSegment(record, memory)
        segment.kept_hashes = stored.kept
        if stored.failed:
            segment.damage = Damage(stored.failed, manifest["version"], self.node_id)
            metrics.CHUNKS_FAILED.inc(len(stored.failed))
            log.error("%s", segment.damage.error(record.name))
        if record.version > manifest["version"]:
            log.warning("segment %s: version %d was published but never kept (the agent died "
                        "before that sync returned); serving the bytes of version %d",
                        record.name, record.version, manifest["version"])
        with self._lock:
            self._by_name[record.name] = segment
            self._by_id[record.id] = segment
        if record.expires:
            left = max(0.0, record.expires - time.time())
            self.expiry.arm(record.id, time.monotonic() + left + _EXPIRY_MARGIN)
        log.info("adopted segment %s (id %d, version %d) from the data dir", record.name,
                 record.id, record.version)

    # ------------------------------------------------------------------ attach / detach

    def attach_reader(self, session, segment: HomeSegment) -> tuple[object, int]:
        """An "r" attachment of ``segment`` and a dup of its read-only fd (the hot path:
        no coordinator call)."""
        with segment.lock:
            self._check_attachable_locked(session, segment, "r")
            fd = os.dup(segment.ro_fd)
            segment.attachments += 1
            attachment = self.sessions.add(session, segment, "r")
        self.reporter.mark(segment)
        return attachment, fd

    def attach_writer(self, session, segment: HomeSegment,
                      write_protect: bool) -> tuple[object, int]:
        """The "rw" attachment of ``segment`` (the cluster-wide writer lock is taken first)
        and a dup of its writable fd.

        The attachment is revocable (node/revoke.py): its writer maps the home
        pages themselves, so the client must be able to have that mapping
        write-protected when the lock is revoked (``write_protect``); a client
        that cannot is refused, never handed an unfenced mapping.
        """
        with segment.lock:
            self._check_attachable_locked(session, segment, "rw")
            if self.data_dir is not None and self.data_dir.no_write_protect:
                raise Unavailable(
                    f"segment {segment.name} is homed on this node, whose --data-dir "
                    f"{self.data_dir.path} cannot take a revocable \"rw\" mapping: "
                    f"{self.data_dir.no_write_protect}; attach \"rw\" from another node "
                    "instead")
            if not write_protect:
                raise Unavailable(
                    f'segment {segment.name} is homed on this node: a "rw" attach here needs '
                    "userfaultfd write-protection of shared memory in the calling process "
                    "(Linux 5.19 or later, userfaultfd allowed, VAS_DISABLE_USERFAULTFD unset) "
                    "so that its stores can be revoked with its lock; attach \"rw\" from "
                    "another node instead")
            if segment.writer_state is not WriterState.FREE:
                raise Busy(f'segment {segment.name} is already attached "rw" on node '
                           f'{self.node_id}')
            segment.writer_state = WriterState.ACQUIRING
        try:
            lease = self.writers.acquire(session.caller, segment.name)
            try:
                self._writer_mapped(segment, True)  # before the fd is handed out
            except BaseException:
                self.writers.release(lease)
                raise
        except BaseException:
            with segment.lock:
                segment.free_writer_locked()
            raise
        guard = Guard(segment.name, session.pid, pidfd_of(session))
        try:
            with segment.lock:
                segment.free_writer_locked()
                if segment.state is not HomeState.LIVE:
                    raise NotFound(f"segment {segment.name} is being deleted")
                fd = os.dup(segment.fd)
                segment.attachments += 1
                attachment = self.sessions.add(session, segment, "rw", lease, guard)
                segment.take_writer_locked(attachment)
        except BaseException:
            guard.close()
            self.writers.release(lease)
            raise
        self.writers.track(attachment)
        self.reporter.mark(segment)
        return attachment, fd

    def writer_unmapped(self, segment: HomeSegment) -> None:
        """The home writer of ``segment`` detached (its process unmapped first): a
        restart need not move the file out of its reach any more. Only a Detach says
        so: after an EOF or a revocation the process may still map it."""
        try:
            self._writer_mapped(segment, False)
        except VasError as exc:  # kept set: it only costs a copy at the next start
            log.info("segment %s: writer mark not cleared: %s", segment.name, exc)

    def _writer_mapped(self, segment: HomeSegment, mapped: bool) -> None:
        """Keep in the manifest whether a home writer may map the file (node/datadir.py
        ``mark_writer``); in the segment's gate, so a publish's manifest agrees."""
        if self.data_dir is None:
            return
        with segment.gate.passage(self.config.rpc_timeout, f"writer of segment {segment.name}"):
            try:
                self.data_dir.mark_writer(segment.id, mapped)
            except OSError as exc:
                raise Unavailable(f"cannot note the writer of segment {segment.name} in "
                                  f"--data-dir {self.data_dir.path}: {exc.strerror or exc}") \
                    from exc
            with segment.lock:
                segment.writer_mapped = mapped

    def current_version(self, session, segment: HomeSegment) -> int:
        """The version of ``segment`` if ``session`` may attach it "r" now (it is kept
        mapped by Client.switch: see Agent.revalidate); else the attach's error."""
        with segment.lock:
            self._check_attachable_locked(session, segment, "r")
            return segment.info.version

    def _check_attachable_locked(self, session, segment: HomeSegment, mode: str) -> None:
        if segment.state is not HomeState.LIVE:
            raise NotFound(f"segment {segment.name} is being deleted")
        check_access(segment.info, session, mode)
        segment.check_intact()

    def detached(self, attachment) -> None:
        """``attachment`` of a home segment ended: count it out; free at the last detach
        of a deleting segment."""
        segment = attachment.segment
        with segment.lock:
            segment.attachments -= 1
            segment.free_writer_locked(attachment)
            free = (segment.state is HomeState.DELETING and segment.attachments <= 0
                    and not segment.attached_elsewhere)
            if free:
                segment.move(HomeState.FREED)
        self.reporter.mark(segment)
        if free:
            self._free(segment)

    # ------------------------------------------------------------------ delete

    def claim(self, session, name: str) -> HomeSegment | None:
        """The unattached home segment ``name``, claimed for a delete by its owner (or
        root), else None. The common delete: nobody holds the segment, so the record
        can go in the same coordinator call as the owner check (one etcd
        transaction, no FinishDelete) and the pages right after."""
        segment = self.find(name)
        if segment is None:
            return None
        with segment.lock:
            if (segment.state is not HomeState.LIVE or segment.attachments
                    or segment.writer_state is not WriterState.FREE
                    or session.uid not in (0, segment.info.uid)):
                return None
            segment.move(HomeState.CLAIMED)
        return segment

    def delete_claimed(self, caller, segment: HomeSegment, force: bool = False
                       ) -> tuple[types_pb2.SegmentInfo, bool]:
        """Remove the record of a claimed segment, then free it — or, when other nodes
        have it attached (and not ``force``), the coordinator only marks it and it is
        freed once they detached. (The record as the delete left it, whether the pages
        are freed now.) If the coordinator refuses (the cache was stale), the segment
        is deleted the slow way: marked and freed once the record says so."""
        try:
            info = self.coordinator.delete_segment(caller=caller, name=segment.name,
                                                   finish=True, id=segment.id, force=force)
        except VasError:
            with segment.lock:  # refused (e.g. a stale owner in the cache): it lives on
                if segment.state is HomeState.CLAIMED:
                    segment.move(HomeState.LIVE)
            raise
        elsewhere = _attached_beside(info, self.node_id)
        # Attached on other nodes: the record was only marked; freed (and the record
        # removed) once they detached.
        return info, self.begin_delete(segment, finish=elsewhere, force=False,
                                       elsewhere=elsewhere)

    def release(self, name: str, segment_id: int, force: bool) -> bool:
        """Free home segment ``segment_id`` once unattached (at once if ``force``).

        Called for a local delete and by another agent (Node.ReleaseSegment).
        True when freed now. NotFound if this agent does not hold that id (and no
        create in flight may turn out to hold it).
        """
        with self._lock:
            segment = self._by_id.get(segment_id)
        if segment is None:
            if self._tombstone(segment_id, name, _DELETED):
                return False  # the create in flight (or _settle) frees and finishes it
            raise NotFound(f"segment {name} (id {segment_id}) is not held by node "
                           f"{self.node_id}")
        return self.begin_delete(segment, finish=True, force=force)

    def begin_delete(self, segment: HomeSegment, *, finish: bool, force: bool,
                     elsewhere: bool | None = None) -> bool:
        """Mark ``segment`` deleting; free it now if unattached (here and on every other
        node) or ``force``. True once it is freed (by this call or one before it).

        ``finish``: call FinishDelete after the pages are gone: it removes the
        record if it is still there and names the nodes holding replicas, which
        are then told (False only when a call made here removed the record and
        told them already, or the record is another home's).
        ``elsewhere``: whether other nodes report attachments of it (None: read the
        record to know, when ``finish`` and not ``force``). While they do, the pages
        stay, their lazy replicas keep fetching them, and ``ELSEWHERE_RECHECK``
        looks again (``_recheck_elsewhere``).
        """
        if elsewhere is None:
            elsewhere = finish and not force and self._attached_elsewhere(segment)
        if elsewhere and not force:
            elsewhere = self._still_attached_elsewhere(segment)
        revoked = None
        with segment.lock:
            segment.finish_record = segment.finish_record or finish
            if segment.state in (HomeState.LIVE, HomeState.CLAIMED):
                segment.move(HomeState.DELETING)
            freed_before = segment.state is HomeState.FREED
            segment.attached_elsewhere = elsewhere and not force
            free_now = not freed_before and (
                force or (segment.attachments <= 0 and not segment.attached_elsewhere))
            if free_now:
                revoked = segment.writer
                segment.free_writer_locked()
                segment.move(HomeState.FREED)
            attached = segment.attachments
        self._unname(segment)
        if freed_before:  # another thread frees it: return once done, so the name is free
            segment.done.wait(self.config.rpc_timeout)
            return True
        if not free_now:
            log.info("segment %s (id %d) deleting: freed at its last detach (%d attached "
                     "here%s)", segment.name, segment.id, attached,
                     ", more on other nodes" if segment.attached_elsewhere else "")
            if segment.attached_elsewhere:
                self.elsewhere.arm(segment.id, time.monotonic() + ELSEWHERE_RECHECK)
            return False
        if attached:
            log.info("segment %s (id %d) force-deleted with %d attachments", segment.name,
                     segment.id, attached)
        if revoked is not None:  # force: the writer loses its lock now
            self.writers.revoke(revoked)
        self.reporter.mark(segment)
        self._free(segment)
        return True

    def _attached_elsewhere(self, segment: HomeSegment) -> bool:
        """Whether nodes other than this one report attachments of ``segment`` (its
        record, read now, names them); True when the coordinator cannot say (the
        pages are kept: the next look decides)."""
        try:
            info = self.coordinator.find_segment(segment.name)
        except VasError as exc:
            log.info("cannot read the record of deleted segment %s: %s; keeping it until "
                     "the next look", segment.name, exc)
            return True
        return info is not None and info.id == segment.id and _attached_beside(info, self.node_id)

    def _still_attached_elsewhere(self, segment: HomeSegment) -> bool:
        """``_attached_elsewhere`` once the reports had ``ELSEWHERE_GRACE`` to clear."""
        deadline = time.monotonic() + ELSEWHERE_GRACE
        while time.monotonic() < deadline:
            time.sleep(ELSEWHERE_RECHECK / 5)
            if not self._attached_elsewhere(segment):
                return False
        return True

    def _recheck_elsewhere(self, segment_id: int, _retries: int) -> None:
        """The ``elsewhere`` timer: free a deleted segment once the other nodes detached
        (or their reports went with their lease), else look again later."""
        with self._lock:
            segment = self._by_id.get(segment_id)
        if segment is None or not segment.attached_elsewhere:
            return
        elsewhere = self._attached_elsewhere(segment)
        with segment.lock:
            if segment.state is not HomeState.DELETING:
                return
            segment.attached_elsewhere = elsewhere
            free = not elsewhere and segment.attachments <= 0
            if free:
                segment.move(HomeState.FREED)
        if free:
            log.info("segment %s (id %d): the other nodes detached; freeing it",
                     segment.name, segment.id)
            self.reporter.mark(segment)
            self._free(segment)
        elif elsewhere:
            self.elsewhere.arm(segment_id, time.monotonic() + ELSEWHERE_RECHECK)

    def _unname(self, segment: HomeSegment) -> None:
        with self._lock:
            if self._by_name.get(segment.name) is segment:
                del self._by_name[segment.name]

    def _free(self, segment: HomeSegment, *, keep: bool = False) -> None:
        """Give back the memory of a FREED segment and, if due, finish its delete.
        ``keep`` (shutdown): a file of the data dir stays for the next start."""
        try:
            self.store.drop(segment.size)
            if keep:
                segment.memory.close()
            else:
                segment.memory.release()
                self._replaced(segment.size)
            log.debug("freed segment %s (id %d, %d bytes)", segment.name, segment.id,
                      segment.size)
            with self._lock:
                if self._by_id.get(segment.id) is segment:
                    del self._by_id[segment.id]
            if segment.finish_record:
                self.finish_delete(segment.name, segment.id)
        finally:
            segment.done.set()

    def finish_delete(self, name: str, segment_id: int) -> None:
        """Remove the coordinator's record of a freed segment (retried in the background)
        and tell the nodes holding replicas of it."""
        try:
            copies = self.coordinator.finish_delete(name, segment_id, self._cleanup_timeout())
            with self._lock:
                self._unfinished.pop(segment_id, None)
            self.notices.tell(name, segment_id, copies)
        except VasError as exc:
            log.warning("FinishDelete of %s (id %d) failed: %s; will retry", name, segment_id,
                        exc)
            with self._lock:
                self._unfinished[segment_id] = name

    def settle_doubted(self) -> None:
        """Remove the records of creates that were answered Unavailable and stored all
        the same: the coordinator gave up waiting for etcd (paused, slow) and etcd
        applied the transaction later. The memory went back when the call failed, so
        such a record, homed here and not held, has nothing behind it: FinishDelete
        removes it (compared on its id). Each name is read at DOUBT_READS heartbeats
        that the coordinator answers; a create of that name in flight, or one done
        meanwhile, is left alone."""
        with self._lock:
            doubted = list(self._doubted)
        for name in doubted:
            try:
                info = self.coordinator.get_segment(name)
            except NotFound:
                info = None
            except VasError:
                return  # not answering yet: the next beat reads again
            with self._lock:
                held = self._by_name.get(name)
                busy = name in self._creating
                orphan = (info is not None and info.home == self.node_id and not busy
                          and (held is None or held.id != info.id))
                left = self._doubted.pop(name, 1) - 1
                if left > 0 and not orphan:
                    self._doubted[name] = left
            if orphan:
                log.warning("segment %s (id %d) was created after its create was answered "
                            "Unavailable; removing its record (no memory is behind it)",
                            name, info.id)
                self.finish_delete(name, info.id)

    def retry_unfinished(self) -> None:
        with self._lock:
            unfinished = dict(self._unfinished)
        for segment_id, name in unfinished.items():
            self.finish_delete(name, segment_id)

    def free_all(self) -> None:
        """Free every held segment (at shutdown, after the sessions are closed); the
        records stay (the node's lease going makes them ``lost`` until a start on the
        same data dir adopts them again; without one their memory is gone)."""
        for segment in self.all():
            with segment.lock:
                if segment.state is HomeState.FREED:
                    continue
                if segment.state is not HomeState.DELETING:
                    segment.move(HomeState.DELETING)
                segment.move(HomeState.FREED)
                segment.finish_record = False
            self._free(segment, keep=True)

    # ------------------------------------------------------------------ record changes

    def segment_changed(self, name: str, segment_id: int) -> None:
        """The record of home segment ``segment_id`` changed elsewhere: re-read it now.
        NotFound if this agent does not hold that id (and no create in flight may)."""
        with self._lock:
            segment = self._by_id.get(segment_id)
        if segment is None:
            if self._tombstone(segment_id, name, _CHANGED):
                return  # the create in flight re-reads it
            raise NotFound(f"segment {name} (id {segment_id}) is not held by node "
                           f"{self.node_id}")
        self.recheck(segment)

    def changed_here(self, info: types_pb2.SegmentInfo) -> None:
        """A chmod/chown of home segment ``info`` made through this agent: bring the
        cached record up to date (re-read: a later change may have landed; the
        call's answer is kept if the re-read fails)."""
        with self._lock:
            segment = self._by_id.get(info.id)
        if segment is None:
            return
        try:
            self.recheck(segment)
        except VasError as exc:
            log.warning("cannot re-read segment %s: %s; keeping the changed record",
                        info.name, exc)
            with segment.lock:
                if segment.state is HomeState.LIVE:
                    segment.info = info

    def recheck(self, segment: HomeSegment) -> bool:
        """Re-read the record of ``segment`` and act on it; True if it lives on.

        Same id, not deleting: adopt it as the cached record (unless a read started
        later was adopted already). Marked deleting: free it (at once if
        unattached, else at the last detach) and finish the delete. Gone, or the
        name now has another id (ttl expiry, a lost delete): free it likewise;
        the FinishDelete after it removes nothing but names the nodes holding
        replicas, to be told. Raises VasError when the coordinator cannot answer.
        """
        with segment.lock:
            if segment.state is not HomeState.LIVE:
                return False
            segment.read_ticket += 1
            ticket = segment.read_ticket
        try:
            info = self.coordinator.get_segment(segment.name)
        except NotFound:
            info = None
        current = info is not None and info.id == segment.id
        if current and info.home != self.node_id:
            self._promoted_elsewhere(segment, info.home)
            return False
        with segment.lock:
            segment.checked = time.monotonic()
            if current and ticket > segment.adopted_ticket and segment.state is HomeState.LIVE:
                segment.adopted_ticket = ticket
                info.version = max(info.version, segment.info.version)
                segment.info = info
        if not current:
            log.info("segment %s (id %d) was removed from the cluster (ttl or delete)",
                     segment.name, segment.id)
            self.begin_delete(segment, finish=True, force=False)
            return False
        if info.state == types_pb2.SEGMENT_STATE_DELETING:
            self.begin_delete(segment, finish=True, force=False)
            return False
        return True

    def _promoted_elsewhere(self, segment: HomeSegment, home: str) -> None:
        """The record of ``segment`` names another home: a backup was promoted while this
        node was cut off (its lease lapsed). These pages are a stale copy now: no new
        attach gets them, they go at the last detach, and the record stays (it is the
        new home's)."""
        log.warning("segment %s (id %d) is homed on node %s now (a backup was promoted while "
                    "this node was away): dropping the copy here", segment.name, segment.id,
                    home)
        self.begin_delete(segment, finish=False, force=False)

    def check_all(self) -> None:
        """After registering again: free every held home segment whose record is gone,
        of another id, deleting or lost (CheckSegments, CHECK_BATCH at a time). A lapsed
        lease may hide a delete whose notice never came, and an etcd restored from a
        snapshot has no record of what was created after it: that memory is orphaned.
        When the coordinator cannot answer, ``recheck_stale`` re-reads them instead."""
        live = [segment for segment in self.all() if segment.state is HomeState.LIVE]
        for first in range(0, len(live), CHECK_BATCH):
            batch = live[first:first + CHECK_BATCH]
            try:
                gone = set(self.coordinator.check_segments([(s.name, s.id) for s in batch]))
            except VasError as exc:
                log.warning("cannot check %d home segments: %s; re-reading them one by one",
                            len(live) - first, exc)
                for segment in live[first:]:
                    with segment.lock:
                        segment.checked = -math.inf
                return
            for segment in batch:
                if segment.id in gone:
                    log.info("segment %s (id %d) homed here is gone from the cluster; "
                             "freeing it", segment.name, segment.id)
                    self.begin_delete(segment, finish=True, force=False)
                elif segment.info.backups:  # one may have been promoted meanwhile
                    try:
                        self.recheck(segment)
                    except VasError as exc:  # recheck_stale reads it later
                        log.warning("cannot re-read segment %s: %s", segment.name, exc)

    @contextlib.contextmanager
    def doubtful(self, name: str):
        """Around a call that changes the record of ``name``: when it fails with
        Unavailable, etcd may still have applied it (a write whose answer timed out,
        e.g. while etcd was paused, is not a write refused), so a home segment of that
        name is re-read at the next heartbeat (``recheck_stale``) rather than after
        RECHECK_AGE: a delete that did land frees it, a chmod that did is adopted."""
        try:
            yield
        except Unavailable:
            segment = self.find(name)
            if segment is not None:
                with segment.lock:
                    segment.checked = -math.inf
            raise

    def recheck_stale(self) -> None:
        """Re-read a few records not read for a while (a lost notification heals)."""
        horizon = time.monotonic() - RECHECK_AGE
        stale = sorted((s for s in self.all()
                        if s.checked < horizon and s.state is HomeState.LIVE),
                       key=lambda segment: segment.checked)
        for segment in stale[:RECHECK_BATCH]:
            try:
                self.recheck(segment)
            except VasError as exc:
                log.warning("cannot re-read segment %s: %s", segment.name, exc)
                return

    def _expire(self, segment_id: int, retries: int) -> None:
        """A ttl segment's expiry passed: free it once etcd removed its record."""
        with self._lock:
            segment = self._by_id.get(segment_id)
        if segment is None:
            return
        try:
            alive = self.recheck(segment)
        except VasError as exc:
            log.warning("cannot re-read expired segment %s: %s; retrying", segment.name, exc)
            alive = True
        if alive:  # not removed yet (etcd's lease clock, a leader change): look again
            delay = min(_EXPIRY_MARGIN * 2 ** (retries + 1), _EXPIRY_RETRY_MAX)
            self.expiry.arm(segment_id, time.monotonic() + delay, retries + 1)


def _not_adoptable(record: types_pb2.SegmentInfo | None, segment_id: int, node_id: str) -> str:
    """Why a segment found in the data dir is not held again ("" if it is)."""
    if record is None:
        return ("its record is gone, deleting or marked lost (deleted, expired or declared "
                "lost while the agent was down)")
    if record.id != segment_id:
        return f"its name now belongs to segment id {record.id}"
    if record.home != node_id:
        return f"its record names node {record.home} as its home"
    if record.state == types_pb2.SEGMENT_STATE_DELETING:
        return "it is being deleted"
    return ""


def _attached_beside(info: types_pb2.SegmentInfo, node_id: str) -> bool:
    """Whether nodes other than ``node_id`` report attachments of ``info``'s segment."""
    return any(node != node_id for node in info.attached_nodes)
