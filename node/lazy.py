"""Demand paging of lazy replicas (``fetch="lazy"``) with userfaultfd.

A lazy replica is a sparse memfd: the agent maps it writable and fills 256 KiB
chunks from the home on demand; ``LazyFill`` records which chunks are present.
A client maps the replica, registers its mapping on a userfaultfd (MISSING and
MINOR modes) and hands that fd to the agent (``RegisterFaults``). The agent's
one ``FaultHandler`` thread reads the faults: it fetches the chunk around a
fault (more when faults run sequentially) into its own mapping, which puts the
pages in the memfd's page cache, then ``UFFDIO_CONTINUE`` maps them into the
client and wakes the faulting thread. The client's thread sleeps in the kernel,
so it may hold the GIL: the agent is another process.

Measured ~50-65 us per fault round trip, so a fault resolves a whole chunk,
not a page. A fetch that fails is retried with bounded backoff for as long as
the registration lives: the faulting thread blocks until the home answers
(never zeros in place of the home's bytes).
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time

from vas import _native

log = logging.getLogger(__name__)

#: Bytes fetched per missing chunk. A ReadPages of 256 KiB takes ~3-4 ms here
#: against ~8-11 ms for 1 MiB (Python gRPC streaming), and 10 random pages move
#: 2.5 MiB; sequential runs are served by the read-ahead.
CHUNK = 256 << 10
#: Most chunks fetched at one fault while faults run sequentially (8 MiB).
READ_AHEAD = 32
#: Backoff between failed fetches for a fault, seconds (doubling up to the last).
_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class LazyFill:
    """The present chunks of one lazy replica and the fetching of missing ones.

    ``fetch(offset, length)`` copies those bytes from the home into the replica.
    One lock serialises fetches, so concurrent faults on a chunk fetch it once.
    """

    def __init__(self, size: int, fetch):
        self.size = size
        self.present = bytearray(-(-size // CHUNK))
        self._fetch = fetch
        self._lock = threading.Lock()

    def ensure(self, offset: int, length: int) -> None:
        """Fetch the missing chunks overlapping [offset, offset + length)."""
        first, last = offset // CHUNK, -(-(offset + length) // CHUNK)
        with self._lock:
            index = first
            while index < last:
                if self.present[index]:
                    index += 1
                    continue
                end = index
                while end < last and not self.present[end]:
                    end += 1
                start, stop = index * CHUNK, min(end * CHUNK, self.size)
                self._fetch(start, stop - start)
                self.present[index:end] = b"\x01" * (end - index)
                index = end


class _Registration:
    """One client mapping of a lazy replica: its userfaultfd and where it is mapped."""

    __slots__ = ("uffd", "fill", "address", "size", "next_chunk", "ahead")

    def __init__(self, uffd: int, fill: LazyFill, address: int, size: int):
        self.uffd, self.fill, self.address, self.size = uffd, fill, address, size
        self.next_chunk = -1
        self.ahead = 1


class FaultHandler:
    """The agent's thread resolving the userfaults of every registered client mapping."""

    def __init__(self):
        self._registrations: dict[int, _Registration] = {}
        self._closing: list[int] = []  # removed uffds the thread closes
        self._lock = threading.Lock()
        self._poll = select.poll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll.register(self._wake_r, select.POLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vas-faults", daemon=True)
        self._thread.start()

    def add(self, uffd: int, fill: LazyFill, address: int, size: int) -> None:
        with self._lock:
            self._registrations[uffd] = _Registration(uffd, fill, address, size)
            self._poll.register(uffd, select.POLLIN)
        os.write(self._wake_w, b"x")

    def remove(self, uffd: int) -> None:
        """Forget ``uffd`` (the client unmapped or is gone). The handler thread closes
        it, so a fault it is resolving never meets a recycled fd number."""
        with self._lock:
            if self._registrations.pop(uffd, None) is None:
                return
            self._poll.unregister(uffd)
            self._closing.append(uffd)
        os.write(self._wake_w, b"x")

    def registered(self, uffd: int) -> bool:
        with self._lock:
            return uffd in self._registrations

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(5.0)
        with self._lock:
            fds = self._closing + list(self._registrations)
            self._closing, self._registrations = [], {}
        for fd in fds + [self._wake_r, self._wake_w]:
            os.close(fd)

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                closing, self._closing = self._closing, []
            for uffd in closing:
                os.close(uffd)
            for fd, _ in self._poll.poll():
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    registration = self._registrations.get(fd)
                if registration is not None:
                    self._serve(registration)

    def _serve(self, registration: _Registration) -> None:
        try:
            events = _native.uffd_read(registration.uffd)
        except OSError as exc:
            log.warning("reading userfaults failed (%s): dropping the registration", exc)
            self.remove(registration.uffd)
            return
        for event, _flags, address in events:
            if event == _native.UFFD_EVENT_PAGEFAULT:
                self._resolve(registration, address)

    def _resolve(self, registration: _Registration, address: int) -> None:
        offset = address - registration.address
        chunk = offset // CHUNK
        # Sequential faults double the read-ahead; a jump starts over at one chunk.
        registration.ahead = (min(registration.ahead * 2, READ_AHEAD)
                              if chunk == registration.next_chunk else 1)
        start = chunk * CHUNK
        stop = min((chunk + registration.ahead) * CHUNK, registration.size)
        registration.next_chunk = chunk + 1
        self._fetch_retrying(registration, start, stop - start)
        page = address & ~(_native.PAGE_SIZE - 1)
        _map_in(registration, start, min(stop, start + CHUNK) - start, page)

    def _fetch_retrying(self, registration: _Registration, offset: int, length: int) -> None:
        for attempt in range(1 << 62):
            try:
                registration.fill.ensure(offset, length)
                return
            except Exception as exc:  # noqa: BLE001  (any failure: retry, the thread waits)
                if self._stopping or not self.registered(registration.uffd):
                    return
                delay = _BACKOFF[min(attempt, len(_BACKOFF) - 1)]
                log.error("lazy fetch of [%d, +%d) failed (attempt %d): %s; the faulting "
                          "thread waits, retrying in %.2f s", offset, length, attempt + 1,
                          exc, delay)
                time.sleep(delay)


def _map_in(registration: _Registration, offset: int, length: int, page: int) -> None:
    """Map the fetched chunk into the client and wake the faulting thread.

    Pages of the chunk mapped already (another fault) stop the ioctl with EEXIST:
    then only the faulting page is mapped, or just woken if it is there too.
    """
    uffd = registration.uffd
    try:
        _native.uffd_continue(uffd, registration.address + offset, length)
        return
    except FileExistsError:
        pass
    except OSError as exc:  # EAGAIN: the mapping is changing; ENOENT/ESRCH: the process is gone
        log.debug("UFFDIO_CONTINUE failed: %s", exc)
    try:
        _native.uffd_continue(uffd, page, _native.PAGE_SIZE)
    except OSError:
        try:
            _native.uffd_wake(uffd, page, _native.PAGE_SIZE)
        except OSError as exc:
            log.debug("UFFDIO_WAKE failed: %s", exc)

