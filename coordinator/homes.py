"""Telling a segment's home agent that its record changed (a chmod or chown).

The home checks its local attaches against its cached copy of the record, so a
mode or owner change must reach it before the reply: the coordinator, which
made the change whoever asked (an agent, or an admin tool straight over gRPC),
calls ``Node.SegmentChanged`` on the home, which re-reads the record. A home
that cannot be told in time still re-reads its records at its next heartbeat.
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
