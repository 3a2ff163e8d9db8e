"""The Node gRPC service: what this agent offers to other agents (thin: check, call, translate)."""
from __future__ import annotations

import grpc

from vas.errors import InvalidArgument, VasError, abort_with
from vas.node.agent import Agent
from vas.proto import node_pb2, node_pb2_grpc


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Serves vas.v1.Node for one ``Agent``."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def ReleaseSegment(self, request: node_pb2.ReleaseSegmentRequest,
                       context: grpc.ServicerContext) -> node_pb2.ReleaseSegmentResponse:
        try:
            if not request.id:
                raise InvalidArgument("ReleaseSegment needs a segment id")
            freed = self.agent.release_segment(request.name, request.id, request.force)
        except VasError as exc:
            abort_with(context, exc)
        return node_pb2.ReleaseSegmentResponse(freed=freed)

    def SegmentChanged(self, request: node_pb2.SegmentChangedRequest,
                       context: grpc.ServicerContext) -> node_pb2.SegmentChangedResponse:
        try:
            if not request.id:
                raise InvalidArgument("SegmentChanged needs a segment id")
            self.agent.segment_changed(request.name, request.id)
        except VasError as exc:
            abort_with(context, exc)
        return node_pb2.SegmentChangedResponse()
