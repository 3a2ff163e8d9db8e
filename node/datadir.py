"""``--data-dir``: home segments kept in files, so that they survive an agent restart.

Without a data dir a home segment lives in a memfd and dies with the agent. With
one, its memory is a regular file ``DIR/segments/ID.data`` (tmpfs, DAX or disk),
handed to clients exactly like a memfd (a MAP_SHARED mapping of a regular file
shares the page cache the same way), next to a manifest ``DIR/segments/ID.json``:
name, id, size, address, the version of the last publish and the XXH64 hash of
each ``publish.CHUNK`` of the bytes of that version. A manifest is replaced
atomically (temporary file, fsync, rename, fsync of the directory) at the create
and at every publish, before either is acknowledged; a delete removes both files.

At start the agent adopts what the directory holds (``stored``): every data
file with its manifest is hashed again, chunk by chunk; a chunk whose hash
differs holds bytes that are not those of the last acknowledged version
(corrupted at rest, or written by a home writer after its last sync while the
agent died: they cannot be told apart, and neither is acknowledged), and is
reported, never served (see ``Damage``). Replicas of segments homed elsewhere
and the warm pool stay in memfds: only home segments persist.

Layout::

    DIR/lock                 flock'd by the running agent: one agent per directory
    DIR/node.json            {"id": NODE_ID}: the node these segments are homed on
    DIR/segments/ID.data     the segment's bytes (mode 0600)
    DIR/segments/ID.json     its manifest
    DIR/segments/ID.redo     a remote writer's publish being applied (``intend``)
    DIR/segments/.new-*      a create in flight (removed at start: never acknowledged)

What a memfd gave that a file does not: seals (``F_SEAL_SHRINK | F_SEAL_GROW``)
cannot be set on a regular file, so a writer holding the "rw" fd could resize
it under other mappings (the protection was never against hostile writers:
they could ``pwrite`` garbage anyway). Userfaultfd write-protection, which makes
a home "rw" attachment revocable (node/revoke.py), works on shmem only: on tmpfs
yes, on a disk file system (ext4, xfs, DAX) ``UFFDIO_REGISTER`` refuses it. It
is probed at start (``no_write_protect``); without it home "rw" attaches are refused
with a message that says why (remote writers work everywhere).
"""
from __future__ import annotations

import base64
import errno
import fcntl
import itertools
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from vas import _native
from vas.core.errors import CapacityExceeded, DataLoss, InvalidArgument, NotFound
from vas.core.sizes import human_size
from vas.node.publish import CHUNK, differing, hashes
from vas.node.store import Memory

log = logging.getLogger(__name__)

_MANIFEST_FORMAT = 1
_NEW_PREFIX = ".new-"


class DataDirError(InvalidArgument):
    """A --data-dir the agent cannot use (bad usage: the CLI exits 2)."""


class FileMemory(Memory):
    """A home segment's memory in a file of the data dir, and the agent's read-only
    mapping of it (each publish hashes every chunk: mapping the file again each time
    cost ~0.5 s of page faults per 256 MiB). ``release`` (a delete) gives the pages
    back and removes the files; ``close`` (shutdown) keeps them."""

    __slots__ = ("path",)

    def __init__(self, size: int, fd: int, ro_fd: int, path: str):
        super().__init__(size, fd, ro_fd, _native.mmap(ro_fd, size, writable=False))
        self.path = path

    def writable_mapping(self):
        return None  # its mapping is read-only: stores go through the file (pwrite)

    def map_writable(self):
        return None

    def hashes(self, base: bytes = b"", chunks: Iterable[int] | None = None) -> bytes:
        """The chunk hashes of the bytes as they are now: every chunk, or ``base``
        with those of ``chunks`` (indices) hashed again."""
        mapping = self.mapping  # a reference: a release meanwhile unmaps after us
        if mapping is None:
            raise NotFound(f"the file {self.path or 'of a deleted segment'} is closed")
        with memoryview(mapping) as raw, raw.cast("B") as view:
            if chunks is None:
                return hashes(view)
            fresh = bytearray(base)
            for index in chunks:
                with view[index * CHUNK:(index + 1) * CHUNK] as part:
                    fresh[8 * index:8 * index + 8] = hashes(part)
            return bytes(fresh)

    def hashes_after(self, base: bytes, pieces: list[tuple[int, bytes]]) -> bytes:
        """``base`` (the hashes of the bytes now) with those of the chunks ``pieces``
        ((offset, bytes), applied in order) will touch, as they will be once applied:
        a chunk one piece covers is hashed from it, a partly covered one from a copy."""
        mapping = self.mapping
        if mapping is None:
            raise NotFound(f"the file {self.path or 'of a deleted segment'} is closed")
        fresh = bytearray(base)
        whole: dict[int, memoryview] = {}
        partial: dict[int, bytearray] = {}
        with memoryview(mapping) as raw, raw.cast("B") as view:
            for offset, data in pieces:
                data = memoryview(data)
                for index in range(offset // CHUNK, -(-(offset + len(data)) // CHUNK)):
                    start, stop = index * CHUNK, min((index + 1) * CHUNK, self.size)
                    low, high = max(start, offset), min(stop, offset + len(data))
                    if (low, high) == (start, stop) and index not in partial:
                        whole[index] = data[low - offset:high - offset]
                        continue
                    if index not in partial:
                        earlier = whole.pop(index, None)
                        partial[index] = bytearray(view[start:stop] if earlier is None
                                                   else earlier)
                    partial[index][low - start:high - start] = data[low - offset:high - offset]
            for index, chunk in [*whole.items(), *partial.items()]:
                fresh[8 * index:8 * index + 8] = hashes(memoryview(chunk))
        return bytes(fresh)

    def release(self) -> None:
        path, self.path = self.path, ""
        mapping, self.mapping = self.mapping, None
        super().release()
        _close(mapping)
        # The manifest first: a data file left alone by a crash here is removed at the
        # next start like a create that never finished.
        for each in (_manifest_of(path), _redo_of(path), path):
            _unlink(each)

    def close(self) -> None:
        fd, ro_fd, self.fd, self.ro_fd = self.fd, self.ro_fd, -1, -1
        for each in (ro_fd, fd):
            if each >= 0:
                os.close(each)
        mapping, self.mapping = self.mapping, None
        _close(mapping)


@dataclass
class Damage:
    """Chunks of a re-adopted segment whose bytes failed their checksum at start."""

    offsets: list[int]   # byte offsets of the failed chunks
    version: int         # the version whose bytes they should hold
    node_id: str

    def error(self, name: str) -> DataLoss:
        first = self.offsets[0]
        more = f" (and {len(self.offsets) - 1} more)" if len(self.offsets) > 1 else ""
        return DataLoss(f"chunk at offset {first}{more} of segment {name} failed its checksum "
                        f"when node {self.node_id} restarted: its bytes of version "
                        f"{self.version} are lost, never served (delete the segment)")


@dataclass
class Stored:
    """A segment found in the data dir at start: its manifest and open memory."""

    manifest: dict
    memory: FileMemory
    kept: bytes         # the chunk hashes the manifest holds
    failed: list[int]   # byte offsets of the chunks that failed their checksum


class DataDir:
    """The agent's data dir (see the module docstring); ``open`` it once per process."""

    def __init__(self, path: str, lock_fd: int):
        self.path = path
        self.segments = os.path.join(path, "segments")
        self._lock_fd = lock_fd
        #: Why a writable mapping of a file here cannot be write-protected ("" if it can).
        self.no_write_protect = ""
        self._names = itertools.count()

    @classmethod
    def open(cls, path: str) -> "DataDir":
        """Create (if needed) and lock ``path``; DataDirError if it cannot be used."""
        path = os.path.abspath(path)
        try:
            os.makedirs(os.path.join(path, "segments"), mode=0o700, exist_ok=True)
            lock_fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                              0o600)
        except OSError as exc:
            raise DataDirError(f"cannot use --data-dir {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DataDirError(f"--data-dir {path} is in use by another agent") from exc
            raise DataDirError(f"cannot lock --data-dir {path}: {exc.strerror}") from exc
        data_dir = cls(path, lock_fd)
        try:
            data_dir.no_write_protect = data_dir._probe_write_protect()
        except OSError as exc:
            data_dir.close()
            raise DataDirError(f"cannot write in --data-dir {path}: {exc.strerror or exc}") \
                from exc
        return data_dir

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # ------------------------------------------------------------------ node id

    def node_id(self, wanted: str | None, default: str) -> str:
        """The node id to run as: the one the directory's segments are homed on (an
        ``wanted`` id other than it is a DataDirError), else ``wanted`` or ``default``,
        written down for the next start."""
        record = os.path.join(self.path, "node.json")
        try:
            with open(record) as stored:
                known = json.load(stored)["id"]
        except FileNotFoundError:
            known = None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataDirError(f"cannot read {record}: {exc}") from exc
        if known is not None:
            if wanted and wanted != known:
                raise DataDirError(f"--data-dir {self.path} holds the segments of node {known}, "
                                   f"not {wanted}: start it with --id {known} (or another "
                                   "--data-dir)")
            return known
        chosen = wanted or default
        try:
            _write_atomically(record, [json.dumps({"id": chosen}).encode()])
        except OSError as exc:
            raise DataDirError(f"cannot write in --data-dir {self.path}: "
                               f"{exc.strerror or exc}") from exc
        return chosen

    # ------------------------------------------------------------------ create, publish

    def allocate(self, name: str, size: int) -> FileMemory:
        """A new file of ``size`` bytes, every block reserved (like a memfd's fallocate);
        named as a create in flight until ``keep`` names it by id."""
        path = os.path.join(self.segments, f"{_NEW_PREFIX}{os.getpid()}-{next(self._names)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        ro_fd = -1
        try:
            _native.ftruncate(fd, size)
            try:
                _native.fallocate(fd, 0, size)
            except OSError as exc:
                raise CapacityExceeded(
                    f"cannot reserve {human_size(size)} in --data-dir {self.path} for segment "
                    f"{name}: {exc.strerror or exc}") from exc
            ro_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return FileMemory(size, fd, ro_fd, path)
        except BaseException:
            for each in (fd, ro_fd):
                if each >= 0:
                    os.close(each)
            _unlink(path)
            raise

    def keep(self, memory: FileMemory, info) -> bytes:
        """Name the file of a created segment by its id and write its manifest (version
        0, all zeros); the chunk hashes written."""
        path = os.path.join(self.segments, f"{info.id}.data")
        os.rename(memory.path, path)
        memory.path = path
        zeros = zero_hashes(info.size)
        self.save(info, info.version, zeros)
        return zeros

    def save(self, info, version: int, chunk_hashes: bytes, writer: bool = False) -> None:
        """Replace the manifest of segment ``info`` atomically: its bytes are those of
        ``version``, with these chunk hashes; ``writer``: a process on this node may
        map the file writable (see ``mark_writer``)."""
        manifest = {"format": _MANIFEST_FORMAT, "name": info.name, "id": info.id,
                    "size": info.size, "address": info.address, "version": version,
                    "chunk": CHUNK, "hashes": base64.b64encode(chunk_hashes).decode(),
                    "writer": writer}
        self._write_manifest(info.id, manifest)

    def mark_writer(self, segment_id: int, writer: bool) -> None:
        """Note in the manifest whether a home writer (a process on this node) may map
        the file writable. Such a process outlives a killed agent with its mapping,
        and its stores would land in the file the next start adopts: that start
        moves the bytes to a fresh file first (``_fresh_inode``), out of its reach."""
        path = os.path.join(self.segments, f"{segment_id}.json")
        with open(path, "rb") as source:
            manifest = json.loads(source.read())
        if manifest.get("writer") != writer:
            manifest["writer"] = writer
            self._write_manifest(segment_id, manifest)

    def intend(self, segment_id: int, version: int, pieces: list[tuple[int, bytes]],
               chunk_hashes: bytes) -> None:
        """Before a remote writer's bytes (``pieces``, published as ``version``) are
        applied to the file: keep them in a redo file, with the chunk hashes they
        result in. A start that finds it replays them (``_replay``), so a crash while
        they are applied loses neither the version before (its bytes were being
        overwritten) nor this one (already published)."""
        header = json.dumps({"format": _MANIFEST_FORMAT, "id": segment_id, "version": version,
                             "hashes": base64.b64encode(chunk_hashes).decode(),
                             "pieces": [[offset, len(data)] for offset, data in pieces]})
        _write_atomically(os.path.join(self.segments, f"{segment_id}.redo"),
                          [len(header).to_bytes(8, "little"), header.encode(),
                           *(data for _, data in pieces)])

    def done(self, segment_id: int) -> None:
        """The bytes of the last ``intend`` are applied and the manifest says so."""
        _unlink(os.path.join(self.segments, f"{segment_id}.redo"))

    def _write_manifest(self, segment_id: int, manifest: dict) -> None:
        _write_atomically(os.path.join(self.segments, f"{segment_id}.json"),
                          [json.dumps(manifest).encode()])

    # ------------------------------------------------------------------ start

    def stored(self) -> list[Stored]:
        """Every segment the directory holds, opened and verified chunk by chunk.

        Files of creates in flight, temporary files and data files without a
        manifest (a create or a delete that never finished) were never
        acknowledged: removed. A manifest that cannot be read, or whose data file
        is missing or of another size, is logged and its files are removed (the
        coordinator then marks the record lost: nothing can serve it). Any other
        failure to read a file (EMFILE, EIO, no room for a copy) refuses the start
        (DataDirError) and removes nothing.
        """
        found = []
        for entry in sorted(os.listdir(self.segments)):
            path = os.path.join(self.segments, entry)
            if entry.startswith(_NEW_PREFIX) or entry.endswith(".tmp") or (
                    entry.endswith((".data", ".redo"))
                    and not os.path.exists(_manifest_of(path))):
                log.info("removing %s: a create or delete that never finished", path)
                _unlink(path)
            elif entry.endswith(".json"):
                stored = self._load(path)
                if stored is not None:
                    found.append(stored)
        return found

    def _load(self, manifest_path: str) -> Stored | None:
        data_path = manifest_path[:-len(".json")] + ".data"
        try:
            manifest, expected = _read_manifest(manifest_path, data_path)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
            log.error("segment files %s cannot be used (%s): removed; the coordinator marks "
                      "the segment lost", manifest_path, exc)
            for each in (manifest_path, data_path):
                _unlink(each)
            return None
        except OSError as exc:
            raise DataDirError(f"cannot read {manifest_path}: {exc.strerror or exc}") from exc
        size = manifest["size"]
        fds: list[int] = []
        try:
            expected = self._replay(manifest, data_path, expected)
            if manifest.get("writer"):
                self._fresh_inode(data_path, size)
                manifest["writer"] = False
                self._write_manifest(manifest["id"], manifest)
            fds.append(os.open(data_path, os.O_RDWR | os.O_CLOEXEC))
            fds.append(os.open(data_path, os.O_RDONLY | os.O_CLOEXEC))
            memory = FileMemory(size, fds[0], fds[1], data_path)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise DataDirError(f"cannot adopt {data_path}: {exc.strerror or exc}") from exc
        failed = [index * CHUNK for index in differing(expected, memory.hashes())]
        return Stored(manifest, memory, expected, failed)

    def _replay(self, manifest: dict, data_path: str, expected: bytes) -> bytes:
        """Apply the redo file of the segment, if one is left over from a publish the
        agent died in (``intend``), and record its version in the manifest; the chunk
        hashes the manifest now holds. A redo of a version the manifest has reached
        already is removed. OSError if the files cannot be read or written."""
        redo_path = _redo_of(data_path)
        try:
            with open(redo_path, "rb") as source:
                redo = source.read()
        except FileNotFoundError:
            return expected
        try:
            header, pieces = _parse_redo(redo, manifest)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("%s cannot be replayed (%s): removed", redo_path, exc)
            _unlink(redo_path)
            return expected
        if header["version"] > manifest["version"]:
            fd = os.open(data_path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for offset, data in pieces:
                    done = 0
                    while done < len(data):
                        done += os.pwrite(fd, data[done:], offset + done)
                os.fsync(fd)
            finally:
                os.close(fd)
            manifest["version"], manifest["hashes"] = header["version"], header["hashes"]
            self._write_manifest(manifest["id"], manifest)
            expected = base64.b64decode(header["hashes"])
            log.warning("%s: replayed version %d, published while the previous agent died "
                        "applying it", data_path, header["version"])
        _unlink(redo_path)
        return expected

    def _fresh_inode(self, data_path: str, size: int) -> None:
        """Replace ``data_path`` by a copy of it: a writer of the previous agent that
        still maps the old file can no longer reach the bytes this start adopts (the
        copy is verified afterwards, so stores it made before are caught too)."""
        fresh = os.path.join(self.segments, f"{_NEW_PREFIX}{os.getpid()}-{next(self._names)}")
        with open(data_path, "rb") as source, open(fresh, "wb") as target:
            os.fchmod(target.fileno(), 0o600)
            os.posix_fallocate(target.fileno(), 0, size)  # every block reserved, as at create
            done = 0
            while done < size:
                copied = os.copy_file_range(source.fileno(), target.fileno(), size - done)
                if not copied:
                    raise OSError(f"{data_path} ended after {done} of {size} bytes")
                done += copied
            os.fsync(target.fileno())
        os.rename(fresh, data_path)
        log.info("%s: a writer on this node may still map its old file (the previous agent "
                 "died with it attached): moved to a fresh one", data_path)

    def _probe_write_protect(self) -> str:
        """Why a writable mapping of a file here cannot be registered for userfaultfd
        write-protection ("" if it can: shmem, i.e. tmpfs; not a disk file system, and
        not where userfaultfd is denied). OSError if the directory is not writable."""
        from vas.core.fetch import register_write_protect

        memory = self.allocate("probe", os.sysconf("SC_PAGE_SIZE"))
        try:
            mapping = _native.mmap(memory.fd, memory.size, writable=True)
            try:
                os.close(register_write_protect(mapping.address, memory.size))
                return ""
            except OSError as exc:
                why = (f"userfaultfd write-protection of its files failed "
                       f"({exc.strerror or exc}; it needs tmpfs)")
                log.warning("--data-dir %s: %s: \"rw\" attaches on this node of segments "
                            "homed here are refused, remote writers work", self.path, why)
                return why
            finally:
                mapping.close()
        finally:
            memory.release()


def zero_hashes(size: int) -> bytes:
    """The chunk hashes of ``size`` zero bytes (a new segment)."""
    full, tail = divmod(size, CHUNK)
    out = hashes(memoryview(bytes(CHUNK))) * full if full else b""
    return out + (hashes(memoryview(bytes(tail))) if tail else b"")


def _read_manifest(manifest_path: str, data_path: str) -> tuple[dict, bytes]:
    """(manifest, chunk hashes) of a segment; ValueError (or KeyError, TypeError) if
    the manifest is not one, or its data file is not of its size; FileNotFoundError
    if either is missing."""
    with open(manifest_path, "rb") as source:
        manifest = json.loads(source.read())
    expected = base64.b64decode(manifest["hashes"], validate=True)
    size = manifest["size"]
    if manifest.get("format") != _MANIFEST_FORMAT or manifest["chunk"] != CHUNK \
            or not isinstance(size, int) or len(expected) != 8 * -(-size // CHUNK) \
            or not isinstance(manifest["id"], int) or not isinstance(manifest["name"], str):
        raise ValueError("unknown format, chunk size, hash count, id or name")
    actual = os.stat(data_path).st_size
    if actual != size:
        raise ValueError(f"{data_path} has {actual} bytes, not {size}")
    return manifest, expected


def _parse_redo(redo: bytes, manifest: dict) -> tuple[dict, list[tuple[int, memoryview]]]:
    """(header, pieces) of a redo file of the segment of ``manifest``; ValueError (or
    KeyError, TypeError) if it is not one."""
    length = int.from_bytes(redo[:8], "little")
    header = json.loads(redo[8:8 + length])
    hashes_ = base64.b64decode(header["hashes"], validate=True)
    if header["format"] != _MANIFEST_FORMAT or header["id"] != manifest["id"] \
            or len(hashes_) != len(base64.b64decode(manifest["hashes"])):
        raise ValueError("not a redo of this segment")
    body, at, pieces = memoryview(redo), 8 + length, []
    for offset, size in header["pieces"]:
        if offset < 0 or size < 0 or offset + size > manifest["size"] or at + size > len(redo):
            raise ValueError(f"piece [{offset}, +{size}) out of bounds")
        pieces.append((offset, body[at:at + size]))
        at += size
    if at != len(redo):
        raise ValueError(f"{len(redo) - at} bytes after the last piece")
    return header, pieces


def _close(mapping) -> None:
    """Unmap ``mapping`` (None: nothing); one a hash still reads is unmapped when that
    ends (the native object unmaps when its last reference goes)."""
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:
        pass


def _manifest_of(path: str) -> str:
    """``ID.json`` of ``ID.data`` or ``ID.redo`` ("" for "")."""
    return path.rpartition(".")[0] + ".json" if path else ""


def _redo_of(data_path: str) -> str:
    return data_path.rpartition(".")[0] + ".redo" if data_path else ""


def _unlink(path: str) -> None:
    if not path:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_atomically(path: str, parts: list) -> None:
    """``path`` holds ``parts`` (bytes-like, one after the other) or its old content,
    never a mix, even across a crash."""
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
