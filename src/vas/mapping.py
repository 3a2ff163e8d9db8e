"""``Mapping``: a segment mapped into this process.

The agent passes the segment's memfd over the socket; we map it with the native
extension (``vas._native.mmap``, MAP_SHARED, and MAP_FIXED_NOREPLACE for
``fixed=True``) and close the fd at once: the mapping alone keeps the pages.
Every local attach of a segment maps the same physical pages (zero-copy).

Buffer views are the one hazard of a mapping in Python: a ``memoryview`` or a
numpy array over unmapped memory would crash the process. The native object
(``vas._native.Mapping``, or an ``mmap.mmap`` for a lazy mapping) counts its
buffer exports and refuses to unmap while one is alive, and every view holds a
reference to it. So ``detach()`` never unmaps under a view: it unmaps at once
when no view is left, and otherwise leaves the unmapping to the native object's
end (when the last view goes). The attachment at the agent must live exactly as
long as the pages are mapped (else the agent could free a deleted segment's
pages under the views, or stop resolving a lazy mapping's faults), so its
Detach is tied to the native object too: a weak reference to it with a callback
(``ReleaseHook``, vas/pages.py) queues the Detach with the connection
(``Connection.release_later``, vas/connection.py), which sends it from its helper thread, before its next request, or at close. A
finalizer may run in any thread, even one in the middle of a request, so it only
queues.

A "rw" mapping of a segment homed on this node maps the home pages themselves, so
the agent makes it *revocable* (``AttachResponse.revocable``): before the Mapping
is handed out, its range is registered on a userfaultfd for write-protect faults
answered with SIGBUS, and the fd goes to the agent (``RegisterFaults``, purpose
WRITE_PROTECT). When the agent lets the writer lock go without a Detach it
write-protects the range first, so a later store ends this process with SIGBUS
instead of reaching the pages (node/revoke.py). The Detach of such a mapping is
sent only once it is unmapped (as for every mapping): the agent may then close
that fd, which would lift a protection.

A "rw" mapping of a replica (a segment homed on another node) tracks the pages
it stores to (vas/written.py), so that sync() tells the agent which chunks to
send instead of having it hash every chunk of the replica; where the kernel
cannot (before Linux 6.7, ``VAS_DISABLE_USERFAULTFD=1``) the agent hashes.

A Mapping talks to the agent through the ``Connection`` of the Client that made
it, by that class's public methods (``detach``, ``prefetch``, ``register_faults``,
``sync``, ``refresh``, ``wait``, ``release_later``); the connection calls
``connection_closed`` when it closes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import time
import weakref
from typing import TYPE_CHECKING

from vas import pages
from vas.written import WrittenPages
from vas.core import validate
from vas.core.errors import (AddressConflict, Fenced, InvalidArgument, NotFound,
                             PermissionDenied, Unavailable, VasError)
from vas.core.fetch import FetchMode, register_lazy, register_write_protect
from vas.core.types import SegmentInfo
from vas.proto import local_pb2

if TYPE_CHECKING:
    from vas.connection import Connection

log = logging.getLogger(__name__)

#: Longest WaitRequest that Mapping.wait() sends, seconds: the connection serves one
#: request at a time, so a long wait is asked in slices and other threads of the
#: process get their turn on the connection between them.
_WAIT_REQUEST_SECONDS = 1.0


class Mapping:
    """A segment mapped into this process; made by ``Client.attach``.

    A context manager: leaving the ``with`` block detaches. Attributes:

    - ``buffer``: a memoryview over the mapped pages (read-only for ``"r"``)
    - ``size``: bytes mapped (the segment's size); ``address``: where they are
      mapped in this process (``info.address`` when attached with ``fixed=True``)
    - ``version``: the published version this mapping reflects
    - ``info``: the ``SegmentInfo`` at attach time; ``name``, ``mode`` ("r"/"rw"),
      ``token`` (writer fencing token; 0 for "r")
    - ``fetch``: how the pages arrive (``vas.core.fetch.FetchMode`` values):
      ``"home (no fetch)"`` (a segment homed on this node: its own pages),
      ``"lazy"`` (a replica filled on first touch), ``"eager"`` (a complete
      replica), ``"eager (userfaultfd unavailable)"`` (a lazy attach this
      process cannot page on demand: the agent fetched the whole segment before
      answering), or ``"eager (fixed address)"`` (lazy with ``fixed=True``:
      fetched whole too)

    Pickling a Mapping pickles a reference (see ``__reduce__``): unpickled in
    another process, on any node, it is a new attachment of the same segment.

    Views made from it (``buffer`` and its slices, arrays from ``ndarray()``)
    stay valid after ``detach()`` for as long as they live: see ``detach``.

    Example::

        with c.attach("frames/0") as m:
            header = m.read(0, 64)
    """

    def __init__(self, connection: Connection, response, fd: int, mode: str, *,
                 fixed: bool = False, requested_fetch: str = "lazy"):
        segment = response.segment
        # ``info`` is built on first use: attach is on the hot path (p50 budget 300 us).
        self._segment = segment
        self._info: SegmentInfo | None = None
        self.name = segment.name
        self.mode = mode
        self.fixed = fixed
        self.requested_fetch = requested_fetch  # what attach() was asked: for pickling
        self.token = int(response.token)
        self._connection: Connection | None = connection  # None once detached or closed
        self._attachment_id = int(response.attachment_id)
        self._version = segment.version
        # The agent's change counter at which these pages were last known to be what a
        # fresh "r" attach would map (0: not known): Client.switch (vas/spaceview.py).
        self._generation = 0
        self._native = None
        self._view: memoryview | None = None
        self._detached = True  # until the mapping exists
        writable = mode == "rw"
        if writable and not response.writable:
            raise VasError(f"segment {segment.name}: the agent refused a writable mapping")
        try:
            fetch = FetchMode.from_proto(response.fetch)
        except ValueError as exc:
            raise VasError(f"segment {segment.name}: the vas agent did not say how it fetched "
                           f"the pages ({exc}; a protocol mismatch?)") from exc
        lazy = fetch is FetchMode.LAZY
        if lazy and (writable or fixed):  # the agent decides LAZY only for what we stated
            raise VasError(f"segment {segment.name}: the vas agent answered a lazy fetch for "
                           f"a {'writable' if writable else 'fixed'} mapping")
        # A "rw" mapping of the home pages: registered for write-protect before any store.
        self._revocable = bool(response.revocable)
        if self._revocable and not writable:
            raise VasError(f"segment {segment.name}: the vas agent asked to revoke the stores "
                           "of a read-only mapping (a protocol mismatch?)")
        size, address = segment.size, segment.address
        try:
            if lazy:
                native = pages.private_mmap(fd, size, int(response.fd_offset))
            else:
                native = pages.native_mmap(fd, size, writable=writable,
                                      address=address if fixed else 0, fixed=fixed,
                                      offset=int(response.fd_offset))
        except FileExistsError as exc:
            raise AddressConflict(
                f"segment {segment.name}: address range 0x{address:x}-0x{address + size:x} "
                "is already mapped in this process") from exc
        view = pages.view_of(native, writable)
        unguard = None
        self._written: WrittenPages | None = None  # the stores of a remote writer
        try:
            self.address = pages.address_of(native, view)
            self.size = size
            if lazy:
                fetch, unguard = self._start_lazy()
                if fetch is not FetchMode.LAZY:  # fetched whole instead: a child may have it
                    native.madvise(mmap.MADV_DOFORK)
            elif self._revocable:
                self._make_revocable(native)
            elif writable:  # a remote writer: tracked from before its first store
                self._written = WrittenPages.start(self.address, size)
        except BaseException:
            view.release()
            with contextlib.suppress(BufferError):  # else it unmaps when garbage-collected
                native.close()
            raise
        self.fetch = fetch.value
        self._native = native
        self._view = view
        # "rw": a duplicate of the memfd for write()'s pwrite(2), closed at detach (or
        # when this object goes, if it is never detached). Not for a revocable (home)
        # mapping: a pwrite would pass the write-protect that fences a revoked writer.
        self._fd = -1
        # A revocable mapping: the WRITE_FROM_MIN blocks write() reached (see _first_write).
        self._written_blocks = (bytearray(size // pages.WRITE_FROM_MIN + 1)
                                if self._revocable else None)
        if writable and not self._revocable:
            self._fd = os.dup(fd)
            self._fd_offset = int(response.fd_offset)
            self._fd_closer = weakref.finalize(self, os.close, self._fd)
        # The attachment's Detach, due when the pages are unmapped: by detach() at
        # once, or when the native object ends, i.e. when the last view of it goes
        # (the callback runs after the munmap; it only queues, see the module docstring).
        self._release = pages.ReleaseHook(native, connection, self._attachment_id)
        # A lazy mapping's guardian keeps a dup of its userfaultfd until it is unmapped.
        self._unguard = weakref.finalize(native, unguard) if unguard is not None else None
        if self._unguard is not None:
            self._unguard.atexit = False  # the guardian ends with the process
        self._detached = False

    def _start_lazy(self):
        """Make the agent page this lazy mapping in on demand, with this process's
        guardian (vas/guard.py) holding the registration too, so that pages not
        fetched yet raise SIGBUS rather than read zeros if the agent dies. Fetch it
        all now if this kernel refuses the userfaultfd registration or there is no
        guardian. (mode it ends in, the guardian's drop to call once unmapped or None).

        Nothing may read the mapping before this: its missing pages would read as zeros.
        """
        connection, attachment_id, size = self._connection, self._attachment_id, self.size
        try:
            uffd = register_lazy(self.address, size)
        except OSError as exc:
            log.warning("cannot register segment %s for userfaults (%s): fetching it "
                        "eagerly", self.name, exc)
            connection.prefetch(attachment_id, 0, size)
            return FetchMode.EAGER_NO_USERFAULTFD, None
        try:
            connection.register_faults(attachment_id, self.address, size, uffd)
            unguard = connection.guard_faults(
                attachment_id, self.address, size, uffd,
                fallback=lambda: connection.prefetch(attachment_id, 0, size))
        finally:
            os.close(uffd)  # the agent and the guardian hold it now
        if unguard is None:
            log.warning("segment %s: no guardian process to keep it safe from its agent's "
                        "death: fetching it eagerly", self.name)
            connection.prefetch(attachment_id, 0, size)
            return FetchMode.EAGER_NO_USERFAULTFD, None
        return FetchMode.LAZY, unguard

    def _make_revocable(self, native) -> None:
        """Register this writable mapping of the home pages for write-protect and hand
        the userfaultfd to the agent, which protects the mapping when it revokes the
        writer lock (node/revoke.py). Nothing may store into it before this.

        Not inherited by a forked child (MADV_DONTFORK): the child's copy would not be
        registered, so its stores would reach the home pages after the revocation.

        :raises Unavailable: the registration failed (the agent was told this
            process could do it: the kernel changed its mind).
        :raises Fenced: the lock was revoked before the registration arrived.
        """
        try:
            native.madvise(mmap.MADV_DONTFORK)
            uffd = register_write_protect(self.address, self.size)
        except OSError as exc:
            raise Unavailable(f"segment {self.name}: cannot register its writable home "
                              f"mapping for write-protection: {exc}") from exc
        try:
            self._connection.register_faults(self._attachment_id, self.address, self.size,
                                             uffd, local_pb2.FAULT_PURPOSE_WRITE_PROTECT)
        finally:
            os.close(uffd)  # the agent holds it now; it lives as long as the mapping

    @property
    def info(self) -> SegmentInfo:
        """The segment's ``SegmentInfo`` as of attach."""
        if self._info is None:
            self._info = SegmentInfo.from_proto(self._segment)
        return self._info

    # -- data -------------------------------------------------------------------

    @property
    def buffer(self) -> memoryview:
        """The mapped pages as a memoryview (read-only for ``"r"``).

        Like every view, it keeps the pages mapped for as long as it is
        referenced, after ``detach()`` too.
        """
        return self._live_view()

    @property
    def version(self) -> int:
        """The published version this mapping reflects."""
        return self._version

    @property
    def detached(self) -> bool:
        """True once ``detach()`` ran."""
        return self._detached

    def _live_view(self) -> memoryview:
        if self._detached or self._view is None:
            raise InvalidArgument(f"segment {self.name} is detached from this process")
        return self._view

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes from ``offset`` out of the segment.

        :raises InvalidArgument: the range is outside the segment, or it is detached.

        Example::

            header = m.read(0, 64)
        """
        view = self._live_view()
        validate.check_range(offset, length, self.size)
        with view[offset:offset + length] as part:
            return part.tobytes()

    def write(self, offset: int, data) -> int:
        """Copy the bytes-like ``data`` into the segment at ``offset``.

        Other local attachments see the bytes at once (same pages). A write of 8 MiB
        or more to a segment homed on this node, into a range no earlier write() of
        this mapping reached, is copied in by the agent, straight
        from ``data`` (``WriteFrom``), so its pages are not faulted into this
        process's mapping; a large one elsewhere is a ``pwrite`` of the memfd.

        :returns: the number of bytes written.
        :raises PermissionDenied: the segment is attached read-only.
        :raises InvalidArgument: the range is outside the segment, or it is detached.
        :raises Fenced: a ``"rw"`` mapping of a segment homed on this node whose
            connection was closed (its lock was released and the mapping
            write-protected: storing would end the process with SIGBUS), or whose
            lock was revoked when the agent was to copy the bytes in.

        Example::

            m.write(0, b"hello")
        """
        view = self._live_view()
        if self.mode != "rw":
            raise PermissionDenied(f"segment {self.name} is attached read-only")
        if self._revocable:
            self._connected_writer()
        with memoryview(data) as source:
            validate.check_range(offset, source.nbytes, self.size)
            if self._fd >= 0 and source.c_contiguous and source.nbytes >= pages.PWRITE_MIN:
                try:
                    with source.cast("B") as flat:
                        pages.pwrite_all(self._fd, flat, self._fd_offset + offset)
                finally:  # past the page tables: recorded once done, a part written too
                    if self._written is not None:
                        self._written.note(offset, source.nbytes)
            elif source.c_contiguous:
                first_write = self._revocable and self._first_write(offset, source.nbytes)
                if first_write and source.nbytes >= pages.WRITE_FROM_MIN:
                    with source.cast("B") as flat:
                        if self._agent_copies(offset, flat):
                            return source.nbytes
                if self._revocable and source.nbytes >= pages.PWRITE_MIN:
                    pages.populate_write(self._native, offset, source.nbytes)
                with source.cast("B") as flat, view[offset:offset + flat.nbytes] as target:
                    target[:] = flat
            else:
                view[offset:offset + source.nbytes] = source.tobytes()
            return source.nbytes

    def _first_write(self, offset: int, length: int) -> bool:
        """Whether no earlier write() of this mapping reached a ``WRITE_FROM_MIN`` block
        of [offset, offset + length); the blocks count as written from now on.

        Why: the agent copies only a block's first write in (a put's one write; a
        fill in parts). A block written again is most likely rewritten again and
        again, and those writes store through the mapping: the first pays its page
        faults, later ones a memcpy (4 MiB: 0.3 ms, against 4 ms for each copy by
        the agent, measured)."""
        block = pages.WRITE_FROM_MIN
        first, last = offset // block, (offset + max(length, 1) - 1) // block
        fresh = not any(self._written_blocks[first:last + 1])
        self._written_blocks[first:last + 1] = b"\x01" * (last + 1 - first)
        return fresh

    def _agent_copies(self, offset: int, flat: memoryview) -> bool:
        """Have the agent copy ``flat`` into this revocable (home) mapping's pages
        (``WriteFrom``: one kernel copy, no page of this mapping faulted in); False
        when it cannot read this process's memory, and the caller stores instead.

        :raises Fenced: the lock was revoked (the agent refused the copy), or the
            connection closed (storing would end the process with SIGBUS).
        """
        connection = self._connected_writer()
        try:
            connection.write_from(self._attachment_id, offset, flat)
            return True
        except Unavailable:
            self._connected_writer()  # closed meanwhile: Fenced, never a store
            return False

    def _connected_writer(self) -> Connection:
        connection = self._connection
        if connection is None or connection.closed:
            raise Fenced(f"segment {self.name}: the connection to the agent is closed, so "
                         "this writer's lock was released and its home mapping "
                         "write-protected")
        return connection

    def ndarray(self, dtype, shape=None, offset: int = 0):
        """A zero-copy numpy array over the segment (read-only for ``"r"``).

        :param dtype: any numpy dtype.
        :param shape: an int or tuple; default: as many whole items as fit after ``offset``.
        :param offset: byte offset of the first item.
        :returns: ``numpy.ndarray`` whose data pointer is ``address + offset``; it
            keeps the pages mapped (and the attachment alive) while it lives.
        :raises InvalidArgument: the array would not fit inside the segment.

        Example::

            weights = m.ndarray(np.float32, shape=(1024, 1024))
        """
        import numpy as np

        view = self._live_view()
        dtype = np.dtype(dtype)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= self.size:
            raise InvalidArgument(f"invalid offset {offset!r}: must be an integer in [0, {self.size}]")
        if dtype.itemsize == 0:
            raise InvalidArgument(f"invalid dtype {dtype}: items of size 0")
        if shape is None:
            shape = ((self.size - offset) // dtype.itemsize,)
        elif isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        else:
            shape = tuple(shape)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise InvalidArgument(f"invalid shape {shape!r}: must be integers >= 0")
        count = math.prod(shape)
        validate.check_range(offset, count * dtype.itemsize, self.size)
        return np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)

    # -- versions -----------------------------------------------------------------

    def _is_home(self) -> bool:
        connection = self._connection
        return connection is not None and self.info.home == connection.local_node.id

    def sync(self, ranges=None) -> int:
        r"""Publish this writer's changes cluster-wide ("rw" only); returns the new version.

        On the home node the pages are the home's: sync bumps the version. On
        another node the agent sends the home the chunks changed since the last
        sync (those holding the pages this process stored to, tracked by the
        kernel: vas/written.py; without that, found by hashing every chunk; or
        only those overlapping ``ranges``), and the home applies them only
        while this writer still holds the lock. A sync that fails leaves the
        changes to the next one. A reader that ``refresh()``\ es after sync returned
        sees every write made before it.

        :param ranges: optional iterable of ``(offset, length)`` pairs that were
            written; other changes wait for a later sync without ``ranges``.
        :raises PermissionDenied: the segment is attached read-only.
        :raises InvalidArgument: a range outside the segment.
        :raises Fenced: the writer lock lapsed (e.g. the process was stopped past
            its lease) and another writer may have taken over: nothing was published.
            On the home node the agent write-protected the mapping before letting
            the lock go: a store made after that ends the process with SIGBUS
            (it never reaches the home pages); stores made while the lock held
            stay in the pages, unpublished.

        Example::

            m.write(0, b"v2")
            version = m.sync()
        """
        self._live_view()
        if self.mode != "rw":
            raise PermissionDenied(f"segment {self.name} is attached read-only")
        pairs = []
        for item in ranges or ():
            offset, length = item
            pairs.append(validate.check_range(offset, length, self.size))
        connection = self._connected()
        if pairs or self._written is None:
            segment = connection.sync(self._attachment_id, pairs)
        else:
            segment = self._sync_written(connection, self._written)
        self._version = max(self._version, segment.version)
        return self._version

    def _sync_written(self, connection: Connection, written: WrittenPages):
        """sync() of every change, found by the write tracking; the record."""
        taken, tracked = written.take()
        try:
            return connection.sync(self._attachment_id, taken if tracked else [],
                                   tracked=tracked)
        except BaseException:
            written.restore(taken, tracked)  # the next sync sends them again
            raise

    def refresh(self) -> int:
        """Bring this node's copy up to the newest published version; returns it.

        On the home node (or on the writer's node, whose copy is newer than any
        published version) there is nothing to copy. Elsewhere the agent fetches
        only the chunks that differ from the home's. Other local attachments of
        the same segment share the copy and see the new bytes too.

        :raises Unavailable: the home node cannot be reached.

        Example::

            version = m.refresh()
        """
        self._live_view()
        segment = self._connected().refresh(self._attachment_id)
        self._version = max(self._version, segment.version)
        return self._version

    def prefetch(self, offset: int = 0, length: int | None = None) -> None:
        """Make sure the pages of a range are present here before use.

        On the home node the pages are the home pages: nothing to fetch. For a
        copy of a segment homed elsewhere, the agent fetches whatever part of
        the range its replica lacks and returns once it is there (an eager
        replica is complete: it returns at once; a lazy one fetches the missing
        chunks, so later touches of the range fault without a network trip).

        :raises InvalidArgument: the range is outside the segment.
        :raises Unavailable: the home node cannot be reached.

        Example::

            m.prefetch(0, 1 << 20)
        """
        self._live_view()
        if length is None:
            length = self.size - offset if isinstance(offset, int) else 0
        validate.check_range(offset, length, self.size)
        if self._is_home() or not length:
            return
        connection = self._connection
        if connection is None:
            raise Unavailable(f"segment {self.name}: the connection to the agent is closed")
        connection.prefetch(self._attachment_id, offset, length)

    def wait(self, version: int | None = None, timeout: float | None = None) -> int:
        """Block until a version newer than ``version`` (default: this mapping's) is
        published; returns the newest published version (unchanged after ``timeout``
        seconds without one). Call ``refresh()`` next to see its bytes off the home.

        :raises InvalidArgument: a negative timeout or version.
        :raises NotFound: the segment was deleted while waiting.

        Example::

            while running:
                m.wait(timeout=5.0)
                m.refresh()
        """
        self._live_view()
        floor = self._version if version is None else version
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise InvalidArgument(f"invalid version {version!r}: must be an integer >= 0")
        if timeout is not None:
            timeout = validate.check_seconds(timeout, "timeout")
        # Wait in slices: the connection serves one request at a time, so other threads
        # of this process get their turn between slices.
        deadline = math.inf if timeout is None else time.monotonic() + float(timeout)
        while True:
            # At least 1 ms: a zero timeout would mean "no limit" on the wire.
            slice_ = max(min(_WAIT_REQUEST_SECONDS, deadline - time.monotonic()), 1e-3)
            version = self._connected().wait(self._attachment_id, floor, slice_).version
            if version > floor or time.monotonic() >= deadline:
                return version

    def _connected(self) -> Connection:
        connection = self._connection
        if connection is None or connection.closed:
            raise Unavailable(f"segment {self.name}: the connection to the agent is closed")
        return connection

    # -- lifetime -----------------------------------------------------------------

    def detach(self) -> None:
        """Detach from the segment: this Mapping's methods stop working at once, and
        the pages are unmapped and the attachment released as soon as no view of
        them is left.

        Never raises for live views and never leaves one dangling: a view made
        before (``buffer`` or a slice of it, a numpy array from ``ndarray()``, a
        ``memoryview`` of any of them) keeps the pages mapped, and the attachment
        alive at the agent (for "rw" with its writer lock, kept renewed), until
        the last such view is gone; then this process unmaps them and tells the
        agent (from the client's helper thread, its next request, or its close).
        Without views both happen before ``detach()`` returns. Idempotent.

        :raises Unavailable: the agent could not be told (the connection broke:
            the agent released the attachment itself).

        Example::

            m = c.attach("frames/0")
            try:
                data = m.read(0, 16)
            finally:
                m.detach()
        """
        if self._detached:
            return
        self._detached = True
        if self._fd >= 0:
            self._fd = -1
            self._fd_closer()  # closes the write fd, once
        if self._written is not None:
            self._written.close()  # no sync after this
        connection, self._connection = self._connection, None
        native, self._native = self._native, None
        self._view = None  # ours; a caller holding ``buffer`` keeps it, and the pages
        try:
            native.close()  # BufferError while any view of the pages is alive
            unmapped = True
        except BufferError:
            unmapped = False  # the native object unmaps when the last view goes
        if unmapped and self._unguard is not None:
            self._unguard()  # unmapped: the guardian closes its dup of the uffd
        if unmapped or connection is None or connection.closed:
            # Released here (or by the connection's end): not by the finalizer.
            self._release.cancel()
        del native
        if unmapped and connection is not None and not connection.closed:
            try:  # (not contextlib.suppress: a context manager per detach costs ~0.5 us)
                connection.detach(self._attachment_id)
            except NotFound:  # a forced delete revoked it already
                pass

    def _hand_over(self) -> "Mapping":
        """A new Mapping of this one's pages and attachment; this one ends detached,
        without unmapping (Client.switch keeps an "r" member mapped for the next
        switch: vas/spaceview.py). Views made from this one stay valid: they are of
        the same native mapping. The new one is not tracked by the connection (it is
        the Client's, which releases it before closing the connection; after a
        broken connection its methods and detach see ``connection.closed``): a
        WeakSet entry per member cost ~2 us of every switch."""
        kept = object.__new__(Mapping)
        kept.__dict__ = self.__dict__.copy()  # (dict.update was ~2.5 times as long)
        self._detached = True
        self._connection = self._native = self._view = None
        return kept

    def _detached_copy(self, version: int) -> "Mapping":
        """A detached Mapping of this one's segment at ``version``: what ``_hand_over``
        leaves behind, for a switch member its caller first asks for after the block
        (the switch kept this one without handing it over: vas/spaceview.py)."""
        user = object.__new__(Mapping)
        user.__dict__ = {**self.__dict__, "_detached": True, "_connection": None,
                         "_native": None, "_view": None, "_version": version}
        return user

    def _revalidated(self, version: int, generation: int) -> None:
        """The agent said this mapping is still current, its pages at ``version``, and
        will be while its change counter shows ``generation`` (0: no such promise)."""
        self._version = version
        self._generation = generation

    def connection_closed(self) -> None:
        """Called by the Connection when it closes: the agent released the attachment
        already, so nothing is sent for it any more (not part of the user API)."""
        self._connection = None

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.detach()
            return
        try:  # leaving the block by an exception: never replace it with a detach error
            self.detach()
        except Exception as error:  # noqa: BLE001  (kept as a note on the block's exception)
            exc.add_note(f"and detaching segment {self.name} failed: {error!r}")

    def __reduce__(self):
        """Pickled as a reference: (name, mode, fetch, fixed). Unpickling attaches the
        segment again, on the default connection of the process doing it (its own
        node's agent), like ``vas.attach(name, mode, fetch=fetch, fixed=fixed)``; an
        ``"rw"`` one is then ``Busy`` while this writer holds the lock."""
        return (_reattach, (self.name, self.mode, self.requested_fetch, self.fixed))

    def __repr__(self) -> str:
        state = "detached" if self._detached else f"at 0x{self.address:x}"
        return f"<vas.Mapping {self.name} {self.mode} {self.size} bytes {state}>"



def detach_quietly(mapping: Mapping) -> None:
    """``mapping.detach()``, ignoring a VasError (a broken connection released it already)."""
    with contextlib.suppress(VasError):
        mapping.detach()


def _reattach(name: str, mode: str, fetch: str, fixed: bool) -> Mapping:
    """Unpickling a ``Mapping``: attach the segment on this process's default connection."""
    from vas.client import attach

    return attach(name, mode, fixed=fixed, fetch=fetch)
