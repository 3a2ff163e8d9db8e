"""Chunk arithmetic of publishing (sync) and refreshing remote copies.

A segment is cut into ``CHUNK``-byte chunks (a multiple of the lazy-fill chunk,
so each hashed chunk covers whole fill chunks of a lazy replica's present map). A remote writer's agent hashes
its replica's chunks (XXH64 in C, ``vas._native.chunk_hashes``) at each sync and
sends only the chunks whose hash changed since the last one; a reader's agent
compares its chunks' hashes with the home's and fetches only those that differ.
"""
from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from vas import _native
from vas.core import validate
from vas.core.errors import Fenced, InvalidArgument, NotFound, PermissionDenied
from vas.node import lazy
from vas.proto import coordinator_pb2, local_pb2, node_pb2, types_pb2

log = logging.getLogger(__name__)

#: Bytes per hashed chunk: what one changed byte costs a sync. A hash is 8 bytes per
#: chunk (1/32768 of the data), so a ChunkHashes reply stays under the agents' 8 MiB
#: message limit for segments up to 256 GiB.
CHUNK = 256 << 10
assert CHUNK % lazy.CHUNK == 0, "a hashed chunk must cover whole lazy-fill chunks"
#: Most bytes in one WritePages message or one run fetched at a time.
RUN = 2 << 20
#: Bytes per second a publish or refresh stream is given (on top of the rpc
#: timeout) before its deadline.
_SEND_RATE = 50e6
#: Longest single coordinator Watch of a wait(), seconds: between slices the
#: agent checks that the waiting client is still connected.
_WAIT_SLICE = 5.0


def hashes(view: memoryview) -> bytes:
    """XXH64 of each CHUNK of ``view`` (little-endian uint64s)."""
    return _native.chunk_hashes(view, CHUNK)


def differing(old: bytes, new: bytes) -> list[int]:
    """Indices of the chunks whose hashes differ between two equal-length hash strings.

    >>> differing(bytes(16), bytes(8) + b"x" * 8)
    [1]
    """
    if len(old) != len(new):
        raise ValueError(f"hash strings of {len(old)} and {len(new)} bytes")
    a, b = np.frombuffer(old, "<u8"), np.frombuffer(new, "<u8")
    return np.flatnonzero(a != b).tolist()


def chunks_of(ranges, size: int) -> list[int]:
    """Indices of the chunks overlapping any of ``ranges`` ((offset, length) pairs),
    each checked to lie inside a segment of ``size`` bytes.

    >>> chunks_of([(0, 1), (CHUNK, 2 * CHUNK)], 4 * CHUNK)
    [0, 1, 2]
    """
    chunks: set[int] = set()
    for offset, length in ranges:
        validate.check_range(offset, length, size)
        if length:
            chunks.update(range(offset // CHUNK, -(-(offset + length) // CHUNK)))
    return sorted(chunks)


def runs(chunks: list[int], size: int, limit: int = RUN, chunk: int = CHUNK
         ) -> list[tuple[int, int]]:
    """(offset, length) byte runs covering the sorted indices ``chunks`` of ``chunk``-byte
    chunks of a segment of ``size`` bytes, consecutive ones merged up to ``limit`` bytes.

    >>> runs([0, 1, 3], 4 * CHUNK) == [(0, 2 * CHUNK), (3 * CHUNK, CHUNK)]
    True
    """
    out: list[tuple[int, int]] = []
    for index in chunks:
        start, end = index * chunk, min((index + 1) * chunk, size)
        if out and out[-1][0] + out[-1][1] == start and out[-1][1] + end - start <= limit:
            out[-1] = (out[-1][0], out[-1][1] + end - start)
        else:
            out.append((start, end - start))
    return out


class Staged:
    """Bytes a remote writer sent for a publish, kept aside until the token is checked.

    Bounds: every piece lies inside the segment, and all pieces together are at
    most the segment's size (a writer never needs to send more).
    """

    def __init__(self, size: int):
        self.size = size
        self.total = 0
        self.pieces: list[tuple[int, bytes]] = []

    def add(self, offset: int, data: bytes) -> None:
        validate.check_range(offset, len(data), self.size)
        self.total += len(data)
        if self.total > self.size:
            raise InvalidArgument(
                f"a publish sent {self.total} bytes, more than the segment's {self.size}")
        if data:
            self.pieces.append((offset, data))


def stale_runs(view: memoryview, remote: bytes, present: bytes | None
               ) -> list[tuple[int, int]]:
    """Byte runs of ``view`` to fetch again so that it matches the home's chunk hashes
    ``remote``. For a lazy replica only its ``present`` fill chunks count (a missing
    one is fetched at the home's newest state when first touched): a hashed chunk
    with any present part is compared, and if it differs only its present parts are
    fetched (so no missing page is filled behind the fault handler's back)."""
    size = len(view)
    if present is None:
        return runs(differing(hashes(view), remote), size)
    per = CHUNK // lazy.CHUNK
    parts = []
    for index in range(-(-size // CHUNK)):
        here = [j for j in range(index * per, min((index + 1) * per, len(present)))
                if present[j]]
        if not here:
            continue
        start = index * CHUNK
        with view[start:min(start + CHUNK, size)] as part:
            if hashes(part) == remote[8 * index:8 * index + 8]:
                continue
        parts += here
    return runs(parts, size, chunk=lazy.CHUNK)


class PublishMixin:
    """The Agent's part of sync(), refresh() and wait() (mixed into node/agent.py's Agent).

    Home side: ``write_pages`` applies a remote writer's chunks only after
    PublishVersion accepted its token, and ``published_hashes`` answers
    refreshes; both hold the segment's ``publish_lock``, so a refresh never sees
    a publish half applied. Replica side: ``sync`` of a remote writer sends the
    chunks changed since its last sync, ``refresh`` fetches the chunks that
    differ from the home's, ``wait`` follows the coordinator's Watch.
    """

    # ------------------------------------------------------------------ local requests

    def sync(self, session, request: local_pb2.SyncRequest,
             response: local_pb2.LocalResponse) -> list[int]:
        with self._lock:
            attachment = self._attachment_locked(session, request.attachment_id)
        if attachment.mode != "rw":
            raise PermissionDenied(f"segment {attachment.segment.name} is attached read-only: "
                                   "only its writer may sync")
        segment = attachment.segment
        # Bounds-checked before anything moves; None: find the changes by hashing.
        chunks = (chunks_of([(r.offset, r.length) for r in request.ranges], segment.size)
                  if request.ranges else None)
        if attachment.fenced:
            raise self._fenced(attachment)
        if segment.replica:
            info = self._publish_remote(attachment, chunks)
        else:
            with segment.publish_lock:
                info = self._publish_version(attachment.session.caller, segment,
                                             attachment.token, attachment.lease_id, attachment)
        response.segment.CopyFrom(info)
        return []

    def refresh(self, session, request: local_pb2.RefreshRequest,
                response: local_pb2.LocalResponse) -> list[int]:
        with self._lock:
            attachment = self._attachment_locked(session, request.attachment_id)
        segment = attachment.segment
        # A home segment is the newest published copy; a replica with a live writer here
        # holds writes newer than any published version: nothing to fetch for either.
        if segment.replica and segment.writer is None:
            self._bring_current(segment)
        with self._lock:
            response.segment.CopyFrom(segment.info)
        return []

    def wait(self, session, request: local_pb2.WaitRequest,
             response: local_pb2.LocalResponse) -> list[int]:
        with self._lock:
            attachment = self._attachment_locked(session, request.attachment_id)
        segment = attachment.segment
        timeout = request.timeout_seconds
        if not math.isfinite(timeout) or timeout < 0:
            raise InvalidArgument(f"invalid timeout {timeout!r}: must be a finite number "
                                  "of seconds >= 0")
        deadline = time.monotonic() + timeout if timeout else math.inf
        floor = request.version
        info = segment.info
        while not session.hung_up():
            slice_ = min(_WAIT_SLICE, deadline - time.monotonic())
            if slice_ <= 0:
                break
            info = self._watch_version(segment, floor, slice_)
            if info.version > floor:
                break
        response.segment.CopyFrom(info)
        return []

    def keepalive(self, session, request: local_pb2.KeepAliveRequest,
                  response: local_pb2.LocalResponse) -> list[int]:
        response.empty.SetInParent()  # the request itself refreshed session.last_seen
        return []

    # ------------------------------------------------------------------ writer side

    def _publish_remote(self, attachment, chunks: list[int] | None):
        """Send a remote writer's changed chunks (``chunks``, or those whose hash changed
        since the last sync) to the home; the record at the new version."""
        replica = attachment.segment
        with replica.publish_lock, memoryview(replica.mapping) as raw, raw.cast("B") as view:
            # Hash before reading the bytes to send: a write racing with this sync
            # then shows as a changed chunk at the next one.
            if chunks is not None:
                synced = bytearray(replica.synced_hashes)
                for offset, length in runs(chunks, replica.size):
                    with view[offset:offset + length] as part:
                        first = 8 * (offset // CHUNK)
                        fresh = hashes(part)
                        synced[first:first + len(fresh)] = fresh
                synced = bytes(synced)
            else:
                synced = hashes(view)
                chunks = differing(replica.synced_hashes, synced)
            address = self._home_address(replica.info)
            header = node_pb2.WritePagesHeader(
                caller=attachment.session.caller, name=replica.name, id=replica.id,
                token=attachment.token, lease_id=attachment.lease_id)
            timeout = self.config.rpc_timeout + len(chunks) * CHUNK / _SEND_RATE
            try:
                info = self.peers.write_pages(address, header, view, runs(chunks, replica.size),
                                              timeout)
            except Fenced:
                raise self._fenced(attachment)
            replica.synced_hashes = synced
        self._adopt_version(replica, info.version)
        log.info("sync of %s: sent %d changed chunks (%d bytes) to %s, now version %d",
                 replica.name, len(chunks), len(chunks) * CHUNK, replica.info.home, info.version)
        return info

    def _publish_version(self, caller, segment, token: int, lease_id: int, attachment=None):
        """PublishVersion for the writer holding ``token``; the caller holds the segment's
        publish_lock. Marks a local ``attachment`` fenced when the token is stale."""
        try:
            info = self.coordinator.call("PublishVersion", coordinator_pb2.PublishVersionRequest(
                caller=caller, name=segment.name, id=segment.id, token=token,
                lease_id=lease_id))
        except Fenced:
            if attachment is not None:
                raise self._fenced(attachment)
            raise
        self._adopt_version(segment, info.version)
        return info

    def _fenced(self, attachment) -> Fenced:
        """Mark ``attachment`` as having lost its writer lock (freeing the local writer
        slot); the error to raise. A remote writer's replica is retired: it holds writes
        that will never be published, so later attaches here fetch a fresh copy."""
        segment = attachment.segment
        with self._lock:
            attachment.fenced = True
            self._writers.pop(attachment.id, None)
            if segment.writer is attachment:
                segment.writer = None
            self._drop_written_replica_locked(segment)
        return Fenced(f"segment {attachment.segment.name}: writer token {attachment.token} is "
                      "no longer current (lease lapsed or lock taken over); detach and attach "
                      "\"rw\" again")

    # ------------------------------------------------------------------ home side

    def write_pages(self, header: node_pb2.WritePagesHeader, pieces) -> types_pb2.SegmentInfo:
        """Apply a remote writer's ``pieces`` ((offset, bytes) pairs) if its token is current."""
        with self._lock:
            segment = self._held_locked(header.id)
            if segment.name != header.name:
                raise NotFound(f"segment {header.name!r} (id {header.id}) is not held by "
                               f"node {self.node_id}")
            fd = os.dup(segment.fd)
        try:
            staged = Staged(segment.size)
            for offset, data in pieces:
                staged.add(offset, data)
            with segment.publish_lock:
                info = self._publish_version(header.caller, segment, header.token,
                                             header.lease_id)
                for offset, data in staged.pieces:
                    _pwrite_all(fd, data, offset)
        finally:
            os.close(fd)
        return info

    def published_hashes(self, segment_id: int, chunk_size: int) -> tuple[int, bytes]:
        """(version, chunk hashes) of home segment ``segment_id``, never mid-publish."""
        if chunk_size != CHUNK:
            raise InvalidArgument(f"invalid chunk size {chunk_size}: this agent hashes "
                                  f"{CHUNK}-byte chunks")
        with self._lock:
            segment = self._held_locked(segment_id)
            fd = os.dup(segment.fd)
        try:
            with segment.publish_lock:
                version = segment.info.version
                cached = segment.published_hashes
                if cached is not None and cached[0] == version:
                    return cached
                mapping = _native.mmap(fd, segment.size, writable=False)
                try:
                    with memoryview(mapping) as raw, raw.cast("B") as view:
                        segment.published_hashes = (version, hashes(view))
                finally:
                    mapping.close()
                return segment.published_hashes
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reader side

    def _bring_current(self, replica) -> bytes:
        """Fetch the chunks of ``replica`` that differ from the home's; the home's hashes."""
        address = self._home_address(replica.info)
        with replica.publish_lock:
            version, remote = self.peers.chunk_hashes(address, replica.name, replica.id, CHUNK)
            fill = replica.lazy
            with memoryview(replica.mapping) as raw, raw.cast("B") as view:
                stale = stale_runs(view, remote, fill.present_map() if fill is not None else None)
                for offset, length in stale:
                    with view[offset:offset + length] as part:
                        self.peers.read_pages_into(
                            address, replica.name, replica.id, part,
                            self.config.rpc_timeout + length / _SEND_RATE, offset)
        self._adopt_version(replica, version)
        if stale:
            log.info("refresh of %s: fetched %d bytes of changed chunks from %s, now version %d",
                     replica.name, sum(length for _, length in stale), replica.info.home,
                     version)
        return remote

    def _watch_version(self, segment, floor: int, timeout: float):
        """The record of ``segment`` once its version exceeds ``floor``, or the newest seen
        when ``timeout`` seconds pass first."""
        request = coordinator_pb2.WatchRequest(prefix=segment.name)
        info = segment.info
        with self.coordinator.watch(request, timeout) as events:
            for event in events:
                if event.type == coordinator_pb2.WatchEvent.TYPE_CREATED:
                    # Established: anything published from now on is in the stream.
                    info = self.coordinator.call("GetSegment", coordinator_pb2.GetSegmentRequest(
                        name=segment.name))
                elif event.segment.name == segment.name:
                    info = event.segment
                else:
                    continue
                if info.id != segment.id:
                    raise NotFound(f"segment {segment.name} (id {segment.id}) was deleted")
                if info.version > floor or info.state == types_pb2.SEGMENT_STATE_DELETING:
                    break
        return info

    # ------------------------------------------------------------------ helpers

    def _adopt_version(self, segment, version: int) -> None:
        """Record that ``segment``'s bytes are those of ``version`` (versions only grow)."""
        with self._lock:
            if version > segment.info.version:
                segment.info.version = version



def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
