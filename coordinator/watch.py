"""The Watch stream: etcd watch events on segment records, as vas WatchEvents (or, with
``WatchRequest.spaces``, the names of the space records changed: ``SpaceWatch``).

Each Watch RPC opens its own etcd Watch stream holding two watches: the
segments under the prefix (with prev_kv, so a DELETE carries the last record)
and the node records (so each event's state — ready/degraded/lost — reflects
which home nodes are live, without a read per event). Events carry the record
as stored; ``attachments`` is not tracked by the stream and is always 0
(GetSegment has the counts).

The stream is cancelled (and the thread feeding etcd released) when the client
cancels, the server stops, or the caller stops iterating: see ``close``.
"""
from __future__ import annotations

import queue

import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from vas.coordinator import keys
from vas.coordinator.etcd import Etcd, translate
from vas.coordinator.segments import Entry, live_nodes_of, to_proto
from vas.core.errors import InvalidArgument, Unavailable
from vas.proto import coordinator_pb2, types_pb2

WatchEvent = coordinator_pb2.WatchEvent


class SegmentWatch:
    """One client's watch of segments under ``prefix`` from ``start_revision`` (0 = now).

    >>> watch = SegmentWatch(etcd, "jobs/", 0)   # doctest: +SKIP
    >>> for event in watch.events(): ...         # doctest: +SKIP
    >>> watch.close()                            # doctest: +SKIP
    """

    def __init__(self, etcd: Etcd, prefix: str, start_revision: int):
        self.etcd = etcd
        self.prefix = prefix
        self.start_revision = start_revision
        self._requests: queue.Queue = queue.Queue()
        # gRPC feeds the stream from this iterator on its own thread; the None that
        # close() queues ends it, so that thread never outlives the watch.
        self._call = etcd.watch(iter(self._requests.get, None))
        self._closed = False
        self._created_revision = 0

    def close(self) -> None:
        """Cancel the etcd watch; safe to call more than once and from any thread."""
        self._closed = True
        self._requests.put(None)
        self._call.cancel()

    def events(self):
        """Yield the CREATED event, then a PUT or DELETE per change, until closed.

        Raises Unavailable if etcd goes away, InvalidArgument if ``start_revision``
        was compacted.
        """
        try:
            yield from self._events()
        except grpc.RpcError as exc:
            if self._closed or exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise translate(exc, self.etcd.url) from exc
        finally:
            self.close()

    def _events(self):
        nodes = self.etcd.range(keys.NODES, keys.NODES_END, keys_only=True)
        live = live_nodes_of(nodes)
        segments_id = self._create(keys.segment_key(self.prefix), self.start_revision, True)
        yield WatchEvent(type=WatchEvent.TYPE_CREATED, revision=self._created_revision)
        self._requests.put(_create_request(keys.NODES, nodes.header.revision + 1, False))
        for response in self._call:
            if response.canceled:
                self._cancelled(response)
            if response.watch_id != segments_id:  # the nodes watch (or its creation)
                for event in response.events:
                    node = keys.name_of(event.kv.key, keys.NODES)
                    (live.discard if event.type == kv_pb2.Event.DELETE else live.add)(node)
                continue
            for event in response.events:
                yield _event_of(event, live)

    def _create(self, key: bytes, start_revision: int, prev_kv: bool) -> int:
        """Create a watch and wait for etcd to confirm it; its watch id."""
        self._requests.put(_create_request(key, start_revision, prev_kv))
        response = next(self._call)
        if response.canceled or not response.created:
            self._cancelled(response)
        self._created_revision = response.header.revision
        return response.watch_id

    def _cancelled(self, response) -> None:
        if response.compact_revision:
            raise InvalidArgument(
                f"watch revision {self.start_revision} has been compacted (oldest available "
                f"{response.compact_revision}): list again and watch from 0")
        raise Unavailable(f"etcd at {self.etcd.url} cancelled the watch: "
                          f"{response.cancel_reason or 'no reason given'}")


class SpaceWatch(SegmentWatch):
    """One client's watch of the space records under ``prefix``: a PUT or DELETE event
    naming each space created, changed or deleted (no record: agents only drop what
    they kept of it, node/spaces.py)."""

    def _events(self):
        spaces_id = self._create(keys.space_key(self.prefix), self.start_revision, False)
        yield WatchEvent(type=WatchEvent.TYPE_CREATED, revision=self._created_revision)
        for response in self._call:
            if response.canceled:
                self._cancelled(response)
            if response.watch_id != spaces_id:
                continue
            for event in response.events:
                kind = (WatchEvent.TYPE_DELETE if event.type == kv_pb2.Event.DELETE
                        else WatchEvent.TYPE_PUT)
                yield WatchEvent(type=kind, revision=event.kv.mod_revision,
                                 space=keys.name_of(event.kv.key, keys.SPACES))


def _create_request(key: bytes, start_revision: int, prev_kv: bool) -> etcdrpc.WatchRequest:
    # A watch on a prefix: [key, prefix_end(key)).
    return etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
        key=key, range_end=keys.prefix_end(key), start_revision=start_revision,
        prev_kv=prev_kv))


def _event_of(event, live: set[str]) -> coordinator_pb2.WatchEvent:
    revision = event.kv.mod_revision
    if event.type == kv_pb2.Event.PUT:
        return WatchEvent(type=WatchEvent.TYPE_PUT, revision=revision,
                          segment=to_proto(Entry.from_kv(event.kv), live))
    if event.prev_kv.key:
        segment = to_proto(Entry.from_kv(event.prev_kv), live)
    else:  # no previous record (compacted away): the name is all there is
        segment = types_pb2.SegmentInfo(
            name=keys.name_of(event.kv.key, keys.SEGMENTS))
    return WatchEvent(type=WatchEvent.TYPE_DELETE, revision=revision, segment=segment)
