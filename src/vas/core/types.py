"""The public records of the Python API: SegmentInfo, NodeInfo, SpaceInfo.

Frozen dataclasses, built from their vas.v1 protobuf messages by ``from_proto``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vas.proto import types_pb2

SEGMENT_STATES = {
    types_pb2.SEGMENT_STATE_READY: "ready",
    types_pb2.SEGMENT_STATE_DEGRADED: "degraded",
    types_pb2.SEGMENT_STATE_LOST: "lost",
    types_pb2.SEGMENT_STATE_DELETING: "deleting",
}
NODE_STATES = {
    types_pb2.NODE_STATE_READY: "ready",
    types_pb2.NODE_STATE_DRAINING: "draining",
    types_pb2.NODE_STATE_DOWN: "down",
}


@dataclass(frozen=True)
class SegmentInfo:
    """A segment as the cluster sees it.

    ``size`` and ``address`` are bytes; ``mode`` is permission bits (0o640);
    ``home`` is a node id; ``replicas`` the number of backups asked for at create
    (full copies on other nodes that ``sync()`` waits for, promoted when the home dies);
    ``state`` one of "ready", "degraded", "lost", "deleting"; ``created`` and
    ``expires`` Unix seconds (``expires`` None when the segment has no ttl);
    ``meta`` the metadata given at create (str -> str; empty when none);
    ``copies`` the ids of the other nodes holding a replica or a backup (each takes
    ``size`` bytes of that node's memory), as their agents last reported.
    """

    name: str
    id: int
    size: int
    address: int
    mode: int
    uid: int
    gid: int
    home: str
    replicas: int
    version: int
    state: str
    attachments: int
    created: float
    expires: float | None
    meta: dict[str, str] = field(default_factory=dict)
    copies: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, msg: types_pb2.SegmentInfo) -> "SegmentInfo":
        return cls(
            name=msg.name, id=msg.id, size=msg.size, address=msg.address, mode=msg.mode,
            uid=msg.uid, gid=msg.gid, home=msg.home, replicas=msg.replicas, version=msg.version,
            state=SEGMENT_STATES.get(msg.state, "unknown"), attachments=msg.attachments,
            created=msg.created, expires=msg.expires or None, meta=dict(msg.meta),
            copies=tuple(msg.copies),
        )


@dataclass(frozen=True)
class NodeInfo:
    """A node agent: ``address`` is its gRPC host:port, ``socket`` its Unix socket path;
    memory figures are bytes; ``state`` is "ready", "draining" or "down" (its lease
    lapsed: listed by ``Client.nodes(include_down=True)`` until ``vasctl node rm``),
    ``down_since`` when it was seen down (Unix seconds; None when up or not seen yet);
    ``replicas`` and ``replica_bytes`` the copies of segments homed elsewhere that it
    holds (part of ``segments`` and ``memory_used``)."""

    id: str
    address: str
    socket: str
    memory_total: int
    memory_used: int
    segments: int
    state: str
    down_since: float | None = None
    replicas: int = 0
    replica_bytes: int = 0

    @classmethod
    def from_proto(cls, msg: types_pb2.NodeInfo) -> "NodeInfo":
        return cls(
            id=msg.id, address=msg.address, socket=msg.socket, memory_total=msg.memory_total,
            memory_used=msg.memory_used, segments=msg.segments,
            state=NODE_STATES.get(msg.state, "unknown"), down_since=msg.down_since or None,
            replicas=msg.replicas, replica_bytes=msg.replica_bytes,
        )


@dataclass(frozen=True)
class SpaceInfo:
    """A named set of segments; ``members`` maps segment name -> attach mode ("r"/"rw")."""

    name: str
    mode: int
    uid: int
    gid: int
    members: dict[str, str]
    created: float

    @classmethod
    def from_proto(cls, msg: types_pb2.SpaceInfo) -> "SpaceInfo":
        return cls(
            name=msg.name, mode=msg.mode, uid=msg.uid, gid=msg.gid,
            members={m.segment: m.mode for m in msg.members}, created=msg.created,
        )


def cluster_status(response, local_node: str | None) -> dict:
    """The operators' summary of a ClusterStatusResponse, as ``vas.Client.status`` and
    ``vas.admin.AdminClient.status`` return it (``vasctl status`` prints it):
    ``etcd``, ``revision``, ``nodes`` and ``down_nodes`` (lists of NodeInfo),
    ``segments``, ``segment_bytes``, ``spaces``, ``lost`` and ``degraded`` (segment
    names) and ``local_node`` (the serving agent's id; None when no agent served it)."""
    return {
        "etcd": response.etcd, "revision": response.revision,
        "nodes": [NodeInfo.from_proto(n) for n in response.nodes],
        "segments": response.segments, "segment_bytes": response.segment_bytes,
        "spaces": response.spaces, "local_node": local_node,
        "down_nodes": [NodeInfo.from_proto(n) for n in response.down_nodes],
        "lost": [ref.name for ref in response.lost],
        "degraded": [ref.name for ref in response.degraded],
    }
