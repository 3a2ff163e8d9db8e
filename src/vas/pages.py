"""The native mapping under a ``Mapping`` (vas/mapping.py): how a segment's fd is
mapped (shared, or private for a lazy attach), the memoryview over it, its address,
the hook that queues the attachment's Detach when the mapping ends, and ``pwrite``
for large writes of an "rw" mapping.
"""
from __future__ import annotations

import mmap
import os
import weakref
from typing import TYPE_CHECKING

from vas.core.validate import PAGE_SIZE, round_up_to_pages

if TYPE_CHECKING:
    from vas.connection import Connection

#: Smallest write() that an "rw" mapping makes with pwrite(2) on its memfd rather than
#: with a store through the mapping: pwrite fills the page cache without faulting each
#: page into this process (96 MiB: 27 ms against 70 ms on the 2-CPU development VM).
PWRITE_MIN = 64 << 10
#: Smallest write() that a revocable (home) "rw" mapping has the agent copy in
#: (``WriteFrom``, process_vm_readv) rather than storing through the mapping, and the
#: block its first-write record counts in (``Mapping._first_write``). A first write
#: into memory the warm pool did not prepare measured (development VM, median of 5)
#: 1.7 ms by the agent against 1.0 ms stored at 2 MiB, 4.1 against 4.5 at 8 MiB,
#: 14 against 16 at 32 MiB, and a GiB into prepared memory ~4x faster.
WRITE_FROM_MIN = 8 << 20


def private_mmap(fd: int, size: int, offset: int):
    """A read-only MAP_PRIVATE mapping of ``fd``, for lazy attaches, not inherited by a
    forked child.

    Why private: UFFDIO_REGISTER needs VM_MAYWRITE, which a shared mapping of
    the read-only fd lacks; a private one has it, yet it maps the replica's own
    page-cache pages (PROT_READ: never copied on write), so nothing is duplicated.
    """
    native = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=offset)
    # Not inherited by a forked child: the child's copy would not be registered with
    # the userfaultfd, so its missing pages would read as zeros. There, touching
    # it is SIGSEGV (attach again in the child).
    native.madvise(mmap.MADV_DONTFORK)
    return native


def native_mmap(fd: int, size: int, *, writable: bool, address: int, fixed: bool, offset: int):
    global _native_mmap
    if _native_mmap is None:  # imported on first use; a module global after (an import
        from vas import _native  # statement per attach cost ~2 us)

        _native_mmap = _native.mmap
    return _native_mmap(fd, size, writable=writable, offset=offset, address=address, fixed=fixed)


#: ``vas._native.mmap`` once ``native_mmap`` has run.
_native_mmap = None


def view_of(native, writable: bool) -> memoryview:
    """A 1-D unsigned-byte memoryview over the native mapping (read-only unless ``writable``)."""
    view = memoryview(native)
    if view.format != "B" or view.ndim != 1:
        cast = view.cast("B")
        view.release()
        view = cast
    if not writable and not view.readonly:
        readonly = view.toreadonly()
        view.release()
        view = readonly
    return view


def address_of(native, view: memoryview) -> int:
    address = getattr(native, "address", None)
    if isinstance(address, int):
        return address
    # No attribute: the address of the first byte, through a throwaway numpy view.
    import numpy as np

    array = np.frombuffer(view, dtype=np.uint8, count=1)
    try:
        return int(array.ctypes.data)
    finally:
        del array


class ReleaseHook:
    """Queues an attachment's Detach (``Connection.release_later``) when the native
    object of its pages ends, unless cancelled first.

    A ``weakref.finalize`` does the same at several times the cost (its registry
    and atexit bookkeeping were ~10 % of a local attach+detach): here a plain weak
    reference with a callback, kept alive by the module-level ``_LIVE`` set until
    it fires or is cancelled (a weak reference that dies first never calls back).
    Nothing runs at interpreter exit: the connection's end releases everything.
    """

    __slots__ = ("_ref", "__weakref__")

    def __init__(self, native, connection: "Connection", attachment_id: int):
        release_later = connection.release_later

        def fire(ref):
            _LIVE.discard(ref)
            release_later(attachment_id)

        self._ref = weakref.ref(native, fire)
        _LIVE.add(self._ref)

    def cancel(self) -> None:
        """Never queue the Detach (it was sent, or the connection's end released it):
        the weak reference is dropped, and a dead weak reference calls nobody."""
        _LIVE.discard(self._ref)
        self._ref = None


#: The armed release hooks' weak references (see ReleaseHook).
_LIVE: set = set()


def pwrite_all(fd: int, data: memoryview, position: int) -> None:
    """pwrite(2) all of ``data`` at ``position`` (a call may write less than asked)."""
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], position + done)


def populate_write(native, offset: int, length: int) -> None:
    """Fault [offset, offset + length) of a writable native mapping in for writing at
    once (MADV_POPULATE_WRITE, whole pages), before a large copy into it.

    Why: a revocable "rw" mapping is registered for userfaultfd write-protect, and
    taking one page fault per 4 KiB store on such a mapping costs about twice as much
    as on a plain one; the kernel populates a range in one call without those traps.
    Best effort: a kernel without it (before 5.14) just takes the faults.
    """
    from vas import _native

    start = offset - offset % PAGE_SIZE
    end = round_up_to_pages(offset + length)  # within the mapping: its size is whole pages
    try:
        native.madvise(_native.MADV_POPULATE_WRITE, start, end - start)
    except OSError:
        pass
