"""Demand paging of lazy replicas (``fetch="lazy"``) with userfaultfd.

A lazy replica is a sparse memfd that fills in ``CHUNK``-sized pieces from
the home on demand; ``LazyFill`` records which chunks are present. A client
maps the replica, registers its mapping on a userfaultfd (MISSING and MINOR
modes) and hands that fd to the agent (``RegisterFaults``). The agent's
``FaultHandler`` threads read the faults: one fetches the chunk around a fault
(``HomeReader``: a request on a persistent bulk connection to the home, whose
bytes are written into the memfd's page cache), then ``UFFDIO_CONTINUE`` maps
the pages into the client and wakes the faulting thread. The client's thread
sleeps in the kernel, so it may hold the GIL: the agent is another process.

A fetch that fails is retried with backoff for at most ``fault_timeout``
seconds (``NodeConfig``); then, or at once when the bytes can never come
(``PagesLost``: the home no longer holds the segment, is not registered, or the
replica was deleted here), the faulting pages are **poisoned**
(``UFFDIO_POISON``): the faulting thread gets SIGBUS, as from a truncated
mmap'd file, never zeros in place of the home's bytes and never an endless
wait. Later faults of that mapping that need a fetch are poisoned at once.
(If this agent itself dies, the client's guardian process poisons instead:
vas/guard.py.)
"""
from __future__ import annotations

import enum
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from vas import _native
from vas.core.errors import NotFound, Unavailable, VasError
from vas.node import bulk, locks
from vas.node.segments import IllegalMove

log = logging.getLogger(__name__)

#: Bytes fetched per missing chunk: a random first touch pays one. On the
#: development VM over loopback one bulk request of 32 KiB answers in ~0.15 ms,
#: 64 KiB ~0.17 ms, 256 KiB ~0.38 ms, 1 MiB ~1 ms; a first touch costs ~0.1 ms
#: on top (userfault round trip, Python). 32 KiB measured best for first touches
#: (16 KiB was no faster); sequential reads are served by the read-ahead.
CHUNK = 32 << 10
#: Most bytes fetched ahead of a fault while faults run sequentially.
READ_AHEAD_BYTES = 8 << 20
#: Largest single fetch, in chunks: a long read-ahead is fetched in pieces, each
#: marked present as it lands, so a fault waiting on its first chunks wakes early.
_PIECE = (1 << 20) // CHUNK
#: Most pieces one ``ensure`` claims at a time: a long prefetch claims as it goes,
#: so faults elsewhere in its range are not queued behind all of it.
_CLAIM = 8
#: Threads resolving faults: faults of different chunks (other client threads or
#: processes) are fetched concurrently; one fault costs no thread hand-off.
RESOLVERS = 3
#: Backoff between failed fetches for a fault, seconds (doubling up to the last).
_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
#: After the bulk channel failed, chunks come by ReadPages for this long, seconds.
_BULK_RETRY = 5.0

_MISSING, _FETCHING, _PRESENT = 0, 1, 2
#: bytes.translate table: _PRESENT -> 1, anything else -> 0.
_PRESENT_ONLY = bytes(int(i == _PRESENT) for i in range(256))


class PagesLost(Unavailable):
    """The missing pages of a lazy replica can never be fetched: its home no longer
    holds the segment (deleted, or the home restarted empty), the home is not
    registered (its lease is gone), or the replica was deleted or freed here.
    Faults on such pages are poisoned (SIGBUS) at once. Reaches clients (a
    ``Prefetch``) as ``Unavailable``. ``home_gone``: the home node is not registered,
    so every replica of that home is lost."""

    def __init__(self, message: str, *, home_gone: bool = False):
        super().__init__(message)
        self.home_gone = home_gone


class FillState(enum.Enum):
    """The life of a ``LazyFill``: FILLING ──► LOST ──► CLOSED, FILLING ──► CLOSED.

    FILLING: missing chunks are fetched on demand. LOST: they never will be (the
    home's bytes are gone; ``PagesLost``); present chunks still serve. CLOSED: the
    replica is freed (its fetcher released); present chunks still serve.
    """

    FILLING = "filling"
    LOST = "lost"
    CLOSED = "closed"


_FILL_MOVES = {FillState.FILLING: {FillState.LOST, FillState.CLOSED},
               FillState.LOST: {FillState.CLOSED},
               FillState.CLOSED: set()}


class LazyFill:
    """The present chunks of one lazy replica and the fetching of missing ones.

    ``fetch(offset, length, deadline)`` copies those bytes from the home into the
    replica (``deadline``: a ``time.monotonic()`` value to give up at, or None for
    the fetcher's own timeouts). A chunk is claimed (``_FETCHING``) before its
    fetch starts, outside the lock: concurrent faults on one chunk fetch it once
    (the others wait for it), faults on different chunks fetch in parallel.

    ``on_lost(exc)`` is called (outside the lock, by the thread whose fetch raised
    ``PagesLost``) when a fetch finds the home's bytes gone; the fill is LOST from
    then on (see ``FillState``).
    """

    def __init__(self, size: int, fetch: Callable[[int, int, float | None], None],
                 on_lost: Callable[[PagesLost], None] | None = None):
        self.size = size
        self.state = bytearray(-(-size // CHUNK))
        self._fetch = fetch
        self._on_lost = on_lost
        self._cv = threading.Condition(locks.Lock("lazy fill", locks.Rank.LAZY_FILL))
        self._life = FillState.FILLING
        self._lost = ""  # why, once LOST or CLOSED

    def ensure(self, offset: int, length: int, deadline: float | None = None) -> None:
        """Fetch the missing chunks overlapping [offset, offset + length) (clipped to
        the segment) and wait for those other threads are fetching.

        :param deadline: ``time.monotonic()`` value after which waiting for another
            thread's fetch raises Unavailable (and the fetches made here are given
            only the time left); None: no limit but the fetcher's own timeouts.
        :raises PagesLost: a chunk of the range is missing and the fill is LOST or
            CLOSED (or becomes so while waiting).
        """
        if offset < 0 or length < 0 or offset > self.size:
            raise ValueError(f"range [{offset}, +{length}) is outside a {self.size}-byte replica")
        first, last = offset // CHUNK, min(-(-(offset + length) // CHUNK), len(self.state))
        while True:
            with self._cv:
                pieces = self._claim_locked(first, last)
                if not pieces:
                    if self.state.find(_FETCHING, first, last) < 0:
                        return
                    if self._life is not FillState.FILLING:
                        raise PagesLost(self._lost)
                    timeout = None if deadline is None else deadline - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        raise Unavailable("timed out waiting for a chunk another thread fetches")
                    self._cv.wait(timeout)
                    continue
            self._fetch_pieces(pieces, deadline)

    def present_run(self, chunk: int, limit: int) -> int:
        """How many chunks from ``chunk`` on (at most ``limit``) are present."""
        with self._cv:
            window = self.state[chunk:chunk + limit]
        gaps = [i for i in (window.find(_MISSING), window.find(_FETCHING)) if i >= 0]
        return min(gaps, default=len(window))

    def present_map(self) -> bytes:
        """One byte per chunk: 1 where the chunk holds the home's bytes (chunks being
        fetched count as missing: they land at the home's newest state)."""
        with self._cv:
            return self.state.translate(_PRESENT_ONLY)

    @property
    def life(self) -> FillState:
        with self._cv:
            return self._life

    def lose(self, reason: str) -> bool:
        """The home's bytes are gone (``reason`` says why): missing chunks are never
        fetched from now on, and threads waiting for one raise PagesLost. True if
        this call made the fill LOST."""
        with self._cv:
            if self._life is not FillState.FILLING:
                return False
            self._move_locked(FillState.LOST, reason)
            self._cv.notify_all()
            return True

    def wait_lost(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the fill to stop FILLING (a retrying
        fault's backoff ends at once when the pages are lost); True if it did."""
        with self._cv:
            return self._cv.wait_for(lambda: self._life is not FillState.FILLING, timeout)

    def close(self) -> None:
        """The replica is being freed: wait for fetches in flight, then release the
        fetcher (its connections and fd). Later fetches raise PagesLost."""
        with self._cv:
            if self._life is not FillState.CLOSED:
                self._move_locked(FillState.CLOSED, self._lost or "the lazy replica was released")
            self._cv.notify_all()
            while self.state.find(_FETCHING) >= 0:
                self._cv.wait()
        close = getattr(self._fetch, "close", None)
        if close is not None:
            close()

    def _move_locked(self, to: FillState, reason: str) -> None:
        """The one transition function (``_cv`` held): IllegalMove unless
        ``FillState`` lists ``life -> to``."""
        if to not in _FILL_MOVES[self._life]:
            raise IllegalMove(f"lazy fill: {self._life.value} -> {to.value}")
        self._life, self._lost = to, reason

    def _claim_locked(self, first: int, last: int) -> list[tuple[int, int]]:
        """Mark up to ``_CLAIM`` pieces of missing chunks of [first, last) fetching;
        their (start, end) chunk numbers. PagesLost if one is missing and the fill
        is not FILLING."""
        pieces = []
        index = self.state.find(_MISSING, first, last)
        while index >= 0 and len(pieces) < _CLAIM:
            if self._life is not FillState.FILLING:
                raise PagesLost(self._lost)
            end = index + 1
            while end < last and end - index < _PIECE and self.state[end] == _MISSING:
                end += 1
            self.state[index:end] = bytes([_FETCHING]) * (end - index)
            pieces.append((index, end))
            index = self.state.find(_MISSING, end, last)
        return pieces

    def _fetch_pieces(self, pieces: list[tuple[int, int]], deadline: float | None) -> None:
        for number, (start, end) in enumerate(pieces):
            try:
                offset = start * CHUNK
                self._fetch(offset, min(end * CHUNK, self.size) - offset, deadline)
            except PagesLost as exc:
                self._settle(pieces[number:], _MISSING)
                if self.lose(str(exc)) and self._on_lost is not None:
                    self._on_lost(exc)
                raise
            except BaseException:
                self._settle(pieces[number:], _MISSING)  # unclaimed: others may retry
                raise
            self._settle([(start, end)], _PRESENT)

    def _settle(self, pieces: list[tuple[int, int]], state: int) -> None:
        with self._cv:
            for start, end in pieces:
                self.state[start:end] = bytes([state]) * (end - start)
            self._cv.notify_all()


class Homes:
    """Where the homes of lazy replicas are, cached across attaches and faults: each
    home's gRPC address (``lookup``: ListNodes) and one shared bulk ``Channel``
    (``open_bulk``: OpenBulk, asked once per home, not per segment). Both are
    forgotten after a failure: the home may have restarted at another port.
    """

    def __init__(self, lookup: Callable[[str], str | None],
                 open_bulk: Callable[[str, str, int], object], timeout: float):
        self._lookup = lookup
        self._open_bulk = open_bulk
        self._timeout = timeout
        self._addresses: dict[str, str] = {}
        self._channels: dict[str, bulk.Channel] = {}
        self._lock = locks.Lock("lazy homes", locks.Rank.HOME_CHANNELS)
        #: Per home: the OpenBulk in flight, if any; the first fault opens the channel,
        #: the others wait for it (a dead home's timeout holds up only its replicas).
        self._opening: dict[str, threading.Event] = {}

    def address(self, node: str) -> str:
        """The gRPC address of ``node``; PagesLost (``home_gone``) if it is not
        registered: its lease is gone, and with it the segments it held."""
        with self._lock:
            address = self._addresses.get(node)
        if address is None:
            address = self._lookup(node)
            if address is None:
                raise PagesLost(f"home node {node} is not registered (down?)", home_gone=True)
            with self._lock:
                self._addresses[node] = address
        return address

    def channel(self, node: str, name: str, segment_id: int) -> bulk.Channel:
        """The bulk channel to ``node``, opened (OpenBulk of ``name``) if needed; at most
        one OpenBulk per home at a time, and no lock is held across it."""
        deadline = time.monotonic() + self._timeout
        while True:
            with self._lock:
                channel = self._channels.get(node)
                opening = self._opening.get(node)
                if channel is None and opening is None:
                    opened_here = self._opening[node] = threading.Event()
            if channel is not None:
                return channel
            if opening is None:
                return self._open(node, name, segment_id, opened_here)
            if not opening.wait(max(0.0, deadline - time.monotonic())):
                raise Unavailable(f"timed out waiting for the bulk channel of node {node}")

    def _open(self, node: str, name: str, segment_id: int,
              opened: threading.Event) -> bulk.Channel:
        try:
            address = self.address(node)
            try:
                response = self._open_bulk(address, name, segment_id)
            except VasError:
                self.forget(node)
                raise
            channel = bulk.Channel(response.address, self._timeout)
            with self._lock:
                self._channels[node] = channel
            return channel
        finally:
            with self._lock:
                self._opening.pop(node, None)
            opened.set()

    def forget(self, node: str, channel: bulk.Channel | None = None) -> None:
        """Drop what is known of ``node``; with ``channel``, only if that is still its
        channel (another thread may have opened a new one since)."""
        with self._lock:
            if channel is not None and self._channels.get(node) is not channel:
                return
            self._addresses.pop(node, None)
            dropped = self._channels.pop(node, None)
        if dropped is not None:
            dropped.close()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


class HomeReader:
    """``fetch(offset, length, deadline)`` of a LazyFill: a request on the home's bulk
    channel (``Homes.channel``) written into the replica's memfd, else ReadPages.

    ``read_pages(address, offset, length, timeout)`` is the gRPC fallback, used for
    ``_BULK_RETRY`` seconds after the channel failed. The home answering NotFound
    (it does not hold the segment: deleted, or the home restarted empty) and the
    home not being registered are raised as ``PagesLost``; another VasError the
    home answers (InvalidArgument) as it is. Any failure makes ``homes`` forget
    the home, so the next attempt looks it up again. With a ``deadline``, each
    network wait is cut to the time left (at most the channel's own timeout).
    """

    def __init__(self, homes: Homes, home: str, name: str, segment_id: int, fd: int,
                 read_pages: Callable[[str, int, int], None]):
        self._homes, self._home, self._name, self._segment_id = homes, home, name, segment_id
        self._fd = os.dup(fd)  # ours: the replica's fds may be closed under a late fetch
        self._read_pages = read_pages
        self._bulk_after = 0.0

    def prepare(self) -> None:
        """Look the home up and open a bulk connection (in the background after an
        attach): the first fault then pays neither ListNodes, OpenBulk nor a connect."""
        try:
            self._homes.channel(self._home, self._name, self._segment_id).connect()
        except (VasError, OSError) as exc:  # the first fetch tries again, then falls back
            log.info("cannot reach the bulk channel of node %s yet: %s", self._home, exc)

    def __call__(self, offset: int, length: int, deadline: float | None = None) -> None:
        if self._fd < 0:
            raise PagesLost("the lazy replica was released")
        try:
            self._read(offset, length, deadline)
        except NotFound as exc:
            raise PagesLost(f"home node {self._home} no longer holds segment {self._name} "
                            f"(id {self._segment_id}): {exc}") from exc

    def _read(self, offset: int, length: int, deadline: float | None) -> None:
        if time.monotonic() >= self._bulk_after:
            channel = None
            try:
                channel = self._homes.channel(self._home, self._name, self._segment_id)
                channel.read(self._segment_id, offset, length, self._fd,
                             _time_left(deadline, "bulk chunk read"))
                return
            except PagesLost:
                raise
            except Unavailable as exc:
                log.warning("bulk chunk read from node %s failed: %s; using ReadPages for "
                            "%.0f s", self._home, exc, _BULK_RETRY)
                self._homes.forget(self._home, channel)
                self._bulk_after = time.monotonic() + _BULK_RETRY
        try:
            self._read_pages(self._homes.address(self._home), offset, length,
                             _time_left(deadline, "ReadPages of a chunk"))
        except VasError:
            self._homes.forget(self._home)
            raise

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _time_left(deadline: float | None, what: str) -> float | None:
    """Seconds until ``deadline`` (None for none); Unavailable once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise Unavailable(f"{what}: out of time")
    return left


class _Registration:
    """One client mapping of a lazy replica: its userfaultfd and where it is mapped.

    ``active`` counts resolver threads working on it; a removed registration's
    uffd is closed only once that is 0. ``lost``: why its faults that need a
    fetch are poisoned at once (a fault of it already waited ``fault_timeout``
    in vain, or its pages are lost); "" while they are fetched.
    """

    __slots__ = ("uffd", "fill", "address", "size", "next_chunk", "ahead", "active",
                 "removed", "lost")

    def __init__(self, uffd: int, fill: LazyFill, address: int, size: int):
        self.uffd, self.fill, self.address, self.size = uffd, fill, address, size
        self.next_chunk = -1
        self.ahead = 1
        self.active = 0
        self.removed = False
        self.lost = ""

    def step(self, chunk: int) -> int:
        """Chunks to have present from ``chunk`` on: a fault just past what the last
        one mapped doubles the read-ahead, a jump starts over at one chunk.
        (Racy across resolver threads by design: it is a heuristic.)"""
        self.ahead = (min(self.ahead * 2, READ_AHEAD_BYTES // CHUNK)
                      if chunk == self.next_chunk else 1)
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
        self._registrations: dict[int, _Registration] = {}
        self._closing: list[_Registration] = []  # removed: closed once idle
        self._lock = locks.Lock("fault registrations", locks.Rank.FAULTS)
        # Held by the one thread polling (a leaf: it takes only _lock inside).
        self._leader = locks.Lock("fault leader", locks.Rank.FAULT_LEADER)
        self._poll = select.poll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll.register(self._wake_r, select.POLLIN)
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._run, name="vas-faults", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def add(self, uffd: int, fill: LazyFill, address: int, size: int) -> None:
        with self._lock:
            self._registrations[uffd] = _Registration(uffd, fill, address, size)
            self._poll.register(uffd, select.POLLIN)
        self._wake()

    def remove(self, uffd: int) -> None:
        """Forget ``uffd`` (the client unmapped or is gone). A handler thread closes
        it once no fault of it is being resolved, so a resolver never meets a
        recycled fd number."""
        with self._lock:
            registration = self._registrations.pop(uffd, None)
            if registration is None:
                return
            registration.removed = True
            self._poll.unregister(uffd)
            self._closing.append(registration)
        self._wake()

    def registered(self, uffd: int) -> bool:
        with self._lock:
            return uffd in self._registrations

    def stop(self) -> None:
        self._stopping.set()
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

    def _next_fault(self) -> tuple[_Registration, int] | None:
        """Poll until one page fault is read (its registration marked active); None
        when stopping."""
        while not self._stopping.is_set():
            self._close_idle()
            for fd, _ in self._poll.poll():
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    registration = self._registrations.get(fd)
                    if registration is not None:
                        registration.active += 1
                if registration is None:
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

    def _read_fault(self, registration: _Registration) -> int | None:
        """The address of one pending page fault of ``registration``, if any (one at a
        time, so the other resolver threads can take the next ones)."""
        try:
            events = _native.uffd_read(registration.uffd, 1)
        except OSError as exc:
            log.warning("reading userfaults failed (%s): dropping the registration", exc)
            self.remove(registration.uffd)
            return None
        for event, _flags, address in events:
            if event == _native.UFFD_EVENT_PAGEFAULT:
                return address
        return None

    def _resolve(self, registration: _Registration, address: int) -> None:
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
            return
        if outcome is _Outcome.LOST:
            _poison(registration, start, min(CHUNK, registration.size - start), page)
            return
        run = registration.fill.present_run(chunk, ahead)
        registration.next_chunk = chunk + run
        _map_in(registration, start, min(run * CHUNK, registration.size - start), page)
        if ahead > 1:  # after the wake-up: the client reads on while this fetches
            self._read_ahead(registration, start + CHUNK, (ahead - 1) * CHUNK)

    def _read_ahead(self, registration: _Registration, offset: int, length: int) -> None:
        if offset >= registration.size or registration.lost:
            return
        try:
            registration.fill.ensure(offset, length)
        except Exception as exc:  # noqa: BLE001  (speculative: the fault itself retries)
            log.debug("read-ahead of [%d, +%d) failed: %s", offset, length, exc)

    def _fetch_for_fault(self, registration: _Registration, offset: int,
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
                if self._stopping.is_set() or not self.registered(registration.uffd):
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
        if self._stopping.is_set() or not self.registered(registration.uffd):
            return _Outcome.GONE
        if not registration.lost:
            registration.lost = reason
            log.warning("lazy fetch of [%d, +%d) for a client mapping failed for good: %s; "
                        "its faults on pages not fetched yet get SIGBUS", offset, length,
                        reason)
        return _Outcome.LOST


def _map_in(registration: _Registration, offset: int, length: int, page: int) -> None:
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


def _poison(registration: _Registration, offset: int, length: int, page: int) -> None:
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
    try:
        _native.uffd_wake(uffd, page, _native.PAGE_SIZE)
    except OSError as exc:
        log.debug("UFFDIO_WAKE failed: %s", exc)
