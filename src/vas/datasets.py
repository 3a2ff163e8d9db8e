"""Arrays and Arrow tables as segments: ``put_array``/``get_array``,
``put_table``/``get_table`` and ``SegmentRef``, the handle that travels.

A dataset is an ordinary segment whose ``meta`` says how to read it back, so a
reader needs only the name:

========================  ============================================================
``vas.kind``              ``"ndarray"`` (put_array) or ``"arrow"`` (put_table)
``vas.dtype``             ndarray: the numpy dtype's ``descr`` (``"<f8"``; a JSON list
                          for a structured dtype)
``vas.shape``             ndarray: the shape as a JSON list (``"[1024, 3]"``, ``"[]"``)
``vas.nbytes``            arrow: bytes of the Arrow IPC stream at offset 0
``vas.rows``              arrow: the table's row count
========================  ============================================================

The bytes are written once, at put: the segment is created (homed on this node),
attached ``"rw"``, filled, and published with ``sync()`` (version 1); a failure
after the create deletes the segment again, so a name never holds half a dataset.
A reader attaches ``"r"`` (zero-copy on the home node; elsewhere this node's one
replica, filled lazily by default) and wraps the mapped pages without copying:
``numpy.frombuffer`` for an array, ``pyarrow.py_buffer`` + ``ipc.open_stream``
for a table (Arrow reads a stream from a buffer zero-copy: every column buffer
points into the segment). The reader's ``Mapping`` stays warm in this process for
``KEEP_SECONDS`` after the last read (``_Warm``), then is detached:
``Mapping.detach`` leaves the pages mapped, and the attachment alive at the agent,
while a view of them lives, so the array (or table) alone keeps its pages, and
they go when it goes.

pyarrow is an optional dependency (the ``ray`` extra): only the table functions
import it, on first use.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
import time
from typing import TYPE_CHECKING

from vas.connection import close_fds
from vas.core import validate
from vas.core.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable, VasError
from vas.core.sizes import human_size
from vas.core.types import SegmentInfo
from vas.mapping import detach_quietly

if TYPE_CHECKING:
    from vas.client import Client
    from vas.mapping import Mapping

KIND_NDARRAY = "ndarray"
KIND_ARROW = "arrow"

#: Seconds a reader waits for the first publish of a dataset whose put is still
#: writing it (version 0) before giving up with Unavailable.
PUT_WAIT_SECONDS = 30.0


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (the submodule is not imported by pyarrow itself)
    except ImportError as exc:
        raise ImportError("vas tables need pyarrow: install vas with the 'ray' extra "
                          "(pip install 'vas[ray]') or pyarrow itself") from exc
    return pyarrow


# -- metadata ----------------------------------------------------------------------------

def encode_dtype(dtype) -> str:
    """The ``vas.dtype`` string of a numpy dtype (its ``descr``; JSON when structured)."""
    import numpy as np

    descr = np.lib.format.dtype_to_descr(dtype)
    return descr if isinstance(descr, str) else json.dumps(descr, separators=(",", ":"))


def _descr_fields(fields) -> list:
    # JSON turned the (name, type[, shape]) tuples of a structured descr into lists.
    out = []
    for field in fields:
        name = tuple(field[0]) if isinstance(field[0], list) else field[0]
        kind = field[1] if isinstance(field[1], str) else _descr_fields(field[1])
        out.append((name, kind, tuple(field[2])) if len(field) > 2 else (name, kind))
    return out


def decode_dtype(text: str):
    """The numpy dtype of a ``vas.dtype`` string; InvalidArgument if it is not one."""
    import numpy as np

    try:
        descr = _descr_fields(json.loads(text)) if text.startswith("[") else text
        return np.lib.format.descr_to_dtype(descr)
    except (TypeError, ValueError, IndexError) as exc:
        raise InvalidArgument(f"invalid vas.dtype {text!r} in segment metadata: {exc}") from exc


def _shape_of(meta: dict[str, str], name: str) -> tuple[int, ...]:
    try:
        shape = tuple(json.loads(meta["vas.shape"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"segment {name}: its metadata has no valid vas.shape") from exc
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidArgument(f"segment {name}: invalid vas.shape {meta['vas.shape']!r}")
    return shape


def _kind_of(info: SegmentInfo, want: str | None, reader: str) -> None:
    kind = info.meta.get("vas.kind")
    if want is None:  # either
        if kind not in (KIND_NDARRAY, KIND_ARROW):
            held = f"vas.kind={kind!r}" if kind else "no vas.kind metadata"
            raise InvalidArgument(f"segment {info.name} holds no array or table: it has {held}")
        return
    if kind != want:
        held = f"vas.kind={kind!r}" if kind else "no vas.kind metadata"
        raise InvalidArgument(f"segment {info.name} does not hold what {reader} reads "
                              f"(vas.kind={want!r}): it has {held}")


# -- writing ----------------------------------------------------------------------------

def _check_array(array):
    import numpy as np

    array = np.asarray(array)
    if array.dtype.hasobject:
        raise InvalidArgument(
            f"cannot put an array of dtype {array.dtype}: it holds references to Python "
            "objects, which mean nothing in another process; convert it to a fixed-size "
            "dtype (numbers, 'U'/'S' strings, structured) first")
    if array.dtype.itemsize == 0:
        raise InvalidArgument(f"cannot put an array of dtype {array.dtype}: items of size 0")
    return array


def _existing(client: "Client", name: str, meta: dict[str, str]) -> SegmentInfo:
    """exist_ok: the segment already named ``name``, unchanged, if it holds the same kind
    of data (an array: same dtype and shape); else AlreadyExists."""
    info = client.stat(name)
    same = ("vas.kind", "vas.dtype", "vas.shape") if meta["vas.kind"] == KIND_NDARRAY \
        else ("vas.kind",)
    if any(info.meta.get(key) != meta.get(key) for key in same):
        raise AlreadyExists(f"segment {name} already exists with other contents "
                            f"(its metadata: {info.meta})")
    return info


def _write(client: "Client", name: str, size: int, meta: dict[str, str], mode: int, ttl,
           exist_ok: bool, fill, *, whole_write: bool = False) -> SegmentInfo:
    """Create ``name``, ``fill(mapping)`` it and publish it; deleted again on failure.
    ``whole_write``: ``fill`` writes every byte with one ``Mapping.write`` (the agent
    may then allocate the pages as it copies them in: ``Client._create``)."""
    try:
        info = client._create(name, max(size, 1), mode=mode, ttl=ttl, meta=meta,
                              allocate_on_write=whole_write)
    except AlreadyExists:
        if not exist_ok:
            raise
        return _existing(client, name, meta)
    try:
        with client.attach(name, "rw") as mapping:
            fill(mapping)
            version = mapping.sync()
    except BaseException as exc:
        try:
            client.delete(name, force=True)
        except VasError as error:
            exc.add_note(f"and deleting the half-written segment {name} failed: {error!r}")
        raise
    return dataclasses.replace(info, version=version)


def write_array(client: "Client", name: str, array, *, mode: int = 0o600, ttl=None,
              exist_ok: bool = False) -> SegmentInfo:
    """``Client.put_array``: a new segment holding a C-ordered copy of ``array``."""
    array = _check_array(array)
    meta = {"vas.kind": KIND_NDARRAY, "vas.dtype": encode_dtype(array.dtype),
            "vas.shape": json.dumps(list(array.shape))}

    def fill(mapping: "Mapping") -> None:
        import numpy as np

        if array.flags.c_contiguous:  # its bytes as they are: write() uses pwrite(2)
            mapping.write(0, array.reshape(-1).view(np.uint8))
        else:  # any strides in, C order out, no temporary
            np.copyto(mapping.ndarray(array.dtype, array.shape), array, casting="no")

    return _write(client, name, array.nbytes, meta, mode, ttl, exist_ok, fill,
                  whole_write=bool(array.flags.c_contiguous))


def _as_table(table):
    pa = _pyarrow()
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise InvalidArgument(f"cannot put a {type(table).__name__} as a table: expected a "
                              "pyarrow.Table or pyarrow.RecordBatch")
    return table


def write_table(client: "Client", name: str, table, *, mode: int = 0o600, ttl=None,
              exist_ok: bool = False) -> SegmentInfo:
    """``Client.put_table``: a new segment holding ``table`` as an Arrow IPC stream."""
    pa = _pyarrow()
    table = _as_table(table)
    counter = pa.MockOutputStream()  # the stream's exact length, without writing it
    with pa.ipc.new_stream(counter, table.schema) as writer:
        writer.write_table(table)
    nbytes = counter.size()
    meta = {"vas.kind": KIND_ARROW, "vas.nbytes": str(nbytes), "vas.rows": str(table.num_rows)}

    def fill(mapping: "Mapping") -> None:
        # No `with` over the view: Arrow's buffer exports it until the writer is gone
        # (the mapping's detach copes with a view that outlives it).
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(mapping.buffer[:nbytes]))
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        sink.close()

    return _write(client, name, nbytes, meta, mode, ttl, exist_ok, fill)


# -- reading ----------------------------------------------------------------------------

def _await_first_publish(mapping: "Mapping") -> None:
    """A put still writing the segment has not published it yet (version 0): wait."""
    if mapping.version > 0:
        return
    mapping.wait(0, timeout=PUT_WAIT_SECONDS)
    if mapping.refresh() == 0:
        raise Unavailable(f"segment {mapping.name} is still being written (version 0 after "
                          f"{PUT_WAIT_SECONDS:g} s): its put did not finish")


class _Warm:
    """Mappings of datasets read lately in this process, kept for ``KEEP_SECONDS``
    after their last read so that the next read of the same segment (same id and
    version) makes its view over pages that are mapped already.

    Why: a fresh mapping costs a page fault per 4 KiB page at first touch (~17 ms
    per 96 MiB on the development VM, a sum of the array itself 9 ms), on every read;
    Ray's workers map their object store once. Every read still asks the agent
    (attach: the segment exists, may be read, its id and version), so a deleted,
    replaced or republished segment is never served from here; the new attachment
    is released at once (queued Detach) when the warm mapping serves. A warm mapping
    holds its attachment: a delete from this process drops it first
    (``Client.delete``), but a dataset deleted from elsewhere stays ``deleting`` (its
    memory held, its name taken) until KEEP_SECONDS after its last read here (and its
    views' end), unless deleted with ``force=True``. One daemon thread detaches the
    expired ones; it ends when none is left.
    """

    def __init__(self):
        self._lock = threading.Condition(threading.Lock())
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._thread: threading.Thread | None = None

    def serve(self, connection, segment, fetch: str, build):
        """``build(mapping)`` over the warm mapping of ``segment`` on ``connection``
        (same id, version and requested fetch), or None when there is none."""
        key = (id(connection), segment.name)
        stale = None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            mapping, owner, _ = entry
            if (owner is connection and not connection.closed and not mapping.detached
                    and mapping.info.id == segment.id and mapping.version == segment.version
                    and mapping.requested_fetch == fetch):
                self._entries[key] = (mapping, owner, time.monotonic() + KEEP_SECONDS)
                self._entries.move_to_end(key)
                return build(mapping)  # under the lock: never over a detached mapping
            stale = self._entries.pop(key)[0]
        detach_quietly(stale)
        return None

    def keep(self, connection, mapping: "Mapping") -> None:
        """Keep ``mapping`` warm (replacing an older one of its name)."""
        key = (id(connection), mapping.name)
        with self._lock:
            old = self._entries.pop(key, None)
            self._entries[key] = (mapping, connection, time.monotonic() + KEEP_SECONDS)
            evicted = [self._entries.popitem(last=False)[1]
                       for _ in range(len(self._entries) - MAX_WARM)]
            if self._thread is None:
                self._thread = threading.Thread(target=self._expire, name="vas-warm",
                                                daemon=True)
                self._thread.start()
            self._lock.notify()  # the thread sleeps until the earliest expiry it knew
        for entry in ([old] if old else []) + evicted:
            if entry[0] is not mapping:
                detach_quietly(entry[0])

    def _expire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                due = [key for key, (_, _, expires) in self._entries.items() if expires <= now]
                expired = [self._entries.pop(key)[0] for key in due]
                if not expired:
                    if not self._entries:
                        self._thread = None
                        return
                    self._lock.wait(min(e for _, _, e in self._entries.values()) - now)
                    continue
            for mapping in expired:
                detach_quietly(mapping)

    def drop(self, connection, name: str) -> None:
        """Detach the warm mapping of ``name`` on ``connection`` now, if there is one
        (Client.delete calls this first, so a delete from this process is not held up
        by this process's own warm mapping)."""
        with self._lock:
            entry = self._entries.pop((id(connection), name), None)
        if entry is not None:
            detach_quietly(entry[0])

    def forget(self) -> None:
        """In a forked child: the parent's mappings belong to its connections, and its
        expiry thread did not come along; start empty (nothing is detached from here)."""
        self._lock = threading.Condition(threading.Lock())
        self._entries = collections.OrderedDict()
        self._thread = None

    def clear(self) -> None:
        """Detach every warm mapping now (tests; a process about to delete its datasets)."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for mapping, _, _ in entries:
            detach_quietly(mapping)


#: Seconds a dataset's mapping stays warm in this process after its last read.
KEEP_SECONDS = 10.0
#: Most datasets kept warm at once per process (the least recently read go first).
MAX_WARM = 16
WARM = _Warm()
os.register_at_fork(after_in_child=WARM.forget)


def _read(client: "Client", name: str, fetch: str, kind: str | None, reader: str,
          segment_id: int, build):
    """``build(mapping)`` over an "r" mapping of dataset ``name`` of ``kind``: a warm one
    when it is current (see _Warm), else a new one, which then stays warm."""
    validate.check_name(name)
    validate.check_fetch(fetch)
    response, fds = client._attach_request(name, "r", False, fetch)
    segment, connection = response.segment, client._connection
    try:
        if segment_id and segment.id != segment_id:
            raise NotFound(f"segment {name} (id {segment_id}) not found: the name now holds "
                           f"another segment (id {segment.id})")
        _kind_of(SegmentInfo.from_proto(segment), kind, reader)
        served = WARM.serve(connection, segment, fetch, build) if segment.version else None
    except BaseException:
        close_fds(fds)
        connection.release_later(int(response.attachment_id))
        raise
    if served is not None:
        close_fds(fds)
        connection.release_later(int(response.attachment_id))  # the warm one holds the pages
        return served
    mapping = client._map(response, fds, "r", False, fetch)
    try:
        _await_first_publish(mapping)
        result = build(mapping)
    except BaseException:
        detach_quietly(mapping)
        raise
    WARM.keep(connection, mapping)
    return result


def _array_of(mapping: "Mapping"):
    meta = mapping.info.meta
    return mapping.ndarray(decode_dtype(meta.get("vas.dtype", "")),
                           _shape_of(meta, mapping.name))


def _table_of(mapping: "Mapping"):
    pa = _pyarrow()
    name = mapping.name
    try:
        nbytes = int(mapping.info.meta["vas.nbytes"])
    except (KeyError, ValueError) as exc:
        raise InvalidArgument(f"segment {name}: its metadata has no valid vas.nbytes") from exc
    if not 0 < nbytes <= mapping.size:
        raise InvalidArgument(f"segment {name}: vas.nbytes={nbytes} is outside the "
                              f"segment of {human_size(mapping.size)}")
    try:
        return pa.ipc.open_stream(pa.py_buffer(mapping.buffer[:nbytes])).read_all()
    except pa.ArrowInvalid as exc:
        raise InvalidArgument(f"segment {name} does not hold a valid Arrow IPC stream: "
                              f"{exc}") from exc


def _data_of(mapping: "Mapping"):
    kind = mapping.info.meta.get("vas.kind")
    return _array_of(mapping) if kind == KIND_NDARRAY else _table_of(mapping)


def read_array(client: "Client", name: str, *, fetch: str = "lazy", segment_id: int = 0):
    """``Client.get_array``: a read-only zero-copy ndarray over the segment's pages."""
    return _read(client, name, fetch, KIND_NDARRAY, "get_array", segment_id, _array_of)


def read_table(client: "Client", name: str, *, fetch: str = "lazy", segment_id: int = 0):
    """``Client.get_table``: a pyarrow.Table whose buffers are the segment's pages."""
    _pyarrow()  # a clear ImportError before anything is attached
    return _read(client, name, fetch, KIND_ARROW, "get_table", segment_id, _table_of)


def read_any(client: "Client", name: str, *, fetch: str = "lazy", segment_id: int = 0):
    """An array or a table, whichever the segment holds (``vas.ray.get``, ``SegmentRef.get``)."""
    return _read(client, name, fetch, None, "get", segment_id, _data_of)


# -- the default connection's shortcuts (vas.put_array, ...) ----------------------

def put_array(name: str, array, *, mode: int = 0o600, ttl: float | None = None,
              exist_ok: bool = False) -> SegmentInfo:
    """``Client.put_array`` on the default connection. Example: ``vas.put_array("a", x)``."""
    return _client().put_array(name, array, mode=mode, ttl=ttl, exist_ok=exist_ok)


def get_array(name: str, *, fetch: str = "lazy"):
    """``Client.get_array`` on the default connection. Example: ``vas.get_array("a")``."""
    return _client().get_array(name, fetch=fetch)


def put_table(name: str, table, *, mode: int = 0o600, ttl: float | None = None,
              exist_ok: bool = False) -> SegmentInfo:
    """``Client.put_table`` on the default connection. Example: ``vas.put_table("t", tbl)``."""
    return _client().put_table(name, table, mode=mode, ttl=ttl, exist_ok=exist_ok)


def get_table(name: str, *, fetch: str = "lazy"):
    """``Client.get_table`` on the default connection. Example: ``vas.get_table("t")``."""
    return _client().get_table(name, fetch=fetch)


def _client() -> "Client":
    from vas.client import _default

    return _default()


# -- handles ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SegmentRef:
    """A picklable handle of a dataset (an array or a table put into a segment).

    ``name`` is the segment; ``kind`` is ``"ndarray"`` or ``"arrow"``; ``dtype`` the
    numpy dtype string (``"<f8"``; None for a table); ``shape`` the array's shape (a
    table's ``(rows,)``); ``version`` the published version it was made at; ``id``
    the segment's id (a name deleted and put again is another segment: ``get``
    refuses it); ``home`` the node holding the home copy; ``nbytes`` the data's size.

    Example::

        ref = SegmentRef.of(vas.stat("points"))
        points = ref.get()
    """

    name: str
    kind: str
    dtype: str | None
    shape: tuple[int, ...]
    version: int
    id: int
    home: str
    nbytes: int

    @classmethod
    def of(cls, info: SegmentInfo) -> "SegmentRef":
        """The handle of the dataset ``info`` describes; InvalidArgument if it holds none."""
        kind = info.meta.get("vas.kind")
        if kind == KIND_NDARRAY:
            dtype = decode_dtype(info.meta.get("vas.dtype", ""))
            shape = _shape_of(info.meta, info.name)
            nbytes = dtype.itemsize
            for d in shape:
                nbytes *= d
            return cls(info.name, kind, info.meta["vas.dtype"], shape, info.version, info.id,
                       info.home, nbytes)
        if kind == KIND_ARROW:
            return cls(info.name, kind, None, (int(info.meta.get("vas.rows", "0")),),
                       info.version, info.id, info.home, int(info.meta.get("vas.nbytes", "0")))
        held = f"vas.kind={kind!r}" if kind else "no vas.kind metadata"
        raise InvalidArgument(f"segment {info.name} holds no array or table: it has {held}")

    def get(self, *, fetch: str = "lazy", client: "Client | None" = None):
        """The data, read-only and zero-copy: an ndarray or a pyarrow.Table.

        Uses ``client`` or this process's default connection (``vas.connect()``).

        :raises NotFound: the segment was deleted (or replaced by another of that name).
        """
        return read_any(client or _client(), self.name, fetch=fetch, segment_id=self.id)
