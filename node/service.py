"""The Node gRPC service: what this agent offers to other agents (thin: check, call, translate).

Who may call (with TLS; without it every peer is LOOPBACK and passes): the
page calls (ReadPages, OpenBulk, ChunkHashes, WritePages) agents, which vouch for
their callers, and user certificates, checked against the segment's current
record (``Agent.check_peer``); ReleaseSegment (a step of a delete that the
coordinator already allowed), ReleaseReplica and SegmentChanged agents and coordinators
(which announce deletes made over gRPC by admin tools).

The page streams (ReadPages, WritePages) each hold a server thread, and a memfd or
staged bytes, while they run: one peer host may have ``--max-streams-per-peer`` of
them open at once; past that a stream is refused with RESOURCE_EXHAUSTED naming the
flag (node/limits.py).
"""
from __future__ import annotations

import contextlib
import os

import grpc

from vas.core import validate
from vas.core.errors import InvalidArgument, VasError, abort_with, translated
from vas.core.identity import PeerKind, peer_of_context
from vas.node import metrics
from vas.node.agent import Agent
from vas.node.limits import Counts, Limit
from vas.proto import node_pb2, node_pb2_grpc

#: Bytes per ReadPages message: a message stays under gRPC's default 4 MiB limit,
#: so any client can read the stream without raising its limits.
_CHUNK = 2 << 20
#: Longest relay address (host:port) OpenBulk takes, and most failed relays it names (a
#: fetcher names at most 3).
_MAX_ADDRESS = 300
_MAX_FAILED_RELAYS = 16


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Serves vas.v1.Node for one ``Agent``."""

    def __init__(self, agent: Agent, streams_per_peer: int):
        self.agent = agent
        self._streams = Counts(Limit.STREAMS, streams_per_peer)

    @contextlib.contextmanager
    def _stream_of(self, context: grpc.ServicerContext):
        """Count a page stream of the calling peer's host while it runs (CapacityExceeded
        past the limit)."""
        host = peer_host(context.peer())
        self._streams.take(host)
        try:
            yield
        finally:
            self._streams.give(host)

    @translated
    def ReleaseSegment(self, request: node_pb2.ReleaseSegmentRequest,
                       context: grpc.ServicerContext) -> node_pb2.ReleaseSegmentResponse:
        peer_of_context(context).require((PeerKind.NODE, PeerKind.COORDINATOR),
                                         "release a segment")
        if not request.id:
            raise InvalidArgument("ReleaseSegment needs a segment id")
        freed = self.agent.homes.release(request.name, request.id, request.force)
        return node_pb2.ReleaseSegmentResponse(freed=freed)

    @translated
    def SegmentChanged(self, request: node_pb2.SegmentChangedRequest,
                       context: grpc.ServicerContext) -> node_pb2.SegmentChangedResponse:
        peer_of_context(context).require((PeerKind.NODE, PeerKind.COORDINATOR),
                                         "announce a record change")
        if not request.id:
            raise InvalidArgument("SegmentChanged needs a segment id")
        self.agent.homes.segment_changed(request.name, request.id)
        return node_pb2.SegmentChangedResponse()

    @translated
    def ReleaseReplica(self, request: node_pb2.ReleaseReplicaRequest,
                       context: grpc.ServicerContext) -> node_pb2.ReleaseReplicaResponse:
        # Agents, and coordinators for a delete made over gRPC by an admin tool.
        peer_of_context(context).require((PeerKind.NODE, PeerKind.COORDINATOR),
                                         "release a replica")
        if not request.id:
            raise InvalidArgument("ReleaseReplica needs a segment id")
        dropped = self.agent.replicas.drop(request.name, request.id)
        # A backup goes the same way: its segment is gone.
        dropped = self.agent.backups.drop(request.name, request.id) or dropped
        return node_pb2.ReleaseReplicaResponse(dropped=dropped)

    def ReadPages(self, request: node_pb2.ReadPagesRequest, context: grpc.ServicerContext):
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._stream_of(context))
                fd, version = self.agent.page_source(request.id, request.offset,
                                                     request.length, peer_of_context(context))
            except VasError as exc:
                abort_with(context, exc)
            stack.callback(os.close, fd)
            stack.enter_context(self.agent.pool.transfer())  # the warm pool waits meanwhile
            offset, end = request.offset, request.offset + request.length
            while offset < end:
                data = os.pread(fd, min(_CHUNK, end - offset), offset)
                yield node_pb2.PageChunk(offset=offset, data=data, version=version)
                metrics.SENT_READ_PAGES.inc(len(data))
                offset += len(data)

    @translated
    def OpenBulk(self, request: node_pb2.OpenBulkRequest,
                 context: grpc.ServicerContext) -> node_pb2.OpenBulkResponse:
        segment = self.agent.held_home(request.id)
        peer = peer_of_context(context)
        self.agent.check_peer(peer, segment, "r")
        if len(request.failed_relays) > _MAX_FAILED_RELAYS:
            raise InvalidArgument(f"{len(request.failed_relays)} failed relays: at most "
                                  f"{_MAX_FAILED_RELAYS}")
        for address in (request.relay_address, *request.failed_relays):
            if len(address) > _MAX_ADDRESS:
                raise InvalidArgument(f"relay address of {len(address)} characters: at most "
                                      f"{_MAX_ADDRESS}")
        with segment.lock:
            size, version = segment.info.size, segment.info.version
        relay = ""
        if peer.vouches:  # only agents join the relay tree; a user fetches from the home
            relay = self.agent.relays.source(segment.id, version, request.relay_address,
                                             list(request.failed_relays))
        return node_pb2.OpenBulkResponse(address=self.agent.bulk_address, size=size,
                                         version=version, relay=relay)

    @translated
    def WritePages(self, request_iterator, context: grpc.ServicerContext):
        with self._stream_of(context), self.agent.pool.transfer():
            return self._write_pages(request_iterator, context)

    def _write_pages(self, request_iterator, context) -> node_pb2.SegmentInfo:
        """WritePages: check the header and the peer, then stage and publish the pieces."""
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("WritePages needs a header in its first message")
        header = first.header
        segment = self.agent.write_home(header, peer_of_context(context))
        # All bytes are staged before the publish: an error of the stream, nothing published.
        pieces = _stream_pieces(first, request_iterator, "WritePages", header.name,
                                "the writer gave up or went away", "published",
                                end_required=header.end_marked,
                                received=metrics.RECEIVED_WRITE_PAGES)
        return self.agent.writers.write_pages(segment, header, pieces)

    @translated
    def ChunkHashes(self, request: node_pb2.ChunkHashesRequest,
                    context: grpc.ServicerContext) -> node_pb2.ChunkHashesResponse:
        if not request.id:
            raise InvalidArgument("ChunkHashes needs a segment id")
        segment = self.agent.held_home(request.id)
        self.agent.check_peer(peer_of_context(context), segment, "r")
        version, hashes = self.agent.writers.published_hashes(segment, request.chunk_size)
        return node_pb2.ChunkHashesResponse(version=version, hashes=hashes)


    # ------------------------------------------------------------------ backups

    def _backup_caller(self, context, what: str) -> None:
        # The home's agent (pushes) and coordinators (promotion) only.
        peer_of_context(context).require((PeerKind.NODE, PeerKind.COORDINATOR), what)

    @translated
    def HoldBackup(self, request: node_pb2.HoldBackupRequest,
                   context: grpc.ServicerContext) -> node_pb2.HoldBackupResponse:
        self._backup_caller(context, "hold a backup")
        validate.check_name(request.name)
        validate.check_segment_id(request.id)
        self.agent.backups.hold(request.name, request.id, validate.check_size(request.size),
                                request.version)
        return node_pb2.HoldBackupResponse()

    @translated
    def StageBackup(self, request_iterator, context: grpc.ServicerContext):
        self._backup_caller(context, "stage a backup")
        with self._stream_of(context), self.agent.pool.transfer():
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise InvalidArgument("StageBackup needs a header in its first message")
            header = first.header
            validate.check_segment_id(header.id)
            pieces = _stream_pieces(first, request_iterator, "StageBackup", header.name,
                                    "the home gave up or went away", "staged")
            if header.fill:
                self.agent.backups.fill(header.id, header.base_version, pieces)
            else:
                self.agent.backups.stage(header.id, header.base_version, pieces)
        return node_pb2.StageBackupResponse()

    @translated
    def CommitBackup(self, request: node_pb2.CommitBackupRequest,
                     context: grpc.ServicerContext) -> node_pb2.CommitBackupResponse:
        self._backup_caller(context, "commit a backup")
        self.agent.backups.commit(validate.check_segment_id(request.id), request.version)
        return node_pb2.CommitBackupResponse()

    @translated
    def BackupState(self, request: node_pb2.BackupStateRequest,
                    context: grpc.ServicerContext) -> node_pb2.BackupStateResponse:
        self._backup_caller(context, "read a backup's state")
        applied, staged = self.agent.backups.state(validate.check_segment_id(request.id))
        return node_pb2.BackupStateResponse(applied=applied, staged=staged)

    @translated
    def PromoteBackup(self, request: node_pb2.PromoteBackupRequest,
                      context: grpc.ServicerContext):
        self._backup_caller(context, "promote a backup")
        return self.agent.promote(validate.check_name(request.name),
                                  validate.check_segment_id(request.id))


def _stream_pieces(first, rest, rpc: str, name: str, why: str, outcome: str, *,
                   end_required: bool = True, received=None):
    """(offset, bytes) of a page stream (WritePages, StageBackup) whose ``first`` message
    holds the header. InvalidArgument for a second header (it could name another
    segment: refused, never ignored), a message after the one marked last, and, when
    ``end_required``, an end before it (a sender that died mid-stream: ``why``; nothing
    ``outcome``). ``received`` (a metrics counter) counts the bytes."""
    if received is not None:
        received.inc(len(first.data))
    yield first.offset, first.data
    ended = first.last
    for chunk in rest:
        if chunk.HasField("header"):
            raise InvalidArgument(f"{rpc} takes a header in its first message only")
        if ended:
            raise InvalidArgument(f"{rpc} takes no message after the one marked last")
        ended = chunk.last
        if received is not None:
            received.inc(len(chunk.data))
        yield chunk.offset, chunk.data
    if end_required and not ended:
        raise InvalidArgument(f"the {rpc} stream of segment {name} ended before its message "
                              f"marked last ({why}): nothing {outcome}")


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: "ipv4:10.0.0.7:5000" -> "10.0.0.7",
    "ipv6:[::1]:5000" -> "[::1]"; another form (a Unix socket) is kept whole."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    return address.rpartition(":")[0]
