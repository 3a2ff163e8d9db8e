"""Lock-order checking for the agent's locks (``vas.node.locks``).

Why it exists: the agent is many threads (connections, gRPC handlers, fault
resolvers, background loops) over shared state guarded by several locks. Two
rules keep that from deadlocking or stalling, and both are easy to break in a
change that reads fine on its own:

1. **Locks are taken in one global order.** Every lock has a *rank*; a thread
   may only take a lock whose rank is strictly greater than the rank of every
   checked lock it already holds. Lower rank = taken first = outer. Two locks of
   the same rank (say, the publish locks of two segments) are therefore never
   nested. A thread taking a lock it already holds (a ``threading.Lock`` is not
   reentrant) would wait for itself forever: reported too.
2. **No lock is held across a network call.** The agent calls
   ``assert_unlocked("PublishVersion")`` before each gRPC call it makes; a thread
   that holds a checked lock there stalls every other thread needing that lock
   for as long as a remote peer takes to answer (or to time out).

A violation is found when it *could* happen, on the order of acquisition of
one thread, not only when two threads actually deadlock: one run through a
code path is enough to see it.

Switching it on: checking is off by default and then ``Lock()`` returns a plain
``threading.Lock`` (no cost on hot paths). It is on when the environment
variable ``VAS_LOCK_CHECK`` is set when the lock is made (read at each call):

- ``VAS_LOCK_CHECK=1``: each violation is logged at ERROR, a message starting with
  ``LOCK ORDER VIOLATION:`` naming the locks, their ranks and the acquiring stack,
  and counted (``violations()``); the thread carries on. A daemon keeps serving,
  and a test run over real processes collects every violation from the logs.
- ``VAS_LOCK_CHECK=raise``: the same, then ``LockOrderError`` is raised in the
  offending thread (before it blocks), for debugging one case.
- unset, empty, ``0``, ``off``, ``false`` or ``no``: off; any other value: as ``1``.

Unit tests use ``enable()`` / ``disable()`` instead of the environment.

Locks made while checking was off stay plain locks; locks made while it was on
stay checked. Only checked locks are tracked: a plain ``threading.Lock`` taken in
between is invisible to the checker.

Acquisitions that cannot wait (``acquire(blocking=False)``) are not checked
against the order: a try-lock cannot deadlock, and taking a lock out of order
with a try-lock is the usual way around an order. Acquisitions with a timeout
are checked (the timeout only turns a deadlock into a stall).

A checked lock works as the lock of ``threading.Condition(lock)``: ``wait()``
releases it and takes it back through ``_release_save``/``_acquire_restore``, so
the thread's held locks stay right across the wait, and taking it back while
holding a lock of a higher rank (acquired after it, before the wait) is reported.

The agent's rank table is ``Rank`` below (docs/ARCHITECTURE.md "Locks" explains
it). Example::

    from vas.node import locks

    lock = locks.Lock(f"segment {name}", locks.Rank.SEGMENT)
    changed = threading.Condition(lock)
    ...
    locks.assert_unlocked("GetSegment")          # before a network call
    reply = stub.GetSegment(request, timeout=5)

This module imports nothing from vas: any module may use it.
"""
from __future__ import annotations

import enum
import logging
import os
import sys
import threading
import traceback

__all__ = ["ENV", "MARKER", "Rank", "LockOrderError", "CheckedLock", "Lock", "assert_unlocked",
           "held", "violations", "enable", "disable", "checking"]

log = logging.getLogger(__name__)

#: The environment variable that switches checking on ("1": log, "raise": log and raise).
ENV = "VAS_LOCK_CHECK"
#: Every report starts with this, so logs can be searched for it.
MARKER = "LOCK ORDER VIOLATION:"
#: Frames of the acquiring site shown in a report.
STACK_FRAMES = 8

_OFF_VALUES = ("", "0", "off", "false", "no")


class Rank(enum.IntEnum):
    """The agent's lock order: a thread takes locks only in increasing rank.

    Tables come before the objects they hold, objects before the counters and
    registries they update, and leaves (locks that take no other) last.
    """

    HOMES = 10          # node/homes.py: home segments by name and id, creates in flight
    REPLICAS = 20       # node/replicas.py: replicas by name, fetches in flight
    BACKUPS = 25        # node/backups.py: the backups held, by id
    SEGMENT = 30        # one home segment or replica: state, count, record, writer slot
    STORE = 40          # node/store.py capacity, and the warm pool (node/pool.py)
    SESSIONS = 50       # node/sessions.py attachments; node/membership.py report queue
    WRITERS = 55        # node/writers.py: the "rw" attachments renewed by the keepalive
    LAZY_FILL = 60      # node/lazy.py: one lazy replica's chunk states
    FAULT_LEADER = 65   # node/faults.py: the fault resolver that polls
    FAULTS = 70         # node/faults.py: userfaultfd registrations
    WRITE_GUARD = 72    # node/revoke.py: one home writer's write-protect registration
    KEPT_GUARDS = 74    # node/revoke.py: revoked registrations kept until their process exits
    HOME_CHANNELS = 80  # node/lazy.py: home addresses and bulk channels of lazy replicas
    RELAY_COPIES = 84   # node/relay.py: the copies this agent relays, by id
    RELAY_COPY = 86     # node/relay.py: one relayed copy's received ranges and requests
    RELAY_DIRECTORY = 87  # node/relay.py: a home's relays per segment version
    BULK = 90           # node/bulk.py: one bulk channel's idle connections
    PEERS = 100         # node/clients.py: gRPC channels to other agents
    TIMER = 110         # node/timer.py: a timer's heap (expiry, writer deadlines)
    CONNECTIONS = 120   # node/local.py: the local connections, refused ones, the listener
    LIMITS = 125        # node/limits.py: per-uid counts of connections, attachments, uffds
    DISPATCH = 130      # node/dispatch.py: the queues of local requests per uid
    SPACE_CACHE = 135   # node/spaces.py: the space records kept (a leaf)
    CHANGE_COUNTER = 140  # node/changes.py: the Revalidate change counter (a leaf)

# None: follow the environment; else (checking, raising) as set by enable()/disable().
_forced: tuple[bool, bool] | None = None
_violations = 0
_count_lock = threading.Lock()
# Per thread: ``stack``, the list of checked locks it holds, outermost first.
_local = threading.local()


class LockOrderError(AssertionError):
    """A lock was taken against the rank order, or held across a network call
    (raised only with ``VAS_LOCK_CHECK=raise`` or ``enable(raising=True)``)."""


def enable(raising: bool = False) -> None:
    """Check locks made from now on, whatever the environment says (for tests).

    :param raising: also raise ``LockOrderError`` at each violation.
    """
    global _forced
    _forced = (True, bool(raising))


def disable() -> None:
    """Undo ``enable()``: checking follows ``VAS_LOCK_CHECK`` again (off when unset)."""
    global _forced
    _forced = None


def _mode() -> tuple[bool, bool]:
    """(checking, raising) right now."""
    if _forced is not None:
        return _forced
    value = os.environ.get(ENV, "").strip().lower()
    if value in _OFF_VALUES:
        return False, False
    return True, value == "raise"


def checking() -> bool:
    """Whether ``Lock()`` returns checked locks right now."""
    return _mode()[0]


def violations() -> int:
    """How many violations this process has reported so far."""
    return _violations


def _stack() -> list:
    try:
        return _local.stack
    except AttributeError:
        _local.stack = []
        return _local.stack


def held() -> tuple[str, ...]:
    """Names of the checked locks the calling thread holds, outermost first."""
    return tuple(lock.name for lock in getattr(_local, "stack", ()))


def _describe(locks) -> str:
    return ", ".join(f"{lock.name!r} (rank {lock.rank})" for lock in locks)


def _report(message: str) -> None:
    """Count, log (with the caller's stack outside this module) and maybe raise."""
    global _violations
    with _count_lock:
        _violations += 1
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    site = "".join(traceback.format_stack(frame, limit=STACK_FRAMES)).rstrip()
    log.error("%s %s (thread %s)\n%s", MARKER, message, threading.current_thread().name, site)
    if _mode()[1]:
        raise LockOrderError(f"{MARKER} {message}")


class CheckedLock:
    """A ``threading.Lock`` that checks the rank order (see the module docstring).

    Made by ``Lock()`` when checking is on; used exactly like the lock it wraps.
    ``name`` and ``rank`` are what reports show.
    """

    __slots__ = ("name", "rank", "_lock", "_owner", "_holder_stack")

    def __init__(self, name: str, rank: int):
        self.name = name
        self.rank = rank
        self._lock = threading.Lock()
        self._owner: int | None = None        # thread ident of the holder
        self._holder_stack: list | None = None  # the holder's stack (release may be elsewhere)

    def _check(self, stack: list, doing: str) -> None:
        if self in stack:
            _report(f"{doing} {self.name!r} (rank {self.rank}) while this thread already holds "
                    "it: a self-deadlock (the lock is not reentrant)")
        else:
            outer = [lock for lock in stack if lock.rank >= self.rank]
            if outer:
                _report(f"{doing} {self.name!r} (rank {self.rank}) while holding "
                        f"{_describe(outer)}: ranks must strictly increase "
                        f"(held: {_describe(stack)})")

    def _took(self, stack: list, at: int | None = None) -> None:
        self._owner = threading.get_ident()
        self._holder_stack = stack
        stack.insert(len(stack) if at is None else min(at, len(stack)), self)

    def _dropping(self) -> int:
        """Forget the holder (before the lock is released); its position in the stack."""
        stack, self._holder_stack, self._owner = self._holder_stack, None, None
        if stack is None:
            return 0
        for index, lock in enumerate(stack):
            if lock is self:
                del stack[index]
                return index
        return len(stack)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Like ``threading.Lock.acquire``; checks the order first unless not blocking."""
        stack = _stack()
        if blocking and stack:
            self._check(stack, "acquiring")
        if not self._lock.acquire(blocking, timeout):
            return False
        self._took(stack)
        return True

    def release(self) -> None:
        """Like ``threading.Lock.release`` (any thread may release, as with a Lock)."""
        if not self._lock.locked():
            raise RuntimeError(f"release of unlocked lock {self.name!r}")
        self._dropping()
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc_info) -> None:
        self.release()

    # threading.Condition uses these when its lock has them (see Condition.__init__).
    def _is_owned(self) -> bool:
        return self._lock.locked() and self._owner == threading.get_ident()

    def _release_save(self) -> int:
        index = self._dropping()
        self._lock.release()
        return index

    def _acquire_restore(self, index: int) -> None:
        stack = _stack()
        error = None
        if stack:
            try:
                self._check(stack, "re-acquiring after Condition.wait")
            except LockOrderError as exc:
                error = exc  # raised once the lock is back: wait() must return holding it
        self._lock.acquire()
        self._took(stack, index)
        if error is not None:
            raise error

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()
        self._owner = self._holder_stack = None

    def __repr__(self) -> str:
        state = "locked" if self._lock.locked() else "unlocked"
        return f"<CheckedLock {self.name!r} rank {self.rank} {state}>"


def Lock(name: str, rank: int):  # noqa: N802  (a factory standing in for threading.Lock)
    """A lock named ``name`` at ``rank`` in the lock order (lower = taken first).

    :returns: a plain ``threading.Lock()`` when checking is off (the default);
        a ``CheckedLock`` when ``VAS_LOCK_CHECK`` is set or ``enable()`` was called.
    :raises TypeError: ``name`` is not a str or ``rank`` not an int.

    Example::

        publish_lock = locks.Lock("segment.publish", 20)
    """
    if not isinstance(name, str) or isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"Lock(name: str, rank: int), got Lock({name!r}, {rank!r})")
    if not _mode()[0]:
        return threading.Lock()
    return CheckedLock(name, rank)


def assert_unlocked(what: str) -> None:
    """Report a violation if the calling thread holds a checked lock: call it right
    before a network call (``what`` names it: "PublishVersion", "bulk read", ...).

    Costs one attribute lookup when no checked lock is held (always, with checking off).

    Example::

        locks.assert_unlocked("GetSegment")
        info = stub.GetSegment(request, timeout=timeout)
    """
    stack = getattr(_local, "stack", None)
    if stack:
        _report(f"{what} (a network call) while holding {_describe(stack)}")
