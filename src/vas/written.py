"""``WrittenPages``: the pages a remote writer stored to since its last sync.

A "rw" mapping of a replica (a segment homed on another node) is registered on a
userfaultfd for write-protect with UFFD_FEATURE_WP_ASYNC (Linux 6.7) and
protected whole before its first store. A store to a protected page faults once
and the kernel resolves it itself (no thread, no round trip): it clears the
page's uffd-wp bit, which PAGEMAP_SCAN on /proc/self/pagemap reports as
PAGE_IS_WRITTEN. At sync() ``take`` scans the mapping with PM_SCAN_WP_MATCHING,
which reports the written pages and protects them again in the same walk (after
a first walk that only counts them: see backing off below), and
``Mapping.sync`` sends them as a tracked SyncRequest: the agent sends the
chunks they overlap without hashing every chunk of the replica (node/writers.py).

Why no store is ever missed:

- A store before the scan leaves its page written; the scan reports it, and the
  agent reads the bytes after the scan returned, so they include the store (a
  store through a stale TLB entry of another CPU also lands before the scan's
  TLB flush, i.e. before it returns).
- A store after the scan faults on the page protected again and marks it
  written: the next scan reports it (this sync may carry it too; sending a page
  twice is harmless).
- The uffd-wp state of a shmem page survives its PTE being zapped (reclaim,
  MADV_DONTNEED): the kernel keeps a PTE marker in its place, and the marker of
  a written page stays "written" (tests/unit/native/test_native_pagemap_scan.py).
- ``write()`` of 64 KiB or more uses pwrite(2) on the memfd, which bypasses the
  page tables: it is recorded here (``note``) after its bytes are in the pages.
- A sync that fails (the home unreachable, a fenced writer) gives its ranges
  back (``restore``), so the next sync sends them again.
- A writer that stores to most pages between syncs would pay a fault per page at
  every sync (far more than hashing them): after a scan finds more than
  ``MOSTLY_WRITTEN`` of the pages written (a first walk that protects nothing; a
  second one protects what it finds otherwise), the pages stay writable and the
  next syncs hash (1, then 2, 4, ... up to ``MAX_BACKOFF`` while it repeats); the
  last of them protects every page *before* the agent hashes, so stores after it
  are tracked and those before are found by its hashing. A hashing sync that
  fails makes the next hash too.
- A forked child shares the pages but not the tracking (its page tables are not
  registered): after a fork, and after any failed scan, tracking stops for good
  and every later sync hashes every chunk, as without this module (logged once).

Why not soft-dirty bits (/proc/self/clear_refs "4"): clearing them acts on the
whole process, a shmem page zapped and faulted back by a read loses its bit (a
missed write), and this kernel (6.18 without CONFIG_MEM_SOFT_DIRTY) does not set
them at all. Why not faults resolved by a handler: a thread (the agent's or the
client's) must answer each first store per chunk, ~80-90 us each here, and a
writer whose handler is gone hangs. See docs/ARCHITECTURE.md "Publishing".
"""
from __future__ import annotations

import logging
import os
import threading
import weakref

from vas.core import fetch
from vas.core.validate import PAGE_SIZE

log = logging.getLogger(__name__)

#: Written ranges are rounded out to this grain before they are sent: the agent
#: sends whole 256 KiB chunks anyway (node/publish.py CHUNK), and the request
#: stays small (at most one range per grain).
GRAIN = 256 << 10
#: Most ranges one tracked sync sends (a ByteRange is ~13 bytes of a request of at
#: most 4 MiB); more scattered writes than this are found by hashing instead.
MAX_RANGES = 65536
#: A scan that finds more than this fraction of the pages written makes the next
#: syncs hash with the pages unprotected: a store's WP fault (2-9 us here) costs more
#: than hashing its page (1-2 us) once a quarter of them or so are stored to.
MOSTLY_WRITTEN = 1 / 4
#: Most syncs one back-off hashes (it doubles while scans keep finding most pages written).
MAX_BACKOFF = 16
#: Regions one PAGEMAP_SCAN call may return (the scan goes on from where it stopped).
_SCAN_REGIONS = 4096

_live: weakref.WeakSet[WrittenPages] = weakref.WeakSet()


class WrittenPages:
    """The written pages of one mapping at ``address`` of ``size`` bytes (``start``)."""

    def __init__(self, uffd: int, pagemap: int, address: int, size: int):
        self._uffd = uffd
        self._pagemap = pagemap
        self.address = address
        self.size = size
        self._lock = threading.Lock()
        self._noted: list[tuple[int, int]] = []  # pwrite ranges and ranges given back
        self._lost: str | None = None  # why tracking stopped, if it did
        self._forked = False
        self._hashing = 0  # syncs left that hash, the pages unprotected (backing off)
        self._backoff = 1  # how many syncs the next back-off hashes
        self._closer = weakref.finalize(self, _close_fds, uffd, pagemap)

    @classmethod
    def start(cls, address: int, size: int) -> WrittenPages | None:
        """Track the stores to the shared writable mapping [address, address + size)
        from now on; None (logged) where this kernel or process cannot, or
        ``VAS_DISABLE_USERFAULTFD=1``: sync() then hashes every chunk. Call before
        the first store to the mapping."""
        if not fetch.write_tracking_available():
            return None
        from vas import _native

        try:
            uffd = fetch.register_write_tracking(address, size)
        except OSError as exc:
            log.warning("cannot track the writes of a mapping (%s): sync() hashes every "
                        "chunk", exc)
            return None
        try:
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(uffd)
            log.warning("cannot open /proc/self/pagemap (%s): sync() hashes every chunk", exc)
            return None
        tracker = cls(uffd, pagemap, address, size)
        try:
            _native.uffd_writeprotect(uffd, address, size, _native.UFFDIO_WRITEPROTECT_MODE_WP)
            tracker._scan()  # fails early (EINVAL: no PAGEMAP_SCAN) rather than at sync()
        except OSError as exc:
            tracker.close()
            log.warning("cannot track the writes of a mapping (%s): sync() hashes every "
                        "chunk", exc)
            return None
        _live.add(tracker)
        return tracker

    def note(self, offset: int, length: int) -> None:
        """Record a store that bypassed the page tables (pwrite on the memfd), after
        its bytes are in the pages."""
        with self._lock:
            self._noted.append((offset, length))

    def take(self) -> tuple[list[tuple[int, int]], bool]:
        """(ranges, tracked): the (offset, length) ranges stored to since the last
        ``take`` (plus those given back), rounded out to ``GRAIN`` and merged, the
        pages protected again before this returns; ``tracked`` False when the
        changes must be found by hashing every chunk instead (tracking stopped
        after a fork or a failed scan, backing off after a mostly written scan, or
        too many ranges for one request). If the sync fails, ``restore``: a later
        tracked sync hashes only what it sends, so a change not sent again would
        be lost."""
        with self._lock:
            if self._forked and self._lost is None:
                self._stop("the process forked: a child's stores are not tracked")
            if self._lost is not None:
                return [], False
            try:
                if self._hashing:
                    return self._hashed_sync()
                scanned = self._scan(protect=False)
                if sum(length for _, length in scanned) > self.size * MOSTLY_WRITTEN:
                    self._back_off()  # the pages stay writable: no fault until re-armed
                else:  # again, protecting what it finds (those written since too)
                    scanned = self._scan(protect=True)
                    self._backoff = 1
            except OSError as exc:
                self._stop(f"scanning or protecting the pages failed: {exc}")
                return [], False
            ranges = _merged(self._noted + scanned, GRAIN, self.size)
            self._noted = []
        if len(ranges) > MAX_RANGES:
            log.info("%d written ranges: this sync finds the changes by hashing", len(ranges))
            return ranges, False
        return ranges, True

    def restore(self, ranges: list[tuple[int, int]], tracked: bool) -> None:
        """The sync of what ``take`` answered failed: send ``ranges`` again next time,
        and after a sync that hashed, hash again (a store made before the pages
        were protected again is in no mark)."""
        with self._lock:
            self._noted.extend(ranges)
            if not tracked:
                self._hashing = max(self._hashing, 1)

    def _back_off(self) -> None:
        """Most pages were written since the last sync: leave them writable (not
        protected again) and hash for the next ``_backoff`` syncs, twice as many
        each time this repeats."""
        self._hashing = self._backoff
        self._backoff = min(2 * self._backoff, MAX_BACKOFF)

    def _hashed_sync(self) -> tuple[list[tuple[int, int]], bool]:
        """take() while backing off: this sync hashes; the last one of the run protects
        every page first, so that the stores after it are tracked again (the ones
        before are found by its hashing)."""
        from vas import _native

        self._hashing -= 1
        if not self._hashing:
            _native.uffd_writeprotect(self._uffd, self.address, self.size,
                                      _native.UFFDIO_WRITEPROTECT_MODE_WP)
            self._noted = []
        return [], False

    def forked(self) -> None:
        """This process forked: the child shares the pages, and its stores are not
        tracked. Only flags (called from os.register_at_fork hooks); the next
        ``take`` stops tracking."""
        self._forked = True

    def close(self) -> None:
        """Stop tracking and close the userfaultfd and the pagemap fd (idempotent)."""
        self._closer()

    def _stop(self, why: str) -> None:
        self._lost = why
        log.warning("written-page tracking of the mapping at 0x%x stopped (%s): every later "
                    "sync() hashes every chunk", self.address, why)
        self.close()

    def _scan(self, protect: bool = True) -> list[tuple[int, int]]:
        """(offset, length) of the written pages, with ``protect`` protected again in
        the same walk."""
        from vas import _native

        flags = _native.PM_SCAN_CHECK_WPASYNC | (_native.PM_SCAN_WP_MATCHING if protect else 0)
        out: list[tuple[int, int]] = []
        start, end = self.address, self.address + self.size
        while start < end:
            regions, start = _native.pagemap_scan(
                self._pagemap, start, end, _native.PAGE_IS_WRITTEN, _native.PAGE_IS_WRITTEN,
                flags, _SCAN_REGIONS)
            out += [(first - self.address, last - first) for first, last, _ in regions]
        return out


def _merged(ranges: list[tuple[int, int]], grain: int, size: int) -> list[tuple[int, int]]:
    """``ranges`` rounded out to multiples of ``grain`` (clipped to ``size``), sorted
    and merged.

    >>> _merged([(5, 1), (4096, 1), (3 * 4096, 10)], 4096, 4 * 4096 - 100)
    [(0, 8192), (12288, 3996)]
    """
    out: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if not length:
            continue
        start = offset - offset % grain
        end = min(-(-(offset + length) // grain) * grain, size)
        if out and start <= out[-1][0] + out[-1][1]:
            first = out[-1][0]
            out[-1] = (first, max(out[-1][0] + out[-1][1], end) - first)
        else:
            out.append((start, end - start))
    return out


def _close_fds(uffd: int, pagemap: int) -> None:
    os.close(uffd)
    os.close(pagemap)


def _forked() -> None:
    for tracker in list(_live):
        tracker.forked()


os.register_at_fork(after_in_parent=_forked, after_in_child=_forked)
assert GRAIN % PAGE_SIZE == 0
