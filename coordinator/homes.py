"""Telling a segment's home agent that its record changed (a chmod or chown, a delete).

The home checks its local attaches against its cached copy of the record, so a
mode or owner change must reach it before the reply: the coordinator, which
made the change whoever asked (an agent, or an admin tool straight over gRPC),
calls ``Node.SegmentChanged`` on the home, which re-reads the record. A home
that cannot be told in time still re-reads its records at its next heartbeat.

A delete made through an agent is that agent's to announce (it asks the home to
free the segment and tells the replicas' nodes, node/notices.py). A delete
made straight over gRPC (an admin tool: its Caller names no node) has nobody
else to announce it, so ``deleted`` does: ``SegmentChanged`` to the home (it
re-reads, sees the deleting mark, frees and finishes the delete; for a forced
delete ``Node.ReleaseSegment`` with ``force``, which revokes the attachments and
frees at once) and ``Node.ReleaseReplica`` to the nodes in ``copies``, without
waiting for the answers — unless other nodes still have it attached (and the delete
is not forced): the home then keeps the pages for them and tells the copies' nodes
itself once it frees them. Before, nobody told them: the home freed the segment at
a later re-read and the replicas held their memory until their nodes' periodic
check (``RECHECK_AGE``, 30 s, plus a heartbeat: 33 s measured).
"""
from __future__ import annotations

import functools
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

    def deleted(self, info: types_pb2.SegmentInfo, force: bool = False) -> None:
        """Announce the delete of ``info`` (see the module docstring; ``force``: the
        home revokes the attachments and frees it at once); failures are logged (the
        nodes' periodic checks are the safety net)."""
        try:
            addresses = {node.id: node.address for node in self.nodes.list()}
        except VasError as exc:
            log.warning("cannot tell the holders of deleted segment %s: %s", info.name, exc)
            return
        calls = []
        home = addresses.get(info.home)
        if home is not None and info.state == types_pb2.SEGMENT_STATE_DELETING:
            stub = self._stub(home)
            calls.append((info.home, stub.ReleaseSegment.future(
                node_pb2.ReleaseSegmentRequest(name=info.name, id=info.id, force=True),
                timeout=NOTIFY_TIMEOUT) if force else stub.SegmentChanged.future(
                node_pb2.SegmentChangedRequest(name=info.name, id=info.id),
                timeout=NOTIFY_TIMEOUT)))
        if not force and any(node != info.home for node in info.attached_nodes):
            copies = ()  # attached elsewhere: the home tells them once it frees the pages
        else:
            copies = info.copies
        for node in copies:
            if node in addresses:
                calls.append((node, self._stub(addresses[node]).ReleaseReplica.future(
                    node_pb2.ReleaseReplicaRequest(name=info.name, id=info.id),
                    timeout=NOTIFY_TIMEOUT)))
        for node, call in calls:
            call.add_done_callback(functools.partial(_log_failure, node, info.name))

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        """The Node stub of the agent at ``address`` (one channel per address)."""
        return self._stub(address)

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


def _log_failure(node: str, name: str, call: grpc.Future) -> None:
    """Log a failed notice of a delete (NOT_FOUND: nothing of it held there)."""
    error = call.exception()
    if error is not None and error.code() != grpc.StatusCode.NOT_FOUND:
        log.warning("cannot tell node %s that segment %s was deleted: %s", node, name,
                    from_rpc_error(error))
