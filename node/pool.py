"""Warm replica memory: fresh memfds whose pages are allocated and mapped ahead of use.

Why: a replica is filled by ``recv_into`` through the agent's own mapping of
its memfd, and the first touch of fresh pages is what limits a transfer. On the
development VM, for 1 GiB: ``fallocate`` (allocating and zeroing the pages)
takes ~0.45 s and ``MADV_POPULATE_WRITE`` (the page-table entries) another
0.4-0.8 s, while the transfer into mapped pages takes ~0.37 s (2.8 GB/s with 4
streams); receiving into unfaulted pages runs at ~0.6 GB/s. So after a replica
of size S is fetched, one memfd of size S is prepared in the background: the
next replica of that size (the common case: shards of one size) starts
receiving at once.

A pooled memfd is never handed to a client before it becomes a replica, and is
never reused after: a client may keep its read-only fd past detach, so memory
that held one segment must not later hold another. The pool only takes
capacity no segment uses (``Store.pooled``) and gives it back as soon as a
create or replica needs it (``trim_locked``).

Locking: the pool shares the agent's lock (its condition wraps it); the
``*_locked`` methods are called with it held, ``run`` is the refill thread.
"""
from __future__ import annotations

import logging
import threading

from vas import _native
from vas.core.errors import VasError
from vas.node import store as store_mod
from vas.node.store import Store

log = logging.getLogger(__name__)

#: Prepared memfds kept at most (of the size last asked for).
_ENTRIES = 1
#: Pause after a failed preparation (e.g. ENOMEM), seconds.
_RETRY = 5.0


class Warm:
    """A sealed memfd of ``size`` bytes, its read-only reopen and the agent's writable mapping."""

    __slots__ = ("size", "fd", "ro_fd", "mapping", "populated")

    def __init__(self, size: int, *, populate: bool):
        self.size = size
        self.fd, self.ro_fd = store_mod.allocate("replica", size)
        self.populated = populate
        try:
            self.mapping = _native.mmap(self.fd, size, writable=True)
            if populate:
                self.mapping.madvise(_native.MADV_POPULATE_WRITE, 0, size)
        except BaseException:
            store_mod.release(self.fd, self.ro_fd, size)
            raise

    def populate(self, offset: int, length: int) -> None:
        """Fault in [offset, offset + length) unless the whole memfd was prepared already."""
        if not self.populated:
            self.mapping.madvise(_native.MADV_POPULATE_WRITE, offset, length)

    def release(self) -> None:
        # Punch first: munmap of populated pages holds the agent's mmap lock long.
        store_mod.release(self.fd, self.ro_fd, self.size)
        self.mapping.close()


def release_all(items) -> None:
    """Release Warm entries outside the lock."""
    for warm in items:
        try:
            warm.release()
        except OSError as exc:  # closing must go on
            log.warning("cannot release a warm memfd of %d bytes: %s", warm.size, exc)


class WarmPool:
    """Prepared memfds for the next replicas (see the module docstring)."""

    def __init__(self, store: Store, lock: threading.Lock):
        self.store = store
        self._cv = threading.Condition(lock)
        self._entries: list[Warm] = []
        self._wanted = 0
        self._filling = 0
        self._stopped = False

    def take_locked(self, size: int) -> Warm | None:
        """A prepared memfd of exactly ``size`` bytes, or None; its room moves to the caller's
        reservation (made before)."""
        for i, warm in enumerate(self._entries):
            if warm.size == size:
                del self._entries[i]
                self.store.pooled -= size
                return warm
        return None

    def want_locked(self, size: int) -> list[Warm]:
        """A replica of ``size`` bytes was asked for: prepare the next one of that size.
        Returns the entries of other sizes, now unwanted (release outside the lock)."""
        self._wanted = size
        stale = [warm for warm in self._entries if warm.size != size]
        for warm in stale:
            self._entries.remove(warm)
            self.store.pooled -= warm.size
        self._cv.notify_all()
        return stale

    def trim_locked(self) -> list[Warm]:
        """Entries to give back (``release_all`` outside the lock) so segments fit in capacity."""
        dropped = []
        while self._entries and self.store.used + self.store.pooled > self.store.capacity:
            warm = self._entries.pop()
            self.store.pooled -= warm.size
            dropped.append(warm)
        return dropped

    def stop_locked(self) -> list[Warm]:
        """End ``run`` and hand back every entry (release outside the lock)."""
        self._stopped = True
        self._cv.notify_all()
        entries, self._entries = self._entries, []
        for warm in entries:
            self.store.pooled -= warm.size
        return entries

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
                    extra = self.trim_locked()
                else:
                    self.store.pooled -= size
                    extra = []
            release_all(extra + ([warm] if warm is not None else []))

    def _prepare(self, size: int) -> Warm | None:
        try:
            warm = Warm(size, populate=True)
        except (OSError, VasError) as exc:
            log.warning("cannot prepare %d bytes of replica memory: %s", size, exc)
            with self._cv:
                self._cv.wait(_RETRY)
            return None
        log.debug("prepared %d bytes of replica memory", size)
        return warm
