"""The segments this agent is home for: memfds, capacity accounting, access checks.

Why the agent and not a client holds the memfd: a memfd lives only while some
process keeps an fd or a mapping of it, so a segment that must outlive every
client needs a holder that does not come and go with them. The agent creates one
memfd per home segment, reserves every page at create (``fallocate``) so a later
page fault can never SIGBUS for lack of memory, and hands the fd to local
clients over its Unix socket.

Each segment keeps two fds: the memfd itself (O_RDWR, passed to the "rw"
attachment) and a read-only reopen of it (passed to "r" attachments, so
``mmap(PROT_WRITE, MAP_SHARED)`` fails with EACCES in the client). The memfd's
inode is chmod 0600: a client holding the read-only fd cannot reopen
``/proc/self/fd/N`` for writing unless it runs as the agent's uid (or root).
Seals stop a writer from shrinking or growing the memfd under other mappings.

This module does no I/O to other services, and ``Store`` is not thread-safe:
the agent calls it with its own lock held, except ``allocate`` and ``release``
(slow syscalls on objects no other thread can reach yet, or any more).
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator

from vas import _native
from vas.core.errors import CapacityExceeded
from vas.proto import types_pb2

log = logging.getLogger(__name__)

#: memfd names show in /proc/PID/fd and /proc/PID/maps; the kernel caps them at 249 bytes.
_MEMFD_NAME_MAX = 249
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

_READ, _WRITE = 4, 2


def may_attach(info: types_pb2.SegmentInfo, uid: int, gid: int, mode: str) -> bool:
    """Whether uid/gid may attach ``info`` in ``mode`` ("r" or "rw"), as for a file.

    The owner bits apply if ``uid`` owns the segment, else the group bits if
    ``gid`` is its group, else the other bits. "r" needs the read bit, "rw" the
    read and write bits. Root (uid 0) may always attach. Only the primary gid
    counts: SO_PEERCRED reports no supplementary groups.

    >>> may_attach(types_pb2.SegmentInfo(mode=0o640, uid=1, gid=2), 3, 2, "r")
    True
    """
    if uid == 0:
        return True
    if uid == info.uid:
        bits = info.mode >> 6
    elif gid == info.gid:
        bits = info.mode >> 3
    else:
        bits = info.mode
    need = _READ | _WRITE if mode == "rw" else _READ
    return bits & need == need


class Segment:
    """One home segment held by this agent.

    ``info`` is the cached cluster record (updated by the agent's own calls and
    by re-reads of the record); ``checked`` is when that record was last read
    (``time.monotonic()``); ``attachments`` counts live local attachments;
    ``writer`` is the local "rw" attachment (or ``PENDING`` while the writer
    lock is being acquired); ``deleting`` is set once the record is marked
    deleting or removed, ``finish`` when the coordinator's record still
    waits for FinishDelete, and ``freed`` once the memory is given back.

    A *replica* (a copy of a segment homed elsewhere, ``replica`` set) also
    keeps the agent's writable ``mapping`` it was filled through (``lazy``
    tracks which chunks hold the home's bytes while it fills on demand); its
    ``info.version`` is the version it copied, and ``deleting`` means retired
    (stale or gone: freed at its last detach). A replica with a ``writer`` is
    that remote writer's working copy: ``synced_hashes`` are its chunk hashes
    as of its last sync.
    """

    __slots__ = ("name", "id", "size", "fd", "ro_fd", "info", "checked", "attachments",
                 "writer", "deleting", "finish", "freed", "replica", "mapping", "lazy",
                 "publish_lock", "published_hashes", "synced_hashes")

    #: Placeholder of ``writer`` while an "rw" attach waits for the coordinator.
    PENDING = object()

    def __init__(self, info: types_pb2.SegmentInfo, fd: int, ro_fd: int):
        self.name = info.name
        self.id = info.id
        self.size = info.size
        self.fd = fd
        self.ro_fd = ro_fd
        self.info = info
        self.checked = time.monotonic()
        self.attachments = 0
        self.writer = None
        self.deleting = False
        self.finish = False
        self.freed = False
        self.replica = False
        self.mapping = None
        self.lazy = None  # a lazy replica's LazyFill (node/lazy.py) until it is complete
        # Serializes publishing into and refreshing of these pages (node/publish.py).
        self.publish_lock = threading.Lock()
        self.published_hashes: tuple[int, bytes] | None = None  # home: (version, hashes)
        self.synced_hashes = b""  # replica of a remote writer: hashes as of its last sync

    def __repr__(self) -> str:
        return (f"<Segment {self.name} id={self.id} size={self.size} "
                f"attachments={self.attachments} deleting={self.deleting} freed={self.freed}>")


def allocate(name: str, size: int, *, reserve: bool = True) -> tuple[int, int]:
    """A sealed memfd of ``size`` bytes with every page reserved, and a read-only fd of it.

    ``reserve=False`` leaves it sparse: a lazy replica's pages must be missing
    until fetched, so that a client's first touch raises a userfault.

    Returns ``(fd, ro_fd)``; the caller owns both (see ``release``). Raises
    CapacityExceeded when the kernel cannot reserve the memory.
    """
    fd = _native.memfd_create(f"vas:{name}"[:_MEMFD_NAME_MAX],
                              _native.MFD_CLOEXEC | _native.MFD_ALLOW_SEALING)
    ro_fd = -1
    try:
        os.fchmod(fd, 0o600)
        _native.ftruncate(fd, size)
        try:
            if reserve:
                _native.fallocate(fd, 0, size)
        except OSError as exc:
            raise CapacityExceeded(
                f"cannot reserve {size} bytes of memory for segment {name}: "
                f"{exc.strerror or exc}") from exc
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        ro_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    return fd, ro_fd


def release(fd: int, ro_fd: int, size: int) -> None:
    """Give the memory of a segment back at once and close its fds.

    The pages are punched out before the fds are closed, so the memory returns
    even while a client still maps the memfd (a revoked attachment then reads zeros).
    """
    try:
        _native.fallocate(fd, 0, size, _native.FALLOC_FL_PUNCH_HOLE | _native.FALLOC_FL_KEEP_SIZE)
    except OSError as exc:  # the close below still frees it once clients unmap
        log.warning("could not punch out %d bytes of memfd %d: %s", size, fd, exc)
    for each in (ro_fd, fd):
        if each >= 0:
            os.close(each)


class Store:
    """The home segments and replicas of this agent and its capacity.

    ``capacity`` bytes may be held at once; ``used`` counts held segments and
    replicas (including deleting ones still attached) plus reservations of
    creates and fetches in flight. ``by_name`` maps only home names that are
    live here: a segment leaves it when it starts deleting, so a later segment
    of the same name never mixes with it; ``by_id`` keeps it until it is
    freed. Replicas are kept apart (``replicas``: a retired replica and its
    successor may share an id) so no home-segment path ever finds one.
    ``pooled`` is capacity lent to prepared replica memory (node/pool.py),
    not counted in ``used``.

    Not thread-safe (see the module docstring).
    """

    def __init__(self, capacity: int, label: str = "this node"):
        if capacity < 0:
            raise ValueError(f"capacity {capacity} must be >= 0")
        self.capacity = capacity
        self.label = label
        self.held = 0
        self.reserved = 0
        self.by_id: dict[int, Segment] = {}
        self.by_name: dict[str, Segment] = {}
        self.replicas: set[Segment] = set()
        self.pooled = 0

    @property
    def used(self) -> int:
        """Bytes held or reserved."""
        return self.held + self.reserved

    @property
    def free(self) -> int:
        """Bytes still available for new segments."""
        return max(0, self.capacity - self.used)

    def __len__(self) -> int:
        """Segments held: home copies and replicas."""
        return len(self.by_id) + len(self.replicas)

    def __iter__(self) -> Iterator[Segment]:
        """The home segments."""
        return iter(list(self.by_id.values()))

    def reserve(self, size: int, name: str) -> None:
        """Promise ``size`` bytes to the create of ``name``, or raise CapacityExceeded."""
        if size > self.capacity - self.used:
            raise CapacityExceeded(
                f"{self.label} has no room for segment {name} of {size} bytes: "
                f"{self.free} of {self.capacity} bytes free")
        self.reserved += size

    def unreserve(self, size: int) -> None:
        """Drop a reservation whose create failed."""
        if size > self.reserved:
            raise ValueError(f"unreserve of {size} bytes exceeds the {self.reserved} reserved")
        self.reserved -= size

    def add(self, segment: Segment) -> None:
        """Hold ``segment``, turning its reservation into held bytes."""
        if segment.id in self.by_id:
            raise ValueError(f"segment id {segment.id} is already held")
        self.unreserve(segment.size)
        self.held += segment.size
        self.by_id[segment.id] = segment
        self.by_name[segment.name] = segment

    def add_replica(self, segment: Segment) -> None:
        """Hold replica ``segment``, turning its reservation into held bytes."""
        self.unreserve(segment.size)
        self.held += segment.size
        self.replicas.add(segment)

    def unname(self, segment: Segment) -> None:
        """Stop finding ``segment`` by name (it is deleting); it stays held."""
        if self.by_name.get(segment.name) is segment:
            del self.by_name[segment.name]

    def remove(self, segment: Segment) -> None:
        """Stop holding ``segment``; the caller then ``release``\\ s its fds outside the lock."""
        if segment.replica:
            self.replicas.remove(segment)
        elif self.by_id.get(segment.id) is not segment:
            raise ValueError(f"segment id {segment.id} is not held")
        else:
            self.unname(segment)
            del self.by_id[segment.id]
        self.held -= segment.size
        segment.freed = True
