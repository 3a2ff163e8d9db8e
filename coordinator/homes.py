"""Telling a segment's home agent that its record changed (a chmod or chown), or that
an admin tool deleted it.

The home checks its local attaches against its cached copy of the record, so a
mode or owner change must reach it before the reply: the coordinator, which
made the change whoever asked (an agent, or an admin tool straight over gRPC),
calls ``Node.SegmentChanged`` on the home, which re-reads the record. A home
that cannot be told in time still re-reads its records at its next heartbeat.

A delete made through an agent is carried out by that agent (it asks the home to
free the pages); one made by an admin tool straight over gRPC (vas.admin) has no
agent behind it, so the coordinator asks the home itself (``release``:
``Node.ReleaseSegment``), and finishes the delete when no agent holds the segment.
"""
from __future__ import annotations

import logging
import threading

import grpc

from vas.coordinator.nodes import Nodes
from vas.core.errors import VasError, from_rpc_error
from vas.core.tls import NODE_HOST, TlsConfig, open_channel
from vas.proto import node_pb2, node_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

#: Seconds one SegmentChanged call may take: a chmod waits for it.
NOTIFY_TIMEOUT = 2.0
#: Seconds one ReleaseSegment call may take: an admin's delete waits for it (a forced
#: one while the home revokes the attachments).
RELEASE_TIMEOUT = 5.0


class Homes:
    """Node-service channels to the agents, one per address (mutual TLS when configured)."""

    def __init__(self, nodes: Nodes, tls: TlsConfig | None):
        self.nodes = nodes
        self.tls = tls
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[grpc.Channel, node_pb2_grpc.NodeStub]] = {}

    def changed(self, info: types_pb2.SegmentInfo) -> None:
        """Have the home of ``info`` re-read its record now; a failure is only logged."""
        try:
            address = self.nodes.address(info.home)
            if address is None:
                return  # no home agent: nothing is cached anywhere
            self._stub(address).SegmentChanged(
                node_pb2.SegmentChangedRequest(name=info.name, id=info.id),
                timeout=NOTIFY_TIMEOUT)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if error.code != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: not held there any more
                log.warning("cannot tell node %s that segment %s changed: %s", info.home,
                            info.name, error)
        except VasError as exc:
            log.warning("cannot tell node %s that segment %s changed: %s", info.home,
                        info.name, exc)

    def release(self, info: types_pb2.SegmentInfo, force: bool) -> bool:
        """Ask the home of ``info`` (just marked deleting) to free it: at once when
        unattached or ``force``, else at its last detach (the home then finishes the
        delete and tells the nodes holding replicas). True when no agent holds it (the
        home is not registered, or holds no such id): the caller finishes the delete.
        Any other failure is only logged: the home frees the segment when it next
        re-reads its records."""
        try:
            address = self.nodes.address(info.home)
            if address is None:
                return True
            self._stub(address).ReleaseSegment(
                node_pb2.ReleaseSegmentRequest(name=info.name, id=info.id, force=force),
                timeout=RELEASE_TIMEOUT)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if error.code == grpc.StatusCode.NOT_FOUND:
                return True
            log.warning("cannot ask node %s to free deleted segment %s: %s", info.home,
                        info.name, error)
        except VasError as exc:
            log.warning("cannot ask node %s to free deleted segment %s: %s", info.home,
                        info.name, exc)
        return False

    def _stub(self, address: str) -> node_pb2_grpc.NodeStub:
        with self._lock:
            entry = self._stubs.get(address)
            if entry is None:
                channel = open_channel(address, self.tls, NODE_HOST)
                entry = self._stubs[address] = (channel, node_pb2_grpc.NodeStub(channel))
            return entry[1]

    def close(self) -> None:
        with self._lock:
            stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            channel.close()
