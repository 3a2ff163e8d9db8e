"""Segment memory: memfds and capacity accounting.

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

This module does no I/O to other services. ``Store`` counts bytes under its
own lock (rank STORE, see node/locks.py); ``allocate`` and ``Memory.release``
are slow syscalls made outside every lock, on objects no other thread can
reach yet, or any more.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os

from vas import _native
from vas.core.errors import CapacityExceeded
from vas.core.sizes import human_size
from vas.node import locks

log = logging.getLogger(__name__)

#: memfd names show in /proc/PID/fd and /proc/PID/maps; the kernel caps them at 249 bytes.
_MEMFD_NAME_MAX = 249
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

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
                f"cannot reserve {human_size(size)} of memory for segment {name}: "
                f"{exc.strerror or exc}") from exc
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        ro_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    return fd, ro_fd


def populate(mapping, offset: int, length: int, what: str = "segment memory") -> None:
    """Allocate and map [offset, offset + length) of the agent's ``mapping`` of a memfd
    (``MADV_POPULATE_WRITE``): where the kernel has no memory for them this is
    CapacityExceeded (naming ``what``), where a store's own page fault would be SIGBUS."""
    try:
        mapping.madvise(_native.MADV_POPULATE_WRITE, offset, length)
    except OSError as exc:
        raise no_memory(length, exc, what) from exc


def no_memory(length: int, exc: OSError, what: str = "segment memory") -> CapacityExceeded:
    """The error of ``length`` bytes of ``what`` the kernel could not allocate."""
    return CapacityExceeded(f"cannot allocate {human_size(length)} of {what}: "
                            f"{exc.strerror or exc}")


def release(fd: int, ro_fd: int, size: int) -> None:
    """Give the memory of a segment back at once and close its fds.

    The pages are punched out before the fds are closed, so the memory returns
    even while a client still maps the memfd (a revoked attachment then reads zeros).
    """
    try:
        punch(fd, 0, size)
    except OSError as exc:  # the close below still frees it once clients unmap
        log.warning("could not punch out %d bytes of memfd %d: %s", size, fd, exc)
    for each in (ro_fd, fd):
        if each >= 0:
            os.close(each)


def punch(fd: int, offset: int, length: int) -> None:
    """Give back the pages of [offset, offset + length) of memfd ``fd`` (its size stays)."""
    _native.fallocate(fd, offset, length,
                      _native.FALLOC_FL_PUNCH_HOLE | _native.FALLOC_FL_KEEP_SIZE)


@contextlib.contextmanager
def read_only_view(fd: int, size: int):
    """The first ``size`` bytes of ``fd`` mapped read-only by the agent, as a byte
    memoryview; unmapped on leaving (views sliced from it must be released first)."""
    mapping = _native.mmap(fd, size, writable=False)
    try:
        with memoryview(mapping) as raw, raw.cast("B") as view:
            yield view
    finally:
        mapping.close()


class Memory:
    """The memfd behind one held segment or replica: the fd, its read-only reopen and,
    for replicas, the agent's writable mapping it is filled through."""

    __slots__ = ("size", "fd", "ro_fd", "mapping")

    def __init__(self, size: int, fd: int, ro_fd: int, mapping=None):
        self.size, self.fd, self.ro_fd, self.mapping = size, fd, ro_fd, mapping

    @classmethod
    def allocate(cls, name: str, size: int, *, reserve: bool = True,
                 mapped: bool = False) -> "Memory":
        """A fresh sealed memfd (see ``allocate``), mapped writable by the agent if ``mapped``."""
        fd, ro_fd = allocate(name, size, reserve=reserve)
        mapping = None
        if mapped:
            try:
                mapping = _native.mmap(fd, size, writable=True)
            except BaseException:
                release(fd, ro_fd, size)
                raise
        return cls(size, fd, ro_fd, mapping)

    def writable_mapping(self):
        """The agent's writable mapping of the memory, None when it has none."""
        return self.mapping

    def map_writable(self):
        """``writable_mapping``, made now if there is none, and kept until ``release``
        (its page tables: 2 MiB a GiB). The caller holds the memory's owner's lock
        and keeps the memory from being released meanwhile.

        Why: a copy into mapped pages can run on two threads whose page faults go on
        side by side, where the ``pwrite``s of one memfd take turns on its inode
        lock. On memory the VM's host must back again (pages it took back, touched
        for the first time since) a GiB copied in 2.1-2.3 s so against 3.6-4.0 s
        with one ``pwrite`` stream; on memory already backed both take ~0.6 s."""
        if self.mapping is None and self.fd >= 0:
            self.mapping = _native.mmap(self.fd, self.size, writable=True)
        return self.mapping

    def release(self) -> None:
        """Give the pages back and close the fds and the mapping (idempotent).

        The pages are punched out before the agent's mapping goes: munmap of a
        populated GiB holds this process's mmap lock for ~0.1 s (every mmap, e.g.
        a lazy attach's, waits), of an emptied one only briefly."""
        fd, ro_fd, self.fd, self.ro_fd = self.fd, self.ro_fd, -1, -1
        if fd >= 0:
            release(fd, ro_fd, self.size)
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            mapping.close()

    def close(self) -> None:
        """At shutdown: a memfd does not outlive the agent, so this is ``release``
        (a file of the data dir is kept: node/datadir.py)."""
        self.release()


class Store:
    """The capacity of this agent, in bytes (thread-safe: its own lock, a leaf).

    ``capacity`` bytes may be held at once; ``used`` counts held segments and
    replicas (including deleting ones still attached) plus reservations of
    creates and fetches in flight; ``count`` is how many segments and replicas
    are held. ``pooled`` is capacity lent to prepared replica memory
    (node/pool.py), not counted in ``used``. Which segments are held is kept by
    their owners (node/homes.py, node/replicas.py).
    """

    def __init__(self, capacity: int, label: str = "this node"):
        if capacity < 0:
            raise ValueError(f"capacity {capacity} must be >= 0")
        self.capacity = capacity
        self.label = label
        self.lock = locks.Lock("store", locks.Rank.STORE)
        self.held = 0
        self.reserved = 0
        self.pooled = 0
        self.count = 0

    @property
    def used(self) -> int:
        """Bytes held or reserved."""
        return self.held + self.reserved

    @property
    def free(self) -> int:
        """Bytes still available for new segments."""
        return max(0, self.capacity - self.used)

    def usage(self) -> tuple[int, int]:
        """(bytes used, segments held), read together."""
        with self.lock:
            return self.used, self.count

    def reserve(self, size: int, name: str) -> None:
        """Promise ``size`` bytes to the create or fetch of ``name``, or raise CapacityExceeded."""
        with self.lock:
            if size > self.capacity - self.used:
                raise CapacityExceeded(
                    f"{self.label} has no room for segment {name} of {human_size(size)}: "
                    f"{human_size(self.free)} of {human_size(self.capacity)} free")
            self.reserved += size

    def unreserve(self, size: int) -> None:
        """Drop a reservation whose create or fetch failed."""
        with self.lock:
            if size > self.reserved:
                raise ValueError(f"unreserve of {size} bytes exceeds the {self.reserved} reserved")
            self.reserved -= size

    def hold(self, size: int) -> None:
        """A reservation became a held segment or replica."""
        with self.lock:
            if size > self.reserved:
                raise ValueError(f"hold of {size} bytes exceeds the {self.reserved} reserved")
            self.reserved -= size
            self.held += size
            self.count += 1

    def drop(self, size: int) -> None:
        """A held segment or replica is no longer held (its memory is released next)."""
        with self.lock:
            if size > self.held or self.count <= 0:
                raise ValueError(f"drop of {size} bytes exceeds the {self.held} held")
            self.held -= size
            self.count -= 1
