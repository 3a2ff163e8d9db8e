"""Relays: agents that fetch a copy of a segment serve it on to later fetchers.

Without them N agents attaching one segment cost its home N transfers (3 readers
behind a 2 gbit home link: 13.5 s instead of 4.5 s). With them:

- **The home picks who pulls from whom** (``Directory``, at ``Node.OpenBulk``). An
  agent that fetches a copy names its own bulk listener (``relay_address``); the home
  keeps, per segment id and version, those agents in the order they asked, and
  answers the k-th one (k >= 1) the ``(k - 1) // fanout``-th as its source, the first
  one itself: a tree in which the home sends one copy and every relay at most
  ``fanout`` (``--relay-fanout``). A source is always an earlier member (or the home,
  for a fetcher the tree forgot while it fetched), so a fetch never waits on itself
  through a cycle.
- **A relay serves what it has received** (``Copy``): the fetch reports each range's
  received prefix; a relay request (magic ``VASRELAY`` with the version) is answered
  only from a copy of exactly that id and version, byte runs sent as they arrive, the
  relay waiting (``timeout`` per wait) for the ones still coming. A copy whose own
  fetch fails, or that is retired, evicted, taken by a writer or refreshed, serves
  nothing more: a request in flight ends after its current run (at once, its
  connection shut down, when the bytes are about to change) and the connection closes
  short, so no byte it never received, nor one changed since, is ever sent.
- **A fetch whose source fails goes on elsewhere** (node/replicas.py): it names the
  failed relays in its next OpenBulk (the home forgets them and answers another source
  or itself) and fetches only the bytes it does not have yet.
- **Memory**: a copy's memory is given back only once no request is being served from
  it (``release`` waits for the last one to end, from that thread); memfds are never
  reused across segments, so a relay never sends another segment's bytes.
"""
from __future__ import annotations

import bisect
import collections
import enum
import os
import socket
import threading
import time
from collections.abc import Callable

from vas.core.errors import NotFound, Unavailable
from vas.node import locks

#: Segments the home's directory remembers (least recently asked about forgotten first).
_MAX_SEGMENTS = 1024
#: Relays remembered per segment version (later fetchers still get a source, but are
#: not offered to others).
_MAX_MEMBERS = 64
#: Bytes a relay sends per run at least (unless the range ends sooner), and the steps
#: in which a range's progress wakes the requests waiting on it: waking them for every
#: ``recv_into`` (tens of KiB) cost more CPU in thread switches than the bytes did, and
#: each run costs a few Python calls per request. 4 MiB delays a child by ~4 ms per hop
#: at 1 GB/s (~17 ms at 2 gbit).
_PIECE = 4 << 20


class Directory:
    """The home's side: which agents fetch or hold each of its segments, per version, and
    whom the next fetcher pulls from (see the module docstring). Thread-safe."""

    def __init__(self, fanout: int):
        self.fanout = fanout
        self._lock = locks.Lock("relay directory", locks.Rank.RELAY_DIRECTORY)
        #: segment id -> (version, relay addresses in the order they asked)
        self._trees: collections.OrderedDict[int, tuple[int, list[str]]] = \
            collections.OrderedDict()

    def source(self, segment_id: int, version: int, relay_address: str,
               failed: list[str]) -> str:
        """The relay the fetcher of ``segment_id`` at ``version`` pulls from, "" for this
        home; ``relay_address`` (the fetcher's listener, "" if it does not relay) joins
        the tree, ``failed`` relays leave it."""
        if self.fanout <= 0:
            return ""
        with self._lock:
            known = self._trees.get(segment_id)
            if known is None or known[0] != version:  # a new version starts a new tree
                known = self._trees[segment_id] = (version, [])
            self._trees.move_to_end(segment_id)
            while len(self._trees) > _MAX_SEGMENTS:
                self._trees.popitem(last=False)
            members = known[1]
            for address in failed:
                if address in members and address != relay_address:
                    members.remove(address)
            if relay_address in members:  # asking again (its source failed)
                position = members.index(relay_address)
            else:
                position = len(members)
                if relay_address and position < _MAX_MEMBERS:
                    members.append(relay_address)
                if failed:  # forgotten mid-fetch (a child named it failed): its children
                    return ""  # may sit anywhere in the order, so only the home is safe
            return members[(position - 1) // self.fanout] if position else ""


class _State(enum.Enum):
    FILLING = "filling"      # its fetch is under way
    COMPLETE = "complete"    # every byte received
    CLOSED = "closed"        # serves nothing more (failed, retired, changing, freed)


class Copy:
    """One copy of a segment this agent fetches or holds, as relays serve it: the
    received prefix of each fetched range, the requests being served, the memory's
    release deferred past the last of them."""

    def __init__(self, info, fd: int, on_close: Callable[["Copy"], None]):
        """``info``: the record the copy is fetched for; ``fd``: its memfd (the copy's
        owner keeps it open until ``release``)."""
        self.info = info
        self.id = info.id
        self.size = info.size
        self.version: int | None = None  # told by the home's OpenBulk
        self._fd = fd
        self._on_close = on_close
        self._lock = locks.Lock("relay copy", locks.Rank.RELAY_COPY)
        self._cv = threading.Condition(self._lock)  # version, state, requests served
        self._state = _State.FILLING
        self._starts: list[int] = []  # sorted range starts
        self._ends: list[int] = []
        self._filled: list[int] = []  # received up to, per range
        self._told: list[int] = []    # ``_filled`` when its waiters were last woken
        self._arrivals: list[threading.Condition] = []  # per range, on the same lock
        self._serving: dict[int, socket.socket] = {}  # token -> connection
        self._next_token = 0
        self._release: Callable[[], None] | None = None

    # ------------------------------------------------------------------ the fetch's side

    def expect(self, ranges: list[tuple[int, int]]) -> None:
        """The fetch receives these (offset, length) ranges, each from its start on."""
        with self._cv:
            for offset, length in sorted(ranges):
                self._starts.append(offset)
                self._ends.append(offset + length)
                self._filled.append(offset)
                self._told.append(offset)
                self._arrivals.append(threading.Condition(self._lock))

    def opened(self, version: int) -> None:
        """The home serves this copy at ``version`` (its first OpenBulk)."""
        with self._cv:
            if self.version is None:
                self.version = version
                self._cv.notify_all()

    def missing(self) -> list[tuple[int, int]]:
        """(offset, length) of every byte not received yet."""
        with self._cv:
            return [(filled, end - filled) for filled, end in zip(self._filled, self._ends)
                    if filled < end]

    def received(self, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) arrived, right after the received prefix of
        their range."""
        with self._cv:
            i = bisect.bisect_right(self._starts, offset) - 1
            if i >= 0 and self._filled[i] == offset:
                filled = self._filled[i] = min(offset + length, self._ends[i])
                if filled - self._told[i] >= _PIECE or filled == self._ends[i]:
                    self._told[i] = filled
                    self._arrivals[i].notify_all()

    def complete(self) -> None:
        with self._cv:
            if self._state is _State.FILLING:
                self._state = _State.COMPLETE
                self._filled = list(self._ends)
                self._wake_all_locked()

    # ------------------------------------------------------------------ the relay's side

    def serve(self, version: int, conn: socket.socket, timeout: float) -> tuple[int, int]:
        """(token, dup of the memfd) for serving ``conn`` a request of this copy at
        ``version`` (waiting up to ``timeout`` for the home to name the version); end
        it with ``served(token, fd)``. NotFound if the copy is of another version or
        serves nothing any more."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.version is None and self._state is _State.FILLING:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if self._state is _State.CLOSED or self.version != version:
                raise NotFound(f"this agent relays no copy of segment id {self.id} at "
                               f"version {version}")
            token = self._next_token
            self._next_token += 1
            self._serving[token] = conn
            return token, os.dup(self._fd)

    def ready(self, offset: int, end: int, timeout: float) -> int:
        """Wait until ``_PIECE`` bytes from ``offset`` on have arrived (fewer where the
        request or a fetched range ends; at most ``timeout`` seconds); how far they go
        (at most ``end``). Unavailable when the copy stops serving or nothing arrives
        in time."""
        deadline = time.monotonic() + timeout
        want = min(offset + _PIECE, end)
        with self._cv:
            while True:
                if self._state is _State.CLOSED:
                    raise Unavailable(f"relay copy of segment id {self.id} stopped serving")
                upto = self._present_locked(offset, end)
                i = bisect.bisect_right(self._starts, upto) - 1  # the range filling at upto
                if upto >= want or (upto > offset and self._filled[i] == self._starts[i]):
                    return upto
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"relay copy of segment id {self.id}: no bytes from "
                                      f"{offset} on within {timeout:.1f} s")
                self._arrivals[i].wait(left)

    def _wake_all_locked(self) -> None:
        self._cv.notify_all()
        for arrival in self._arrivals:
            arrival.notify_all()

    def _present_locked(self, offset: int, end: int) -> int:
        if self._state is _State.COMPLETE:
            return end
        upto = offset
        i = bisect.bisect_right(self._starts, offset) - 1
        while 0 <= i < len(self._starts) and self._starts[i] <= upto < self._ends[i] \
                and upto < end:
            upto = max(upto, self._filled[i])
            if upto < self._ends[i]:
                break
            i += 1
        return min(upto, end)

    def served(self, token: int, fd: int) -> None:
        """A request ended; the last one after ``release`` gives the memory back."""
        os.close(fd)
        with self._cv:
            self._serving.pop(token, None)
            free = self._release if not self._serving else None
            if free is not None:
                self._release = None
            self._cv.notify_all()
        if free is not None:
            free()

    # ------------------------------------------------------------------ the owner's side

    def close(self, cut: bool = False) -> None:
        """Serve nothing more; ``cut``: end the requests in flight too (their connections
        are shut down, the peers see them end short and fetch the rest elsewhere)."""
        with self._cv:
            was = self._state
            self._state = _State.CLOSED
            conns = list(self._serving.values()) if cut else []
            self._wake_all_locked()
        if was is not _State.CLOSED:
            self._on_close(self)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def quiesce(self, timeout: float) -> None:
        """Before the copy's bytes change (a writer, a refresh): close it, cut the
        requests in flight and wait for them to end. Unavailable after ``timeout``."""
        self.close(cut=True)
        with self._cv:
            if not self._cv.wait_for(lambda: not self._serving, timeout):
                raise Unavailable(f"copy of segment id {self.id} is still being relayed "
                                  f"after {timeout:.0f} s")

    def release(self, free: Callable[[], None]) -> None:
        """Close the copy and ``free`` its memory now, or when its last request ends."""
        self.close()
        with self._cv:
            if self._serving:
                self._release, free = free, None
        if free is not None:
            free()


class Copies:
    """The copies this agent relays, by segment id (one per id: the newest)."""

    def __init__(self):
        self._lock = locks.Lock("relay copies", locks.Rank.RELAY_COPIES)
        self._by_id: dict[int, Copy] = {}
        #: host:port of this agent's bulk listener, offered to homes (set by the server).
        self.address = ""

    def begin(self, info, fd: int) -> Copy:
        """A copy of ``info`` being fetched into memfd ``fd``, served from now on."""
        copy = Copy(info, fd, self._closed)
        with self._lock:
            old = self._by_id.get(info.id)
            self._by_id[info.id] = copy
        if old is not None:
            old.close()
        return copy

    def find(self, segment_id: int) -> Copy:
        with self._lock:
            copy = self._by_id.get(segment_id)
        if copy is None:
            raise NotFound(f"this agent relays no copy of segment id {segment_id}")
        return copy

    def _closed(self, copy: Copy) -> None:
        with self._lock:
            if self._by_id.get(copy.id) is copy:
                del self._by_id[copy.id]
