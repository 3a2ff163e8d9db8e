"""The agent's userfault resolvers: faults of clients' lazy mappings, served.

A client maps a lazy replica, registers the mapping on a userfaultfd (MISSING
and MINOR modes, features that include POISON) and hands that fd over with
``RegisterFaults`` (node/localapi.py checks it is a userfaultfd,
node/replicas.py that the attachment is lazy). ``FaultHandler`` threads poll
every registered uffd; one reads a fault, makes its chunk present through the
replica's ``LazyFill`` (node/lazy.py), then ``UFFDIO_CONTINUE`` maps the pages
into the client and wakes the faulting thread.

A fetch that fails is retried with backoff for at most ``fault_timeout``
seconds (``NodeConfig``); then, or at once when the bytes can never come (the
fill is LOST: ``lazy.PagesLost``, the home no longer holds the segment, is not
registered, or the replica was deleted here), the faulting pages are
**poisoned** (``UFFDIO_POISON``): the faulting thread gets SIGBUS, as from a
truncated mmap'd file, never zeros in place of the home's bytes and never an
endless wait. Later faults of that mapping that need a fetch are poisoned at
once. (If this agent itself dies, the client's guardian process poisons
instead: vas/guard.py.)

A registration whose fd reports POLLHUP, POLLERR or POLLNVAL, or whose read
fails, is dropped (logged once, its fd closed when no resolver uses it): such
an fd would be reported ready forever and spin the resolvers. Registrations
are handles (``add`` returns one, ``remove`` takes it), never fd numbers, so a
number closed and reused cannot remove another mapping's registration.
"""
from __future__ import annotations

import enum
import logging
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from vas import _native
from vas.node import locks, metrics
from vas.node.lazy import CHUNK, LazyFill, PagesLost

log = logging.getLogger(__name__)

#: Most bytes fetched ahead of a fault while faults run sequentially.
READ_AHEAD_BYTES = 16 << 20
#: Read-ahead is fetched in pieces of this size on this many connections at once: one
#: connection (~1 GB/s on the development VM) held a sequential scan of a lazy
#: mapping to a third of what an eager fetch on 4 streams moves.
_READ_AHEAD_PIECE = 2 << 20
READ_AHEAD_STREAMS = 3
#: Threads resolving faults: faults of different chunks (other client threads or
#: processes) are fetched concurrently; one fault costs no thread hand-off.
RESOLVERS = 3
#: Backoff between failed fetches for a fault, seconds (doubling up to the last).
_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
#: poll() events after which an fd never becomes readable with a fault again.
_BROKEN = select.POLLHUP | select.POLLERR | select.POLLNVAL


class Registration:
    """One client mapping of a lazy replica: its userfaultfd and where it is mapped.

    ``active`` counts resolver threads working on it; a removed registration's
    uffd is closed only once that is 0. ``lost``: why its faults that need a
    fetch are poisoned at once (a fault of it already waited ``fault_timeout``
    in vain, or its pages are lost); "" while they are fetched.
    """

    __slots__ = ("uffd", "fill", "address", "size", "next_chunk", "ahead", "ahead_end",
                 "active", "removed", "lost")

    def __init__(self, uffd: int, fill: LazyFill, address: int, size: int):
        self.uffd, self.fill, self.address, self.size = uffd, fill, address, size
        self.next_chunk = -1
        self.ahead = 1
        self.ahead_end = 0  # end of the range the read-ahead was asked for so far
        self.active = 0
        self.removed = False
        self.lost = ""

    def step(self, chunk: int) -> int:
        """Chunks to have present from ``chunk`` on: a fault just past what the last
        one mapped doubles the read-ahead, a jump starts over at one chunk.
        (Racy across resolver threads by design: it is a heuristic.)"""
        if chunk == self.next_chunk:
            self.ahead = min(self.ahead * 2, READ_AHEAD_BYTES // CHUNK)
        else:
            self.ahead, self.ahead_end = 1, 0
        return self.ahead


class _Outcome(enum.Enum):
    """What became of the chunk a fault needs."""
    PRESENT = "present"  # map it in
    LOST = "lost"        # poison it: the faulting thread gets SIGBUS
    GONE = "gone"        # the registration went away (or the agent stops): nothing to do


class FaultHandler:
    """The agent's threads resolving the userfaults of every registered client mapping.

    Leader/followers: one thread at a time polls (``_leader``) and reads one
    fault, then hands the poll to the next thread and resolves its fault
    itself, so a lone fault is served without a thread hand-off and faults on
    different chunks are fetched in parallel.
    """

    def __init__(self, timeout: float, threads: int = RESOLVERS):
        #: Seconds a fault may wait for its chunk before it is poisoned.
        self._timeout = timeout
        self._registrations: dict[int, Registration] = {}
        self._closing: list[Registration] = []  # removed: closed once idle
        self._lock = locks.Lock("fault registrations", locks.Rank.FAULTS)
        # Held by the one thread polling (a leaf: it takes only _lock inside).
        self._leader = locks.Lock("fault leader", locks.Rank.FAULT_LEADER)
        self._poll = select.poll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll.register(self._wake_r, select.POLLIN)
        self._stopping = threading.Event()
        self._read_aheads = ThreadPoolExecutor(READ_AHEAD_STREAMS,
                                               thread_name_prefix="vas-read-ahead")
        self._threads = [threading.Thread(target=self._run, name="vas-faults", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def add(self, uffd: int, fill: LazyFill, address: int, size: int) -> Registration:
        """Resolve the faults of the mapping at ``address`` on ``uffd`` (taken over);
        the handle to ``remove`` it with."""
        registration = Registration(uffd, fill, address, size)
        with self._lock:
            self._registrations[uffd] = registration
            self._poll.register(uffd, select.POLLIN)
        self._wake()
        return registration

    def remove(self, registration: Registration) -> None:
        """Forget ``registration`` (the client unmapped or is gone; a no-op if it was
        dropped already). A handler thread closes its uffd once no fault of it is
        being resolved, so a resolver never meets a recycled fd number."""
        with self._lock:
            if registration.removed:
                return
            registration.removed = True
            del self._registrations[registration.uffd]
            self._poll.unregister(registration.uffd)
            self._closing.append(registration)
        self._wake()

    def registered(self, registration: Registration) -> bool:
        with self._lock:
            return not registration.removed

    def stop(self) -> None:
        self._stopping.set()
        self._read_aheads.shutdown(wait=False, cancel_futures=True)
        self._wake()
        for thread in self._threads:
            thread.join(5.0)
        with self._lock:
            fds = [r.uffd for r in self._closing] + list(self._registrations)
            self._closing, self._registrations = [], {}
        for fd in fds + [self._wake_r, self._wake_w]:
            os.close(fd)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full: the poller wakes anyway
            pass

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._leader:
                fault = self._next_fault()
            if fault is None:
                continue
            registration, address = fault
            try:
                self._resolve(registration, address)
            finally:
                with self._lock:
                    registration.active -= 1
                    idle_removed = registration.removed and not registration.active
                if idle_removed:
                    self._wake()  # the leader closes its uffd

    def _next_fault(self) -> tuple[Registration, int] | None:
        """Poll until one page fault is read (its registration marked active); None
        when stopping."""
        while not self._stopping.is_set():
            self._close_idle()
            for fd, events in self._poll.poll():
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    registration = self._registrations.get(fd)
                    if registration is not None:
                        registration.active += 1
                if registration is None:
                    continue
                if events & _BROKEN:
                    self._drop(registration, f"its fd reports {_describe(events)}")
                    with self._lock:
                        registration.active -= 1
                    continue
                address = self._read_fault(registration)
                if address is not None:
                    return registration, address
                with self._lock:
                    registration.active -= 1
        return None

    def _close_idle(self) -> None:
        with self._lock:
            idle = [r for r in self._closing if not r.active]
            self._closing = [r for r in self._closing if r.active]
        for registration in idle:
            os.close(registration.uffd)

    def _read_fault(self, registration: Registration) -> int | None:
        """The address of one pending page fault of ``registration``, if any (one at a
        time, so the other resolver threads can take the next ones)."""
        try:
            events = _native.uffd_read(registration.uffd, 1)
        except OSError as exc:
            self._drop(registration, f"reading its faults failed ({exc})")
            return None
        for event, _flags, address in events:
            if event == _native.UFFD_EVENT_PAGEFAULT:
                return address
        return None

    def _drop(self, registration: Registration, why: str) -> None:
        """Stop polling a registration that can never deliver a fault again (logged once:
        it is gone from the poll set after this)."""
        log.warning("dropping the userfault registration of the mapping at 0x%x: %s",
                    registration.address, why)
        self.remove(registration)

    def _resolve(self, registration: Registration, address: int) -> None:
        offset = address - registration.address
        page = address & ~(_native.PAGE_SIZE - 1)
        if not 0 <= offset < registration.size:  # cannot happen: the kernel reports our range
            log.error("userfault at 0x%x outside the registered mapping", address)
            _map_in(registration, page - registration.address, _native.PAGE_SIZE, page)
            return
        chunk = offset // CHUNK
        ahead = registration.step(chunk)
        start = chunk * CHUNK
        outcome = self._fetch_for_fault(registration, start, CHUNK)
        if outcome is _Outcome.GONE:
            if not self._stopping.is_set():
                # The client's guardian reads this uffd now, and it woke the mapping's
                # threads once, when it took over: a fault this agent read after that
                # would leave its thread asleep for good. Woken, it faults again, and
                # the guardian poisons that one. (The uffd is open: we are active on it.)
                _wake_thread(registration.uffd, page)
            return
        if outcome is _Outcome.LOST:
            _poison(registration, start, min(CHUNK, registration.size - start), page)
            metrics.FAULTS_SIGBUS.inc()
            return
        # The faulting chunk is present now; a longer run is only worth a look with read-ahead.
        run = registration.fill.present_run(chunk, ahead) if ahead > 1 else 1
        registration.next_chunk = chunk + run
        _map_in(registration, start, min(run * CHUNK, registration.size - start), page)
        metrics.FAULTS_SERVED.inc()
        if ahead > 1:  # after the wake-up: the client reads on while this fetches
            self._read_ahead(registration, start + CHUNK, (ahead - 1) * CHUNK)

    def _read_ahead(self, registration: Registration, offset: int, length: int) -> None:
        """Have [offset, offset + length) fetched in the background, in pieces on parallel
        connections: only the part past what earlier read-aheads asked for. (Racy across
        resolver threads by design: a piece asked for twice is fetched once.)"""
        end = min(offset + length, registration.size)
        start = max(offset, registration.ahead_end)
        if start >= end or registration.lost:
            return
        registration.ahead_end = end
        for piece in range(start, end, _READ_AHEAD_PIECE):
            try:
                self._read_aheads.submit(self._fetch_ahead, registration, piece,
                                         min(_READ_AHEAD_PIECE, end - piece))
            except RuntimeError:  # shut down: the agent stops
                return

    def _fetch_ahead(self, registration: Registration, offset: int, length: int) -> None:
        if registration.removed or registration.lost:
            return
        try:
            registration.fill.ensure(offset, length)
        except Exception as exc:  # noqa: BLE001  (speculative: the fault itself retries)
            log.debug("read-ahead of [%d, +%d) failed: %s", offset, length, exc)

    def _fetch_for_fault(self, registration: Registration, offset: int,
                         length: int) -> _Outcome:
        """Make the range present, retrying failed fetches with backoff for at most
        ``fault_timeout`` seconds; LOST when that ran out or the pages are lost
        (PagesLost), GONE when the registration went away first."""
        fill = registration.fill
        if registration.lost:  # poisoned once already: no more waiting for this mapping
            present = fill.present_run(offset // CHUNK, 1)
            return _Outcome.PRESENT if present else _Outcome.LOST
        deadline = time.monotonic() + self._timeout
        for attempt in range(1 << 62):
            try:
                fill.ensure(offset, length, deadline)
                return _Outcome.PRESENT
            except PagesLost as exc:
                reason = str(exc)
                break
            except Exception as exc:  # noqa: BLE001  (any failure: retry, the thread waits)
                if self._stopping.is_set() or not self.registered(registration):
                    return _Outcome.GONE
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = (f"the home did not deliver it within the fault timeout "
                              f"({self._timeout:g} s): {exc}")
                    break
                delay = min(_BACKOFF[min(attempt, len(_BACKOFF) - 1)], left)
                log.error("lazy fetch of [%d, +%d) failed (attempt %d): %s; the faulting "
                          "thread waits, retrying in %.2f s", offset, length, attempt + 1,
                          exc, delay)
                fill.wait_lost(delay)  # ends early when the pages are lost meanwhile
        if self._stopping.is_set() or not self.registered(registration):
            return _Outcome.GONE
        if not registration.lost:
            registration.lost = reason
            log.warning("lazy fetch of [%d, +%d) for a client mapping failed for good: %s; "
                        "its faults on pages not fetched yet get SIGBUS", offset, length,
                        reason)
        return _Outcome.LOST


def _map_in(registration: Registration, offset: int, length: int, page: int) -> None:
    """Map [offset, offset + length) of the replica (it holds the faulting ``page``)
    into the client and wake the faulting thread.

    Pages of the range mapped already (an earlier fault) stop the ioctl with
    EEXIST: then the first chunk alone is tried, then the faulting page, then
    the thread is just woken (its page is there too).
    """
    base = registration.address
    attempts = [(base + offset, length)]
    if length > CHUNK:
        attempts.append((base + offset, CHUNK))
    attempts.append((page, _native.PAGE_SIZE))
    _first_that_fits(registration.uffd, _native.uffd_continue, attempts, page)


def _poison(registration: Registration, offset: int, length: int, page: int) -> None:
    """Poison [offset, offset + length) of the client's mapping (it holds the faulting
    ``page``; UFFDIO_POISON wakes the thread, whose access then raises SIGBUS).

    A page of the range mapped already stops the ioctl with EEXIST: then the
    faulting page alone is poisoned, and if it is mapped too (a racing resolve),
    the thread is just woken.
    """
    attempts = [(registration.address + offset, length)]
    if length > _native.PAGE_SIZE:
        attempts.append((page, _native.PAGE_SIZE))
    _first_that_fits(registration.uffd, _native.uffd_poison, attempts, page)


def _first_that_fits(uffd: int, ioctl, attempts: list[tuple[int, int]], page: int) -> None:
    """``ioctl(uffd, address, size)`` (it wakes the faulting thread) on the first of
    ``attempts`` that no mapped page refuses (EEXIST); if none fits, just wake the
    thread faulting at ``page``."""
    for address, size in attempts:
        try:
            ioctl(uffd, address, size)
            return
        except FileExistsError:
            continue
        except OSError as exc:  # EAGAIN: the mapping is changing; ENOENT/ESRCH: process gone
            log.debug("%s failed: %s", ioctl.__name__, exc)
    _wake_thread(uffd, page)


def _wake_thread(uffd: int, page: int) -> None:
    """Wake the thread faulting at ``page`` (it retries the access)."""
    try:
        _native.uffd_wake(uffd, page, _native.PAGE_SIZE)
    except OSError as exc:
        log.debug("UFFDIO_WAKE failed: %s", exc)


def _describe(events: int) -> str:
    return "|".join(name for name in ("POLLHUP", "POLLERR", "POLLNVAL")
                    if events & getattr(select, name))
