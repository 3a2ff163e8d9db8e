"""The Node gRPC service: what this agent offers to other agents (thin: check, call, translate).

Who may call (with TLS; without it every peer is LOOPBACK and passes): the
page calls (ReadPages, OpenBulk, ChunkHashes, WritePages) agents, which vouch for
their callers, and user certificates, checked against the segment's current
record (``Agent.check_peer``); ReleaseSegment and ReleaseReplica (steps of a delete
that the coordinator already allowed) only agents; SegmentChanged agents and
coordinators.
"""
from __future__ import annotations

import os

import grpc

from vas.core.errors import InvalidArgument, VasError, abort_with
from vas.core.identity import PeerKind, peer_of_context
from vas.node.agent import Agent
from vas.proto import node_pb2, node_pb2_grpc

#: Bytes per ReadPages message: a message stays under gRPC's default 4 MiB limit,
#: so any client can read the stream without raising its limits.
_CHUNK = 2 << 20


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Serves vas.v1.Node for one ``Agent``."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def ReleaseSegment(self, request: node_pb2.ReleaseSegmentRequest,
                       context: grpc.ServicerContext) -> node_pb2.ReleaseSegmentResponse:
        try:
            peer_of_context(context).require((PeerKind.NODE,), "release a segment")
            if not request.id:
                raise InvalidArgument("ReleaseSegment needs a segment id")
            freed = self.agent.homes.release(request.name, request.id, request.force)
        except VasError as exc:
            abort_with(context, exc)
        return node_pb2.ReleaseSegmentResponse(freed=freed)

    def SegmentChanged(self, request: node_pb2.SegmentChangedRequest,
                       context: grpc.ServicerContext) -> node_pb2.SegmentChangedResponse:
        try:
            peer_of_context(context).require((PeerKind.NODE, PeerKind.COORDINATOR),
                                             "announce a record change")
            if not request.id:
                raise InvalidArgument("SegmentChanged needs a segment id")
            self.agent.homes.segment_changed(request.name, request.id)
        except VasError as exc:
            abort_with(context, exc)
        return node_pb2.SegmentChangedResponse()

    def ReleaseReplica(self, request: node_pb2.ReleaseReplicaRequest,
                       context: grpc.ServicerContext) -> node_pb2.ReleaseReplicaResponse:
        try:
            peer_of_context(context).require((PeerKind.NODE,), "release a replica")
            if not request.id:
                raise InvalidArgument("ReleaseReplica needs a segment id")
            dropped = self.agent.replicas.drop(request.name, request.id)
        except VasError as exc:
            abort_with(context, exc)
        return node_pb2.ReleaseReplicaResponse(dropped=dropped)

    def ReadPages(self, request: node_pb2.ReadPagesRequest, context: grpc.ServicerContext):
        try:
            fd, version = self.agent.page_source(request.id, request.offset, request.length,
                                                 peer_of_context(context))
        except VasError as exc:
            abort_with(context, exc)
        try:
            offset, end = request.offset, request.offset + request.length
            while offset < end:
                data = os.pread(fd, min(_CHUNK, end - offset), offset)
                yield node_pb2.PageChunk(offset=offset, data=data, version=version)
                offset += len(data)
        finally:
            os.close(fd)

    def OpenBulk(self, request: node_pb2.OpenBulkRequest,
                 context: grpc.ServicerContext) -> node_pb2.OpenBulkResponse:
        try:
            segment = self.agent.homes.held(request.id)
            self.agent.check_peer(peer_of_context(context), segment, "r")
            info = segment.info
        except VasError as exc:
            abort_with(context, exc)
        return node_pb2.OpenBulkResponse(address=self.agent.bulk_address, size=info.size,
                                         version=info.version)

    def WritePages(self, request_iterator, context: grpc.ServicerContext):
        try:
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise InvalidArgument("WritePages needs a header in its first message")
            header = first.header
            if not header.id or not header.token:
                raise InvalidArgument("WritePages needs a segment id and a writer token")
            segment = self.agent.homes.held(header.id)
            peer = peer_of_context(context)
            self.agent.check_peer(peer, segment, "rw")
            # The coordinator believes the Caller this home forwards: a user's is its own.
            header.caller.CopyFrom(peer.caller(header.caller))

            def pieces():
                yield first.offset, first.data
                for chunk in request_iterator:
                    yield chunk.offset, chunk.data
            return self.agent.writers.write_pages(segment, header, pieces())
        except VasError as exc:
            abort_with(context, exc)

    def ChunkHashes(self, request: node_pb2.ChunkHashesRequest,
                    context: grpc.ServicerContext) -> node_pb2.ChunkHashesResponse:
        try:
            if not request.id:
                raise InvalidArgument("ChunkHashes needs a segment id")
            segment = self.agent.homes.held(request.id)
            self.agent.check_peer(peer_of_context(context), segment, "r")
            version, hashes = self.agent.writers.published_hashes(segment, request.chunk_size)
        except VasError as exc:
            abort_with(context, exc)
        return node_pb2.ChunkHashesResponse(version=version, hashes=hashes)
