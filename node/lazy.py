"""Demand paging of lazy replicas (``fetch="lazy"``) with userfaultfd.

A lazy replica is a sparse memfd that fills in ``CHUNK``-sized pieces from
the home on demand; ``LazyFill`` records which chunks are present. A client
maps the replica, registers its mapping on a userfaultfd (MISSING and MINOR
modes) and hands that fd to the agent (``RegisterFaults``). The agent's
``FaultHandler`` threads (node/faults.py) read the faults: one fetches the
chunk around a fault through ``LazyFill.ensure`` (``HomeReader``: a request on
a persistent bulk connection to the home, whose bytes are written into the
memfd's page cache), then ``UFFDIO_CONTINUE`` maps the pages into the client
and wakes the faulting thread. The client's thread sleeps in the kernel, so it
may hold the GIL: the agent is another process.

When the bytes can never come (``PagesLost``: the home no longer holds the
segment, is not registered, or the replica was deleted here) the fill is LOST
(``FillState``): its missing chunks are never fetched, and the fault resolvers
**poison** faults on them (``UFFDIO_POISON``): the faulting thread gets
SIGBUS, as from a truncated mmap'd file, never zeros in place of the home's
bytes. A fetch that fails otherwise is retried for at most ``fault_timeout``
seconds, then poisoned too (node/faults.py). (If this agent itself dies, the
client's guardian process poisons instead: vas/guard.py.)
"""
from __future__ import annotations

import contextlib
import enum
import logging
import ssl
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from vas.core.errors import CapacityExceeded, NotFound, Unavailable, VasError
from vas.node import bulk, locks, metrics
from vas.node.segments import IllegalMove
from vas.node.store import populate

log = logging.getLogger(__name__)

#: Bytes fetched per missing chunk: a random first touch pays one. On the
#: development VM over loopback one bulk request of 32 KiB answers in ~0.15 ms,
#: 64 KiB ~0.17 ms, 256 KiB ~0.38 ms, 1 MiB ~1 ms; a first touch costs ~0.1 ms
#: on top (userfault round trip, Python). 32 KiB measured best for first touches
#: (16 KiB was no faster); sequential reads are served by the read-ahead.
CHUNK = 32 << 10
#: Largest single fetch, in chunks: a long read-ahead is fetched in pieces, each
#: marked present as it lands, so a fault waiting on its first chunks wakes early.
_PIECE = (1 << 20) // CHUNK
#: Most pieces one ``ensure`` claims at a time: a long prefetch claims as it goes,
#: so faults elsewhere in its range are not queued behind all of it.
_CLAIM = 8
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

    @classmethod
    def complete(cls, size: int) -> LazyFill:
        """A fill with every chunk present (CLOSED: nothing is ever fetched), for a
        client mapping registered after its replica became complete (node/replicas.py
        ``register_faults``): its faults are only mapped in."""
        fill = cls(size, fetch=_nothing_to_fetch)
        fill.state[:] = bytes([_PRESENT]) * len(fill.state)
        fill._move_locked(FillState.CLOSED, "the replica is complete")
        return fill

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
                # Nothing another thread fetches and all that is missing claimed here:
                # present once these pieces are fetched, no second look needed.
                alone = self.state.find(_FETCHING, first, last) < 0
                pieces = self._claim_locked(first, last)
                alone = alone and len(pieces) < _CLAIM
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
            if alone:
                return

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


def _nothing_to_fetch(offset: int, length: int, deadline: float | None = None) -> None:
    raise PagesLost("a complete replica has nothing to fetch")


class Homes:
    """Where the homes of lazy replicas are, cached across attaches and faults: each
    home's gRPC address (``lookup``: ListNodes) and one shared bulk ``Channel``
    (``open_bulk``: OpenBulk, asked once per home, not per segment). Both are
    forgotten after a failure: the home may have restarted at another port.
    ``tls``: the bulk channel's client context (None: plaintext).
    """

    def __init__(self, lookup: Callable[[str], str | None],
                 open_bulk: Callable[[str, str, int], object], timeout: float,
                 tls: ssl.SSLContext | None = None):
        self._lookup = lookup
        self._open_bulk = open_bulk
        self._timeout = timeout
        self._tls = tls
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
            channel = bulk.Channel(response.address, self._timeout, self._tls)
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
    ``transfer()`` marks each read as a transfer under way (the warm pool waits).
    """

    def __init__(self, homes: Homes, home: str, name: str, segment_id: int, mapping,
                 read_pages: Callable[[str, int, int], None],
                 transfer: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                 rehome: Callable[[str], str | None] | None = None, rehome_wait: float = 0.0,
                 *, allocated: bool = False):
        self._homes, self._home, self._name, self._segment_id = homes, home, name, segment_id
        #: The agent's writable mapping of the replica: chunks are received straight into
        #: it (one copy). Fetches never outlive it: the replica is freed after
        #: ``LazyFill.close``.
        self._mapping = mapping
        #: Whether every page of the memfd is allocated (warm pool memory); else each
        #: range is allocated just before its bytes are received (``_allocate``).
        self._allocated = allocated
        #: For a segment with backups: failed home -> the node a backup was promoted on,
        #: holding the version this replica is at, or None (yet); one record read
        #: (node/replicas.py). Looked for during at most ``rehome_wait`` seconds.
        self._rehome, self._rehome_wait = rehome, rehome_wait
        self._read_pages = read_pages
        self._transfer = transfer
        self._bulk_after = 0.0
        self._closed = False

    def prepare(self) -> None:
        """Look the home up and open a bulk connection (in the background after an
        attach): the first fault then pays neither ListNodes, OpenBulk nor a connect."""
        try:
            self._homes.channel(self._home, self._name, self._segment_id).connect()
        except (VasError, OSError) as exc:  # the first fetch tries again, then falls back
            log.info("cannot reach the bulk channel of node %s yet: %s", self._home, exc)

    def __call__(self, offset: int, length: int, deadline: float | None = None) -> None:
        if self._closed:
            raise PagesLost("the lazy replica was released")
        started = time.perf_counter()
        try:
            with self._transfer():
                self._allocate(offset, length)
                try:
                    self._read(offset, length, deadline)
                except (Unavailable, NotFound) as exc:
                    # A segment with backups outlives its home (unreachable, gone, or
                    # restarted without it): fetch from the promoted one.
                    if self._rehome is None or (isinstance(exc, PagesLost)
                                                and not exc.home_gone):
                        raise
                    self._await_home(offset, length, deadline, exc)
            metrics.observe_since(metrics.FETCH_CHUNK, started)
        except NotFound as exc:
            raise PagesLost(f"home node {self._home} no longer holds segment {self._name} "
                            f"(id {self._segment_id}): {exc}") from exc

    def _read(self, offset: int, length: int, deadline: float | None) -> None:
        if time.monotonic() >= self._bulk_after:
            channel = None
            try:
                channel = self._homes.channel(self._home, self._name, self._segment_id)
                timeout = _time_left(deadline, "bulk chunk read")
                with memoryview(self._mapping) as raw, raw.cast("B") as view, \
                        view[offset:offset + length] as part:
                    channel.read(self._segment_id, offset, part, timeout)
                return
            except PagesLost:
                raise
            except (Unavailable, CapacityExceeded) as exc:  # down, or over its bulk limits
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

    def _await_home(self, offset: int, length: int, deadline: float | None,
                    failure: VasError) -> None:
        """The home failed a read of a segment with backups: until ``deadline`` (at most
        ``rehome_wait`` seconds), alternately look for a promoted home (the record) and
        try the old one again (it may only have blinked); read from whichever answers.
        Raises the last failure when neither does in time."""
        limit = time.monotonic() + self._rehome_wait
        until = limit if deadline is None else min(deadline, limit)
        while True:
            home = self._rehome(self._home)
            if home is not None and home != self._home:
                log.warning("segment %s: home %s failed (%s), fetching from %s (a promoted "
                            "backup)", self._name, self._home, failure, home)
                self._home = home
            try:
                self._read(offset, length, deadline)
                return
            except (Unavailable, NotFound) as exc:
                if isinstance(exc, PagesLost) and not exc.home_gone:
                    raise
                failure = exc
            if time.monotonic() + _REHOME_POLL > until:
                raise failure
            time.sleep(_REHOME_POLL)

    def _allocate(self, offset: int, length: int) -> None:
        """Allocate the pages of a sparse replica's [offset, offset + length) ahead of
        receiving into them: ``MADV_POPULATE_WRITE`` fails with ENOMEM where the
        receive's own page faults would be SIGBUS for the agent. Why not receive into a
        buffer and ``pwrite`` (no fault, the kernel allocates): the ``pwrite``s of one
        memfd take turns on its inode lock, so the read-ahead's streams allocated one at
        a time; populated side by side, a cold lazy GiB on the development VM filled in
        0.85-1.07 s against 1.00-1.05 s, and there is one receive path, not two."""
        if not self._allocated:
            populate(self._mapping, offset, length, f"replica {self._name}")

    def close(self) -> None:
        self._closed = True


#: Seconds between looks for a promoted home while the home fails (``_await_home``).
_REHOME_POLL = 0.1


def _time_left(deadline: float | None, what: str) -> float | None:
    """Seconds until ``deadline`` (None for none); Unavailable once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise Unavailable(f"{what}: out of time")
    return left

