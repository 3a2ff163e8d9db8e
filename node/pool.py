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
receiving at once. Home creates and lazy replicas take from the pool too
(node/homes.py, node/replicas.py): allocating a GiB is ~0.5-0.8 s of a put
(create, fill, publish) and most of a lazy fill's cost that Ray's object store
does not pay for memory it reuses. One memfd is prepared per ``want``, and
``want`` is called where the next segment of a size is predicted: after an
eager fetch, after two home creates in a row of one size (shards), and when a
segment (home or replica) of a size is freed (a dataset replaced: rounds of
``vas.ray.put``, new versions); a ``take`` does not start another by itself. A
prepared memfd nobody takes within ``IDLE_EXPIRY`` (5 minutes) is given back and its
size no longer wanted: the agent does not keep a deleted dataset's memory for good.
Sizes under ``MIN_SIZE`` are not pooled (they cost little, and sizes that vary
would only churn the pool).

Background work yields to transfers: preparing a GiB takes ~1 s of CPU, and on a
2-core node it doubled the time of a remote writer's first sync that ran beside
it, and on a home it halved the page serving of a lazy reader elsewhere; giving
a GiB back (punching it out) takes ~0.25 s. So the pool's thread does both in
steps (``_STEP``) and starts a step only once no transfer has been under way on
this node for ``_SETTLE`` seconds (``transfer()`` marks one: a replica fetch, a
lazy chunk, a sync, and on the serving side a bulk range, a ReadPages, a
WritePages or a StageBackup stream; transfers come in series, and a step in a gap of a few
milliseconds still competes with the next). The waits are bounded, so a node
that transfers without a pause still makes progress: a refill step waits at most
``_REFILL_WAIT`` seconds, memory queued by ``release_later`` (freed replicas,
trimmed or stale pool entries) is punched out at most ``_RELEASE_WAIT`` seconds
after it was queued (its room is free in the accounting at once; the pages
linger at most that long, plus the punching). A transfer's end notifies nobody
(it would wake this thread on every lazy chunk sent or received): a waiting step
looks again every ``_SETTLE`` seconds.

That rule is per agent, and agents sharing a machine (the tests, the benches: three
readers of one segment on a 2-CPU VM, where the reader that finishes first may start
its refill while the others still receive) do not see each other's transfers; the
kernel's scheduler sees every thread. So a refill's allocation (``fallocate``, where the kernel zeroes
each page: about half of preparing's CPU) runs at SCHED_IDLE, on a helper thread
(``Warm.allocate(idle=True)``), in ``_IDLE_PIECE`` pieces: it gets CPU time only when
nothing else on the machine wants it. Nothing waits for a refill (a create or a fetch
takes a prepared memfd or allocates its own at normal priority), so starving it costs
at most a later cold fetch. The faulting-in (``MADV_POPULATE_WRITE``, the other half)
stays at normal priority: it holds the agent's mmap lock, and at SCHED_IDLE on a busy
machine it would be preempted holding it, stalling the agent's next mmap (a fetch's
start) behind a starved thread. Punching out stays at normal priority too: its pages
must be free within ``_RELEASE_WAIT``.

A pooled memfd is never handed to a client before it becomes a segment, and is
never reused after: a client may keep its read-only fd past detach, so memory
that held one segment must not later hold another. The pool only takes
capacity no segment uses (``Store.pooled``) and gives it back as soon as a
create or replica needs it (``trim``).

Locking: the pool shares the store's lock (its condition wraps it: the pool's
room is the store's ``pooled``); ``run`` is the pool's thread (refill and releases).
"""
from __future__ import annotations

import collections
import logging
import threading
import time

from vas import _native
from vas.core.errors import VasError
from vas.core.sizes import human_size
from vas.node.store import Memory, Store, no_memory, populate, punch

log = logging.getLogger(__name__)

#: Prepared memfds kept at most (of the size last asked for).
_ENTRIES = 1
#: Smallest size pooled, bytes.
MIN_SIZE = 16 << 20
#: Pause after a failed preparation (e.g. ENOMEM), seconds.
_RETRY = 5.0
#: Bytes prepared or punched out between two looks for a transfer (a transfer that
#: starts waits for at most one step to end: ~8 ms each to fault in and to punch out
#: on the development VM; the allocation before the faulting-in yields to it).
_STEP = 32 << 20
#: Bytes allocated by one SCHED_IDLE call within a refill step (~1 ms of CPU): on a
#: machine with no idle CPU such a call still progresses (its weight is 3 against a
#: normal thread's 1024: ~0.3 s a piece beside one busy thread per CPU), and queued
#: releases and a stop wait for the piece under way.
_IDLE_PIECE = 4 << 20
#: A background step starts once no transfer has run for this long, seconds: a lazy
#: reader's faults come a fraction of a millisecond apart, and a step squeezed in
#: between two of them (CPU the faults' threads wait for on a 2-core node) delayed the next.
_SETTLE = 0.05
#: Longest wait of one refill step for quiet, seconds (then it runs anyway).
_REFILL_WAIT = 2.0
#: Longest wait of queued memory for quiet, seconds from its queueing (then it is
#: punched out anyway, without further waits).
_RELEASE_WAIT = 1.0
#: A prepared memfd nobody took for this long is given back, seconds, and its size
#: no longer wanted: a dataset deleted for good must not stay resident in the agent
#: (an operator sees the agent's memory fall), while rounds of puts, shards and
#: refetches, minutes apart at most, still find theirs.
IDLE_EXPIRY = 300.0


class Warm(Memory):
    """Segment memory: a sealed memfd of ``size`` bytes, its read-only reopen and the
    agent's writable mapping; ``populated`` once every page is faulted in ahead."""

    __slots__ = ("populated", "prepared_at")

    def __init__(self, size: int, *, reserve: bool = True):
        """``reserve=False``: sparse, its pages allocated by ``populate`` (step by step
        by the pool, ahead of the receivers by a fetch)."""
        memory = Memory.allocate("segment", size, reserve=reserve, mapped=True)
        super().__init__(size, memory.fd, memory.ro_fd, memory.mapping)
        self.populated = False
        self.prepared_at = 0.0  # monotonic, once the pool holds it

    def populate(self, offset: int, length: int) -> None:
        """Allocate and fault in [offset, offset + length) unless the whole memfd was
        prepared already; CapacityExceeded when the kernel has no memory for them (a
        sparse memfd's pages are allocated here: never later by a fault, which would
        be SIGBUS). ``fallocate`` first: allocating by faults cost ~0.68 CPU-s a GiB
        on the development VM, ``fallocate`` and then faulting ~0.5 (0.23 + 0.3)."""
        if not self.populated:
            self.allocate(offset, length)
            self.fault_in(offset, length)

    def allocate(self, offset: int, length: int, *, idle: bool = False) -> None:
        """``fallocate`` [offset, offset + length): the pages' allocation and zeroing;
        ``idle``: at SCHED_IDLE (``_native.fallocate``), on CPU time nothing else on
        the machine wants (for memory nobody waits for: the pool's)."""
        try:
            _native.fallocate(self.fd, offset, length, idle=idle)
        except OSError as exc:
            raise no_memory(length, exc) from exc

    def fault_in(self, offset: int, length: int) -> None:
        """Map [offset, offset + length) into the agent's mapping, allocated first
        (``store.populate``: it fails with ENOMEM where a fault would SIGBUS)."""
        populate(self.mapping, offset, length)


def release_all(items) -> None:
    """Release Memory (Warm entries, replicas' memory) outside the lock."""
    for memory in items:
        try:
            memory.release()
        except OSError as exc:  # closing must go on
            log.warning("cannot release a memfd of %d bytes: %s", memory.size, exc)


class WarmPool:
    """Prepared memfds for the next replicas (see the module docstring)."""

    def __init__(self, store: Store):
        self.store = store
        self._cv = threading.Condition(store.lock)
        self._entries: list[Warm] = []
        self._wanted = 0
        self._filling = 0
        self._transfers = 0  # transfers under way on this node: background steps wait
        self._quiet_since = 0.0  # when the last transfer ended (monotonic)
        self._releases: collections.deque[tuple[float, Memory]] = collections.deque()
        self._transfer = _Transfer(self)
        self._stopped = False

    def transfer(self) -> "_Transfer":
        """Mark a transfer under way (``with pool.transfer(): ...``): background work
        pauses after its current step, until no transfer ran for ``_SETTLE`` seconds."""
        return self._transfer

    def release_later(self, items) -> None:
        """Give back the memory of ``items`` (Memory, unreachable by anyone else) in the
        pool's thread, a step at a time between transfers (within ``_RELEASE_WAIT``);
        at once when the pool is stopped."""
        with self._cv:
            if not self._stopped:
                queued = time.monotonic()
                self._releases.extend((queued, memory) for memory in items)
                self._cv.notify_all()
                return
        release_all(items)

    def take(self, size: int) -> Warm | None:
        """A prepared memfd of exactly ``size`` bytes, or None; its room moves to the caller's
        reservation (made before). Taking it ends the wish for that size: the next one is
        prepared only when ``want`` is called again (so that the refill runs when the
        caller expects the next segment, not beside the one that took this memory)."""
        with self._cv:
            for i, warm in enumerate(self._entries):
                if warm.size == size:
                    del self._entries[i]
                    self.store.pooled -= size
                    if self._wanted == size:
                        self._wanted = 0
                    return warm
        return None

    def want(self, size: int) -> None:
        """A segment of ``size`` bytes is likely to be asked for next: prepare one of that
        size unless one is there or under way (entries of other sizes are released
        later); sizes under ``MIN_SIZE`` change nothing."""
        if size < MIN_SIZE:
            return
        with self._cv:
            self._wanted = size
            stale = [warm for warm in self._entries if warm.size != size]
            for warm in stale:
                self._entries.remove(warm)
                self.store.pooled -= warm.size
            self._cv.notify_all()
        self.release_later(stale)

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
        """End ``run`` and release every entry and queued memory at once."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
            entries, self._entries = self._entries, []
            for warm in entries:
                self.store.pooled -= warm.size
            queued = [memory for _, memory in self._releases]
            self._releases.clear()
        release_all(entries + queued)

    def _due_locked(self) -> bool:
        size = self._wanted
        return (not self._stopped and size > 0
                and len(self._entries) + self._filling < _ENTRIES
                and self.store.used + self.store.pooled + size <= self.store.capacity)

    def run(self) -> None:
        """The pool's thread: give back queued memory, and prepare a memfd whenever one
        is due, both a step at a time between transfers."""
        while True:
            with self._cv:
                while not self._releases and not self._due_locked():
                    if self._stopped:
                        return
                    self._cv.wait(1.0)  # capacity frees up without a notification too
                    self._expire_locked()
                size = 0 if self._releases else self._wanted
                if size:
                    self._filling += 1
                    self.store.pooled += size
            if not size:
                self._release_queued()
                continue
            warm = self._prepare(size)
            with self._cv:
                self._filling -= 1
                if warm is not None and not self._stopped:
                    warm.prepared_at = time.monotonic()
                    self._entries.append(warm)
                    warm = None
                    extra = self._trim_locked()
                else:
                    self.store.pooled -= size
                    extra = []
            release_all([warm] if warm is not None else [])
            self.release_later(extra)

    def _expire_locked(self) -> None:
        """Queue the entries nobody took within ``IDLE_EXPIRY`` for release, and stop
        wanting their size (else the refill would make it again at once)."""
        now = time.monotonic()
        expired = [warm for warm in self._entries if warm.prepared_at < now - IDLE_EXPIRY]
        for warm in expired:
            self._entries.remove(warm)
            self.store.pooled -= warm.size
            if self._wanted == warm.size:
                self._wanted = 0
            log.info("giving back %s of prepared segment memory nobody took in %.0f s",
                     human_size(warm.size), IDLE_EXPIRY)
        self._releases.extend((now, warm) for warm in expired)

    def _prepare(self, size: int) -> Warm | None:
        """A populated memfd of ``size`` bytes, made in steps between transfers (queued
        releases first: they give memory back); None if the pool stopped or the memory
        could not be had."""
        warm = None
        try:
            warm = Warm(size, reserve=False)
            for offset in range(0, size, _STEP):
                self._release_queued()
                if not self._await_quiet(time.monotonic() + _REFILL_WAIT):
                    warm.release()
                    return None
                length = min(_STEP, size - offset)
                if not self._allocate_idle(warm, offset, length):
                    warm.release()
                    return None
                warm.fault_in(offset, length)
        except (OSError, VasError) as exc:
            if warm is not None:
                warm.release()
            log.warning("cannot prepare %d bytes of segment memory: %s", size, exc)
            with self._cv:
                self._cv.wait(_RETRY)
            return None
        warm.populated = True
        log.info("prepared %d bytes of segment memory", size)
        return warm

    def _allocate_idle(self, warm: Warm, offset: int, length: int) -> bool:
        """Allocate [offset, offset + length) of ``warm`` at SCHED_IDLE, ``_IDLE_PIECE``
        bytes at a time: on a machine whose CPUs are busy a piece waits for a free
        moment, and queued memory is given back between pieces; False once the pool
        stops."""
        for piece in range(offset, offset + length, _IDLE_PIECE):
            with self._cv:
                if self._stopped:
                    return False
            warm.allocate(piece, min(_IDLE_PIECE, offset + length - piece), idle=True)
            self._release_queued()
        return True

    def _release_queued(self) -> None:
        """Punch out the memory ``release_later`` queued, a step at a time between
        transfers (each within ``_RELEASE_WAIT`` of its queueing), and close it."""
        while True:
            with self._cv:
                if not self._releases:
                    return
                queued, memory = self._releases.popleft()
            try:
                for offset in range(0, memory.size if memory.fd >= 0 else 0, _STEP):
                    if not self._await_quiet(queued + _RELEASE_WAIT):
                        break  # stopping: the rest goes at once
                    punch(memory.fd, offset, min(_STEP, memory.size - offset))
            except OSError as exc:  # release() below punches the whole range again
                log.warning("cannot punch out %d bytes of a memfd: %s", memory.size, exc)
            release_all([memory])

    def _await_quiet(self, deadline: float) -> bool:
        """Wait until no transfer has run for ``_SETTLE`` seconds, or until ``deadline``
        (monotonic; then go on anyway: never starved); False once the pool stops.
        Polled while transfers run: their ends notify nobody."""
        with self._cv:
            while not self._stopped:
                now = time.monotonic()
                quiet_at = now + _SETTLE if self._transfers else self._quiet_since + _SETTLE
                if now >= min(quiet_at, deadline):
                    return True
                self._cv.wait(min(quiet_at, deadline) - now)
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
            pool._quiet_since = time.monotonic()
