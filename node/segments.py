"""What the agent holds: home segments and replicas, each with an explicit life cycle.

A **home segment** is the authoritative copy of a segment created through this
agent. A **replica** is this node's copy of a segment homed elsewhere (see
"Data plane" in docs/ARCHITECTURE.md). They are separate types because their
lives differ: a home segment ends with a delete (or ttl expiry) of its record,
a replica whenever it stops matching the record (a newer version, a delete, an
eviction, a writer's unpublished bytes).

Each has a state enum and one transition function, ``move``, that refuses a
move its table does not list:

    HomeState:    LIVE ──► DELETING ──► FREED        (LIVE ◄──► CLAIMED ──► DELETING)
    ReplicaState: CURRENT ──► RETIRED ──► FREED

LIVE / CURRENT: found by name and handed to new attaches. CLAIMED: the delete
of an unattached home segment is at the coordinator (attaches are refused; the
coordinator may still refuse the delete). DELETING / RETIRED:
no new attaches; the memory is given back at the last detach (at once when
unattached). FREED: the memory is gone.

Each object has its own lock (rank SEGMENT, node/locks.py) guarding its state,
attachment count, cached record and writer slot; no thread holds two of them.
The slow parts of a segment's life (network calls, hashing, punching pages)
run outside that lock; work that must not interleave across a network call
(publishing into the pages, refreshing them) passes through the segment's
``Gate`` instead: a state with a deadline, never a lock held across the call.
"""
from __future__ import annotations

import contextlib
import enum
import os
import threading
import time

from vas.core.errors import NotFound, Unavailable
from vas.node import locks
from vas.node.changes import COUNTER
from vas.node.store import Memory, read_only_view
from vas.proto import types_pb2


class IllegalMove(RuntimeError):
    """A life-cycle move its state table does not allow (a bug in the agent)."""


class HomeState(enum.Enum):
    LIVE = "live"
    CLAIMED = "claimed"  # an unattached segment's delete is at the coordinator
    DELETING = "deleting"
    FREED = "freed"


class ReplicaState(enum.Enum):
    CURRENT = "current"
    RETIRED = "retired"
    FREED = "freed"


_HOME_MOVES = {HomeState.LIVE: {HomeState.CLAIMED, HomeState.DELETING},
               HomeState.CLAIMED: {HomeState.LIVE, HomeState.DELETING},
               HomeState.DELETING: {HomeState.FREED},
               HomeState.FREED: set()}
_REPLICA_MOVES = {ReplicaState.CURRENT: {ReplicaState.RETIRED},
                  ReplicaState.RETIRED: {ReplicaState.FREED},
                  ReplicaState.FREED: set()}


class WriterState(enum.Enum):
    """The local writer slot of a held segment (the cluster-wide lock is in etcd)."""
    FREE = "free"
    ACQUIRING = "acquiring"  # a local "rw" attach waits for AcquireWriter
    HELD = "held"            # ``writer`` is the "rw" attachment


class Gate:
    """One piece of exclusive work at a time on a segment, without holding a lock
    across it: ``with gate.passage(timeout, what):`` waits at most ``timeout``
    seconds for the work before it (then Unavailable), and frees the gate on leaving.

    Used where the work spans a network call: a publish (PublishVersion, then the
    bytes) must not interleave with another publish or a hash read of the pages.
    """

    def __init__(self, lock):
        self._cv = threading.Condition(lock)
        self._busy = False

    def passage(self, timeout: float, what: str) -> "_Passage":
        return _Passage(self, timeout, what)

    def _enter(self, timeout: float, what: str) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: not self._busy, timeout):
                raise Unavailable(f"{what}: still busy with earlier work after {timeout:.0f} s")
            self._busy = True

    def _leave(self) -> None:
        with self._cv:
            self._busy = False
            self._cv.notify()


class _Passage:
    __slots__ = ("_gate", "_timeout", "_what")

    def __init__(self, gate: Gate, timeout: float, what: str):
        self._gate, self._timeout, self._what = gate, timeout, what

    def __enter__(self) -> None:
        self._gate._enter(self._timeout, self._what)

    def __exit__(self, *exc_info) -> None:
        self._gate._leave()


class _Held:
    """What home segments and replicas share: memory, record, attachments, writer slot.

    All fields but the immutable ones (name, id, size, memory) are guarded by ``lock``.
    """

    __slots__ = ("name", "id", "size", "memory", "info", "checked", "attachments",
                 "writer_state", "writer", "lock", "gate", "state")

    def __init__(self, info: types_pb2.SegmentInfo, memory: Memory):
        self.name = info.name
        self.id = info.id
        self.size = info.size
        self.memory = memory
        self.info = info
        self.checked = time.monotonic()  # when the record was last read
        self.attachments = 0
        self.writer_state = WriterState.FREE
        self.writer = None  # the "rw" Attachment while writer_state is HELD
        self.lock = locks.Lock(f"segment {info.name}", locks.Rank.SEGMENT)
        self.gate = Gate(self.lock)

    @property
    def fd(self) -> int:
        return self.memory.fd

    @property
    def ro_fd(self) -> int:
        return self.memory.ro_fd

    #: Legal moves of ``state`` (set by each subclass) and how errors name the kind.
    MOVES: dict = {}
    KIND = ""
    FREED = None  # the final state

    def dup_fd(self) -> int:
        """A dup of the writable memfd (the caller closes it); NotFound once FREED."""
        with self.lock:
            if self.state is self.FREED:
                raise NotFound(f"segment {self.name} (id {self.id}) is no longer held here")
            return os.dup(self.memory.fd)

    @contextlib.contextmanager
    def pages(self):
        """The segment's bytes as they are now, read-only, for the agent's own reads
        (hashing, sending); NotFound once FREED."""
        fd = self.dup_fd()
        try:
            with read_only_view(fd, self.size) as view:
                yield view
        finally:
            os.close(fd)

    def move(self, to) -> None:
        """The one transition function (the caller holds ``lock``): IllegalMove unless
        the state table lists ``state -> to``."""
        if to not in self.MOVES[self.state]:
            raise IllegalMove(f"{self.KIND} {self.name} (id {self.id}): {self.state.value} "
                              f"-> {to.value}")
        self.state = to

    def adopt_version_locked(self, version: int) -> None:
        """These pages now hold ``version`` (versions only grow)."""
        if version > self.info.version:
            self.info.version = version

    def take_writer_locked(self, attachment) -> None:
        self.writer_state, self.writer = WriterState.HELD, attachment

    def free_writer_locked(self, attachment=None) -> None:
        """Empty the writer slot (only if ``attachment`` holds it, when given)."""
        if attachment is None or self.writer is attachment:
            self.writer_state, self.writer = WriterState.FREE, None


class HomeSegment(_Held):
    """One segment this agent is home for.

    ``finish_record``: FinishDelete is due once the memory is gone (it removes
    the record if still there and names the nodes holding replicas; False when
    a call that removed the record already did both, and at shutdown).
    ``published_hashes``: (version, chunk hashes) cached for
    refreshing readers (node/writers.py); ``pushed_hashes``: those of the bytes
    its backups hold (node/backup_push.py). ``read_ticket``/``adopted_ticket``
    order re-reads of the record, so an older read never overwrites a newer one.
    ``done`` is set once the segment is FREED and its record finished.
    ``damage``: chunks that failed their checksum when the agent re-adopted the
    segment from its data dir (node/datadir.py): it is never served (``check_intact``).
    ``writer_mapped``: a home writer may map its data-dir file writable (kept in
    the manifest; changed in the segment's gate). ``kept_hashes``: the chunk
    hashes its manifest holds (the last publish kept; b"" without a data dir).
    """

    __slots__ = ("finish_record", "published_hashes", "pushed_hashes", "read_ticket",
                 "adopted_ticket", "done", "damage", "writer_mapped", "kept_hashes",
                 "attached_elsewhere", "_info")
    MOVES = _HOME_MOVES
    KIND = "home segment"
    FREED = HomeState.FREED

    def __init__(self, info: types_pb2.SegmentInfo, memory: Memory):
        super().__init__(info, memory)
        self.state = HomeState.LIVE
        self.done = threading.Event()  # set once FREED and the delete finished
        self.finish_record = False
        self.published_hashes: tuple[int, bytes] | None = None
        #: Chunk hashes of what the backups hold (their version), for a segment with
        #: backups: a home writer's sync sends them the chunks that differ.
        self.pushed_hashes: bytes | None = None
        self.read_ticket = 0
        self.adopted_ticket = 0
        self.damage = None
        self.writer_mapped = False
        self.kept_hashes = b""
        #: DELETING, and other nodes reported attachments of it at the last look:
        #: freed once they detached too (HomeSegments.begin_delete).
        self.attached_elsewhere = False

    # What a Revalidate of an "r" attachment reads (HomeSegments.current_version: state,
    # record, version) changes only through these three, which bump the change counter
    # after the change (node/changes.py).

    @property
    def info(self) -> types_pb2.SegmentInfo:
        return self._info

    @info.setter
    def info(self, info: types_pb2.SegmentInfo) -> None:
        # A re-read finding the record as it was (recheck_stale, every RECHECK_AGE), or
        # changed only in what reports other nodes' activity, is no change: bumping for
        # it made every kept member's next switch ask again.
        before = getattr(self, "_info", None)
        self._info = info
        if before is None or _without_activity(before) != _without_activity(info):
            COUNTER.bump()

    def move(self, to) -> None:
        super().move(to)
        COUNTER.bump()

    def adopt_version_locked(self, version: int) -> None:
        if version > self._info.version:
            self._info.version = version
            COUNTER.bump()

    def check_intact(self) -> None:
        """DataLoss if some of its chunks failed their checksum (never served)."""
        if self.damage is not None:
            raise self.damage.error(self.name)

    def __repr__(self) -> str:
        return (f"<HomeSegment {self.name} id={self.id} size={self.size} {self.state.value} "
                f"attachments={self.attachments}>")


class Replica(_Held):
    """This node's copy of a segment homed elsewhere.

    ``info.version`` is the version its bytes hold. ``fill`` tracks which chunks
    hold the home's bytes while it fills on demand (node/lazy.py; None once
    complete). A replica with a writer is that remote writer's working copy:
    ``synced_hashes`` are its chunk hashes as of its last sync. ``relay``: the
    node/relay.py ``Copy`` that serves it to later fetchers (None for lazy replicas).
    """

    __slots__ = ("fill", "synced_hashes", "relay")
    MOVES = _REPLICA_MOVES
    KIND = "replica of"
    FREED = ReplicaState.FREED

    def __init__(self, info: types_pb2.SegmentInfo, memory: Memory, fill=None):
        super().__init__(info, memory)
        self.state = ReplicaState.CURRENT
        self.fill = fill
        self.synced_hashes = b""
        self.relay = None

    def __repr__(self) -> str:
        return (f"<Replica {self.name} id={self.id} v{self.info.version} {self.state.value} "
                f"attachments={self.attachments} lazy={self.fill is not None}>")


#: SegmentInfo fields that report other nodes' attachments and copies: no Revalidate
#: answer reads them (HomeSegments.current_version: state, permission, version).
_ACTIVITY_FIELDS = ("attachments", "copies", "attached_nodes")


def _without_activity(info: types_pb2.SegmentInfo) -> types_pb2.SegmentInfo:
    """A copy of ``info`` without ``_ACTIVITY_FIELDS``."""
    rest = types_pb2.SegmentInfo()
    rest.CopyFrom(info)
    for field in _ACTIVITY_FIELDS:
        rest.ClearField(field)
    return rest
