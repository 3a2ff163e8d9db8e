"""The Coordinator gRPC servicer: validate the request, call the domain module, map errors.

Nothing here touches etcd directly; each method checks its input (names, sizes,
modes with vas.core.validate, plus the coordinator's own fields), asks the calling
``Peer`` (vas.core.identity) who the request may act as, calls one method of
segments/nodes/writers/spaces/watch/status, and turns a VasError into its gRPC
status with ``abort_with``. See proto/vas/v1/coordinator.proto for each RPC's contract.

Who may call what (with TLS; without it every peer is LOOPBACK and passes):
node records and reports (RegisterNode, Heartbeat, DeregisterNode,
ReportAttachments) only the node itself; CreateSegment only the home agent (it
allocated the memory); FinishDelete only agents; calls that carry a Caller act as
``peer.caller(request.caller)``: the Caller an agent vouches for, the uid/gid a
user certificate names. Reads of records are open to every authenticated peer.

A DeleteSegment whose Caller names no node comes from an admin tool (vas.admin), not
through an agent: the coordinator then announces it to the home and the replicas'
nodes itself (``Homes.deleted``), which an agent does after its own DeleteSegment.
"""
from __future__ import annotations

import threading

from vas.coordinator.config import CoordinatorConfig
from vas.coordinator.etcd import Etcd
from vas.coordinator.homes import Homes
from vas.coordinator.nodes import Nodes
from vas.coordinator.segments import Segments
from vas.coordinator.promote import Promoter
from vas.coordinator.spaces import Spaces
from vas.coordinator.status import cluster_status
from vas.coordinator.watch import SegmentWatch, SpaceWatch
from vas.coordinator.writers import Writers
from vas.core.errors import InvalidArgument, VasError, abort_with, translated
from vas.core.identity import PeerKind, peer_of_context
from vas.core.validate import (MAX_NAME_LENGTH, check_attach_mode, check_meta, check_mode,
                               check_name, check_replicas, check_seconds, check_segment_id,
                               check_size)
from vas.proto import coordinator_pb2 as pb, coordinator_pb2_grpc

#: ListSegments page size when the request asks for 0, and the largest allowed.
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 10000
#: Most segments one CheckSegments may name.
MAX_CHECK_SEGMENTS = 1000


def check_node_id(node_id: str, what: str = "node id") -> str:
    """Return ``node_id`` if it is 1-255 printable characters without "/" or spaces."""
    if (not node_id or len(node_id) > MAX_NAME_LENGTH or not node_id.isprintable()
            or "/" in node_id or any(ch.isspace() for ch in node_id)):
        raise InvalidArgument(f"invalid {what} {node_id!r}: must be 1-{MAX_NAME_LENGTH} "
                              "printable characters without '/' or spaces")
    return node_id


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is "" or could start a valid name."""
    return check_name(prefix, "prefix") if prefix else prefix


def check_positive(value: int, what: str) -> int:
    if value <= 0:
        raise InvalidArgument(f"invalid {what} {value}: must be > 0")
    return value


def check_lease(lease_id: int) -> int:
    """Return ``lease_id`` if it is 0 (not given) or a valid etcd lease id (> 0)."""
    if lease_id < 0:
        raise InvalidArgument(f"invalid lease id {lease_id}: must be > 0 (or 0 = unchecked)")
    return lease_id


def caller_of(request, context):
    """Who the request acts as: its Caller as the calling peer may send it (see the
    module docstring); InvalidArgument if the request has none."""
    if not request.HasField("caller"):
        raise InvalidArgument("the request has no caller")
    return peer_of_context(context).caller(request.caller)


def require_node(context, node_id: str, what: str) -> str:
    """``node_id`` if the calling peer may act as that node (PermissionDenied if not)."""
    peer_of_context(context).require_node(node_id, what)
    return node_id


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    """The Coordinator API over one etcd client (see coordinator.proto)."""

    def __init__(self, config: CoordinatorConfig, etcd: Etcd):
        self.config = config
        self.etcd = etcd
        self.segments = Segments(etcd, config.txn_attempts)
        self.nodes = Nodes(etcd, config.node_ttl, self.segments)
        self.writers = Writers(etcd, self.segments, config.txn_attempts)
        self.spaces = Spaces(etcd, config.txn_attempts)
        self.homes = Homes(self.nodes, config.tls)
        #: Backups promoted when a home went down (DownWatch) or restarted (RegisterNode).
        self.promoter = Promoter(self.segments, self.homes.stub, self.homes.deleted)
        self.nodes.promote = self.promoter.promote_node
        self._watches_lock = threading.Lock()
        self._watches: set[SegmentWatch] = set()
        self._closing = False

    def close(self) -> None:
        """Close the channels to the agents (after the server stopped)."""
        self.homes.close()

    def close_watches(self) -> None:
        """End every open Watch stream (cleanly) and refuse new ones: server shutdown."""
        with self._watches_lock:
            self._closing = True
            watches, self._watches = self._watches, set()
        for watch in watches:
            watch.close()

    # Nodes -----------------------------------------------------------------------------

    @translated
    def RegisterNode(self, request, context):
        require_node(context, check_node_id(request.node.id), "register")
        if not request.node.address:
            raise InvalidArgument(f"node {request.node.id!r} has no address")
        for segment_id in request.held:
            check_segment_id(segment_id, "held segment id")
        lease, ttl, lost = self.nodes.register(
            request.node, int(check_seconds(request.ttl_seconds, "node ttl")),
            reconcile=request.reconcile, held=request.held)
        return pb.RegisterNodeResponse(lease_id=lease, ttl_seconds=ttl, lost=lost)

    @translated
    def Heartbeat(self, request, context):
        ttl = self.nodes.heartbeat(require_node(context, check_node_id(request.node_id),
                                                "heartbeat"),
                                   check_positive(request.lease_id, "lease id"),
                                   request.memory_used, request.segments, request.state,
                                   request.replicas, request.replica_bytes)
        return pb.HeartbeatResponse(ttl_seconds=ttl)

    @translated
    def DeregisterNode(self, request, context):
        require_node(context, check_node_id(request.node_id), "deregister")
        self.nodes.deregister(request.node_id, check_positive(request.lease_id, "lease id"))
        return pb.DeregisterNodeResponse()

    @translated
    def ListNodes(self, request, context):
        return pb.ListNodesResponse(nodes=self.nodes.list(request.include_down))

    @translated
    def RemoveNode(self, request, context):
        node, lost = self.nodes.remove(caller_of(request, context),
                                       check_node_id(request.node_id), request.force)
        for info in lost:  # their replicas can never be refreshed: their nodes drop them
            self.homes.deleted(info)
        return pb.RemoveNodeResponse(node=node, lost=lost)

    # Segments --------------------------------------------------------------------------

    @translated
    def CreateSegment(self, request, context):
        caller = caller_of(request, context)
        home = require_node(context, check_node_id(request.home or caller.node, "home node"),
                            "create a segment homed")
        return self.segments.create(
            caller, check_name(request.name), check_size(request.size),
            check_mode(request.mode), home, check_replicas(request.replicas),
            check_seconds(request.ttl_seconds, "ttl"), check_lease(request.lease_id),
            check_meta(request.meta))

    @translated
    def GetSegment(self, request, context):
        return self.segments.get(check_name(request.name))

    @translated
    def CheckSegments(self, request, context):
        if len(request.segments) > MAX_CHECK_SEGMENTS:
            raise InvalidArgument(f"CheckSegments of {len(request.segments)} segments: at most "
                                  f"{MAX_CHECK_SEGMENTS}")
        for ref in request.segments:
            check_name(ref.name)
            check_segment_id(ref.id)
        return pb.CheckSegmentsResponse(gone=self.segments.check(request.segments))

    @translated
    def ListSegments(self, request, context):
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"invalid page size {page_size}: at most {MAX_PAGE_SIZE}")
        segments, token = self.segments.list(check_prefix(request.prefix), page_size,
                                             request.page_token)
        return pb.ListSegmentsResponse(segments=segments, next_page_token=token)

    @translated
    def SetSegmentMode(self, request, context):
        info = self.segments.set_mode(caller_of(request, context), check_name(request.name),
                                      check_mode(request.mode))
        self.homes.changed(info)
        return info

    @translated
    def SetSegmentOwner(self, request, context):
        info = self.segments.set_owner(caller_of(request, context), check_name(request.name),
                                       request.uid, request.gid)
        self.homes.changed(info)
        return info

    @translated
    def DeleteSegment(self, request, context):
        # `force` is the home's business (it revokes attachments); the mark is the same.
        caller = caller_of(request, context)
        info = self.segments.mark_deleting(caller, check_name(request.name),
                                           finish=request.finish, force=request.force,
                                           segment_id=check_segment_id(request.id, optional=True))
        if not caller.node:  # no agent made this call, so none tells the holders: we do
            self.homes.deleted(info, force=request.force)
        return info

    @translated
    def FinishDelete(self, request, context):
        peer_of_context(context).require((PeerKind.NODE,), "finish a delete")
        copies = self.segments.finish_delete(check_name(request.name),
                                             check_segment_id(request.id))
        return pb.FinishDeleteResponse(copies=copies)

    @translated
    def ReportAttachments(self, request, context):
        require_node(context, check_node_id(request.node_id), "report attachments")
        for count in request.counts:
            check_name(count.name)
            check_segment_id(count.id)
        gone = self.segments.report_attachments(
            request.node_id, check_positive(request.lease_id, "lease id"), request.counts)
        return pb.ReportAttachmentsResponse(gone=gone)

    # Writer lock -----------------------------------------------------------------------

    @translated
    def AcquireWriter(self, request, context):
        ttl = int(check_seconds(request.ttl_seconds, "writer ttl")) or self.config.writer_ttl
        caller = caller_of(request, context)
        if caller.node:  # the lock records the holder's node: only that agent may name it
            require_node(context, caller.node, "take a writer lock")
        token, lease, granted = self.writers.acquire(caller, check_name(request.name), ttl)
        return pb.AcquireWriterResponse(token=token, lease_id=lease, ttl_seconds=granted)

    @translated
    def RenewWriter(self, request, context):
        ttl = self.writers.renew(check_name(request.name),
                                 check_positive(request.token, "token"),
                                 check_positive(request.lease_id, "lease id"))
        return pb.RenewWriterResponse(ttl_seconds=ttl)

    @translated
    def ReleaseWriter(self, request, context):
        self.writers.release(check_name(request.name), check_positive(request.token, "token"),
                             request.lease_id)
        return pb.ReleaseWriterResponse()

    @translated
    def PublishVersion(self, request, context):
        return self.writers.publish(caller_of(request, context), check_name(request.name),
                                    check_segment_id(request.id),
                                    check_positive(request.token, "token"),
                                    check_lease(request.lease_id),
                                    request.base_version
                                    if request.HasField("base_version") else None)

    @translated
    def DropBackup(self, request, context):
        home = require_node(context, check_node_id(request.home, "home node"),
                            "drop a backup of a segment homed")
        return self.segments.drop_backup(home, check_name(request.name),
                                         check_segment_id(request.id),
                                         check_node_id(request.node, "backup node"))

    @translated
    def AddBackup(self, request, context):
        home = require_node(context, check_node_id(request.home, "home node"),
                            "add a backup of a segment homed")
        return self.segments.add_backup(home, check_name(request.name),
                                        check_segment_id(request.id),
                                        check_node_id(request.node, "backup node"),
                                        request.version)

    # Spaces ----------------------------------------------------------------------------

    @translated
    def CreateSpace(self, request, context):
        return self.spaces.create(caller_of(request, context), check_name(request.name, "space"),
                                  check_mode(request.mode))

    @translated
    def GetSpace(self, request, context):
        return self.spaces.get(check_name(request.name, "space"))

    @translated
    def ListSpaces(self, request, context):
        return pb.ListSpacesResponse(spaces=self.spaces.list(check_prefix(request.prefix)))

    @translated
    def DeleteSpace(self, request, context):
        self.spaces.delete(caller_of(request, context), check_name(request.name, "space"))
        return pb.DeleteSpaceResponse()

    @translated
    def SpaceAdd(self, request, context):
        return self.spaces.add(caller_of(request, context), check_name(request.space, "space"),
                               check_name(request.segment), check_attach_mode(request.mode))

    @translated
    def SpaceRemove(self, request, context):
        return self.spaces.remove(caller_of(request, context), check_name(request.space, "space"),
                                  check_name(request.segment))

    # Watching and status ---------------------------------------------------------------

    def Watch(self, request, context):
        try:
            if request.start_revision < 0:
                raise InvalidArgument(f"invalid start revision {request.start_revision}")
            kind = SpaceWatch if request.spaces else SegmentWatch
            watch = kind(self.etcd, check_prefix(request.prefix), request.start_revision)
        except VasError as exc:
            abort_with(context, exc)
        with self._watches_lock:
            closing = self._closing
            self._watches.add(watch)
        # Ends the etcd watch when the client cancels (or the server cancels the call).
        if closing or not context.add_callback(watch.close):
            watch.close()
        try:
            yield from watch.events()
        except VasError as exc:
            abort_with(context, exc)
        finally:
            with self._watches_lock:
                self._watches.discard(watch)

    @translated
    def ClusterStatus(self, request, context):
        return cluster_status(self.etcd)
