"""Warm memory: fresh memfds whose pages are allocated and mapped ahead of use, for
the next replica or home segment of the size last asked for.

Why: a replica is filled by ``recv_into`` through the agent's own mapping of
its memfd, and the first touch of fresh pages is what limits a transfer. On the
development VM, for 1 GiB: ``fallocate`` (allocating and zeroing the pages)
takes ~0.45 s and ``MADV_POPULATE_WRITE`` (the page-table entries) another
0.4-0.8 s, while the transfer into mapped pages takes ~0.37 s (2.8 GB/s with 4
streams); receiving into unfaulted pages runs at ~0.6 GB/s. So after a replica
of size S is fetched, one memfd of size S is prepared in the background: the
next replica of that size (the common case: shards of one size) starts
receiving at once. Home creates take from the pool too, once two creates in a
row had one size (node/homes.py): allocating a GiB is ~0.5 s of a put (create,
fill, publish) that Ray's object store does not pay for memory it reuses.
Sizes under ``MIN_SIZE`` are not pooled (they cost little, and sizes that vary
would only churn the pool).

The refill yields to transfers: preparing a GiB takes ~1 s of CPU, and on a
2-core node it doubled the time of a remote writer's first sync that ran beside
it, and on a home it halved the page serving of a lazy reader elsewhere. So it
prepares in steps (``_STEP``) and runs a step only once no transfer has run on
this node for ``_QUIET`` seconds (``transfer()`` marks one): a replica fetch, a
lazy chunk, a sync, and on the serving side a bulk range, a ReadPages or a
WritePages stream.

A pooled memfd is never handed to a client before it becomes a segment, and is
never reused after: a client may keep its read-only fd past detach, so memory
that held one segment must not later hold another. The pool only takes
capacity no segment uses (``Store.pooled``) and gives it back as soon as a
create or replica needs it (``trim``).

Locking: the pool shares the store's lock (its condition wraps it: the pool's
room is the store's ``pooled``); ``run`` is the refill thread.
"""
from __future__ import annotations

import logging
import threading
import time

from vas import _native
from vas.core.errors import VasError
from vas.node.store import Memory, Store

log = logging.getLogger(__name__)

#: Prepared memfds kept at most (of the size last asked for).
_ENTRIES = 1
#: Smallest size pooled, bytes.
MIN_SIZE = 16 << 20
#: Pause after a failed preparation (e.g. ENOMEM), seconds.
_RETRY = 5.0
#: Bytes prepared between two looks for a transfer (a transfer that starts waits
#: for at most one step to end: ~30 ms on the development VM).
_STEP = 32 << 20
#: A step runs only after this long without a transfer, seconds: a lazy reader's
#: faults come a fraction of a millisecond apart, and a step squeezed in between two
#: of them (CPU the faults' threads wait for on a 2-core node) delayed the next.
_QUIET = 0.05


class Warm(Memory):
    """Segment memory: a sealed memfd of ``size`` bytes, its read-only reopen and the
    agent's writable mapping; ``populated`` once every page is faulted in ahead."""

    __slots__ = ("populated",)

    def __init__(self, size: int, *, reserve: bool = True):
        """``reserve=False``: sparse, for the pool to populate step by step."""
        memory = Memory.allocate("segment", size, reserve=reserve, mapped=True)
        super().__init__(size, memory.fd, memory.ro_fd, memory.mapping)
        self.populated = False

    def populate(self, offset: int, length: int) -> None:
        """Fault in [offset, offset + length) unless the whole memfd was prepared already."""
        if not self.populated:
            self.mapping.madvise(_native.MADV_POPULATE_WRITE, offset, length)


def release_all(items) -> None:
    """Release Warm entries outside the lock."""
    for warm in items:
        try:
            warm.release()
        except OSError as exc:  # closing must go on
            log.warning("cannot release a warm memfd of %d bytes: %s", warm.size, exc)


class WarmPool:
    """Prepared memfds for the next replicas (see the module docstring)."""

    def __init__(self, store: Store):
        self.store = store
        self._cv = threading.Condition(store.lock)
        self._entries: list[Warm] = []
        self._wanted = 0
        self._filling = 0
        self._transfers = 0  # transfers under way on this node: the refill waits
        self._last_transfer = 0.0  # time.monotonic() when the last one ended
        self._transfer = _Transfer(self)
        self._stopped = False

    def transfer(self) -> "_Transfer":
        """Mark a transfer under way (``with pool.transfer(): ...``): the refill pauses
        after its current step, until no transfer ran for ``_QUIET`` seconds."""
        return self._transfer

    def take(self, size: int) -> Warm | None:
        """A prepared memfd of exactly ``size`` bytes, or None; its room moves to the caller's
        reservation (made before)."""
        with self._cv:
            for i, warm in enumerate(self._entries):
                if warm.size == size:
                    del self._entries[i]
                    self.store.pooled -= size
                    return warm
        return None

    def want(self, size: int) -> None:
        """A segment of ``size`` bytes was asked for: prepare the next one of that size
        (entries of other sizes are released); sizes under ``MIN_SIZE`` change nothing."""
        if size < MIN_SIZE:
            return
        with self._cv:
            self._wanted = size
            stale = [warm for warm in self._entries if warm.size != size]
            for warm in stale:
                self._entries.remove(warm)
                self.store.pooled -= warm.size
            self._cv.notify_all()
        release_all(stale)

    def trim(self) -> list[Warm]:
        """Entries to give back (``release()`` outside every lock) so segments fit."""
        with self._cv:
            return self._trim_locked()

    def _trim_locked(self) -> list[Warm]:
        dropped = []
        while self._entries and self.store.used + self.store.pooled > self.store.capacity:
            warm = self._entries.pop()
            self.store.pooled -= warm.size
            dropped.append(warm)
        return dropped

    def stop(self) -> None:
        """End ``run`` and release every entry."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
            entries, self._entries = self._entries, []
            for warm in entries:
                self.store.pooled -= warm.size
        release_all(entries)

    def _due_locked(self) -> bool:
        size = self._wanted
        return (not self._stopped and size > 0
                and len(self._entries) + self._filling < _ENTRIES
                and self.store.used + self.store.pooled + size <= self.store.capacity)

    def run(self) -> None:
        """The refill thread: prepare a memfd whenever one is due."""
        while True:
            with self._cv:
                while not self._due_locked():
                    if self._stopped:
                        return
                    self._cv.wait(1.0)  # capacity frees up without a notification too
                size = self._wanted
                self._filling += 1
                self.store.pooled += size
            warm = self._prepare(size)
            with self._cv:
                self._filling -= 1
                if warm is not None and not self._stopped:
                    self._entries.append(warm)
                    warm = None
                    extra = self._trim_locked()
                else:
                    self.store.pooled -= size
                    extra = []
            release_all(extra + ([warm] if warm is not None else []))

    def _prepare(self, size: int) -> Warm | None:
        """A populated memfd of ``size`` bytes, made in steps between transfers; None if
        the pool stopped or the memory could not be had."""
        warm = None
        try:
            warm = Warm(size, reserve=False)
            for offset in range(0, size, _STEP):
                if not self._wait_for_quiet():
                    warm.release()
                    return None
                warm.mapping.madvise(_native.MADV_POPULATE_WRITE, offset,
                                     min(_STEP, size - offset))
        except (OSError, VasError) as exc:
            if warm is not None:
                warm.release()
            log.warning("cannot prepare %d bytes of segment memory: %s", size, exc)
            with self._cv:
                self._cv.wait(_RETRY)
            return None
        warm.populated = True
        log.debug("prepared %d bytes of segment memory", size)
        return warm

    def _wait_for_quiet(self) -> bool:
        """Wait until no transfer ran for ``_QUIET`` seconds; False once the pool stops.
        (Polled: a transfer's end notifies nobody, it would wake this thread on every
        lazy chunk sent or received.)"""
        with self._cv:
            while not self._stopped:
                left = _QUIET if self._transfers else (
                    self._last_transfer + _QUIET - time.monotonic())
                if left <= 0:
                    return True
                self._cv.wait(left)
            return False


class _Transfer:
    """``WarmPool.transfer()``: one reusable context manager for every thread (a
    generator-based one cost ~3 µs per lazy chunk on each side)."""

    __slots__ = ("_pool",)

    def __init__(self, pool: WarmPool):
        self._pool = pool

    def __enter__(self) -> None:
        pool = self._pool
        with pool._cv:
            pool._transfers += 1

    def __exit__(self, *exc) -> None:
        pool = self._pool
        with pool._cv:
            pool._transfers -= 1
            pool._last_transfer = time.monotonic()
