"""gRPC clients the agent uses: its coordinator and the Node service of other agents.

Every unary call has a deadline and turns a failed status into the matching
``vas.errors`` exception (``raise from_rpc_error(exc) from exc``), so the agent's
policy code only ever sees VasError.
"""
from __future__ import annotations

import contextlib
import logging

import grpc

from vas.core.defaults import MAX_GRPC_MESSAGE
from vas.core.errors import AlreadyExists, NotFound, Unavailable, from_rpc_error
from vas.core.repeat import call_once_more, connection_lost, method_name
from vas.core.sizes import human_size
from vas.core.tls import COORDINATOR_HOST, NODE_HOST, TlsConfig, open_channel
from vas.node import locks, metrics
from vas.proto import coordinator_pb2 as pb
from vas.proto import coordinator_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

#: Channel options shared by every channel the agent opens and its server: the local
#: protocol allows 4 MiB messages, so the gRPC hop must carry them too; a larger
#: message is refused with RESOURCE_EXHAUSTED.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
]


class CoordinatorClient:
    """The coordinator RPCs the agent makes, one typed method each, with deadlines and
    VasError translation (and the lock-order check: no agent lock is held across one).

    ``target`` is a gRPC target: "host:port", or "ipv4:a:1,b:2" to fail over between
    several coordinators; ``tls``: mutual TLS (the server must hold a coordinator
    certificate), None for plaintext. Example::

        coordinator = CoordinatorClient("127.0.0.1:7300", timeout=10)
        nodes = coordinator.list_nodes().nodes
    """

    def __init__(self, target: str, timeout: float, tls: TlsConfig | None = None):
        self.target = target
        self.timeout = timeout
        self.channel = open_channel(target, tls, COORDINATOR_HOST, CHANNEL_OPTIONS)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def _call(self, rpc, request, timeout: float | None = None):
        """``unary``, made once more when its connection failed under it and that is
        safe (vas/core/repeat.py ``call_once_more``)."""
        return call_once_more(lambda left: unary(rpc, request, left), method_name(rpc),
                              timeout or self.timeout)

    # -- nodes
    def register_node(self, node: types_pb2.NodeInfo, ttl: int, reconcile: bool = False,
                      held: list[int] = ()) -> pb.RegisterNodeResponse:
        return self._call(self.stub.RegisterNode, pb.RegisterNodeRequest(
            node=node, ttl_seconds=ttl, reconcile=reconcile, held=held))

    def heartbeat(self, node_id: str, lease_id: int, memory_used: int, segments: int,
                  replicas: int = 0, replica_bytes: int = 0) -> pb.HeartbeatResponse:
        return self._call(self.stub.Heartbeat, pb.HeartbeatRequest(
            node_id=node_id, lease_id=lease_id, memory_used=memory_used, segments=segments,
            state=types_pb2.NODE_STATE_READY, replicas=replicas, replica_bytes=replica_bytes))

    def remove_node(self, request: pb.RemoveNodeRequest) -> pb.RemoveNodeResponse:
        return self._call(self.stub.RemoveNode, request)

    def deregister_node(self, node_id: str, lease_id: int, timeout: float) -> None:
        self._call(self.stub.DeregisterNode,
                   pb.DeregisterNodeRequest(node_id=node_id, lease_id=lease_id), timeout)

    def list_nodes(self, request: pb.ListNodesRequest | None = None) -> pb.ListNodesResponse:
        return self._call(self.stub.ListNodes, request or pb.ListNodesRequest())

    def cluster_status(self, request: pb.ClusterStatusRequest) -> pb.ClusterStatusResponse:
        return self._call(self.stub.ClusterStatus, request)

    def report_attachments(self, node_id: str, lease_id: int, counts) -> list[int]:
        """Store the counts; the ids of reported copies whose segment is gone."""
        return list(self._call(self.stub.ReportAttachments, pb.ReportAttachmentsRequest(
            node_id=node_id, lease_id=lease_id, counts=counts)).gone)

    # -- segments
    def create_segment(self, **fields) -> types_pb2.SegmentInfo:
        """CreateSegment, made once more when its connection failed under it; a second
        attempt that finds the name taken raises the first attempt's Unavailable: the
        record may be that attempt's own (the caller settles such creates,
        node/homes.py ``settle_doubted``), so that making it again is safe."""
        request = pb.CreateSegmentRequest(**fields)
        try:
            return unary(self.stub.CreateSegment, request, self.timeout)
        except Unavailable as exc:
            if not connection_lost(exc):
                raise
            first = exc
        try:
            return unary(self.stub.CreateSegment, request, self.timeout)
        except AlreadyExists:
            raise first from None

    def get_segment(self, name: str) -> types_pb2.SegmentInfo:
        return self._call(self.stub.GetSegment, pb.GetSegmentRequest(name=name))

    def find_segment(self, name: str) -> types_pb2.SegmentInfo | None:
        """``get_segment``, or None when there is no such segment."""
        try:
            return self.get_segment(name)
        except NotFound:
            return None

    def check_segments(self, refs: list[tuple[str, int]]) -> list[int]:
        """The ids among ``refs`` ((name, id), at most 1000) whose segment is gone."""
        request = pb.CheckSegmentsRequest(
            segments=[pb.SegmentRef(name=name, id=segment_id) for name, segment_id in refs])
        return list(self._call(self.stub.CheckSegments, request).gone)

    def list_segments(self, request: pb.ListSegmentsRequest) -> pb.ListSegmentsResponse:
        return self._call(self.stub.ListSegments, request)

    def set_segment_mode(self, caller, name: str, mode: int) -> types_pb2.SegmentInfo:
        return self._call(self.stub.SetSegmentMode,
                          pb.SetSegmentModeRequest(caller=caller, name=name, mode=mode))

    def set_segment_owner(self, caller, name: str, uid: int, gid: int) -> types_pb2.SegmentInfo:
        return self._call(self.stub.SetSegmentOwner,
                          pb.SetSegmentOwnerRequest(caller=caller, name=name, uid=uid, gid=gid))

    def delete_segment(self, **fields) -> types_pb2.SegmentInfo:
        return self._call(self.stub.DeleteSegment, pb.DeleteSegmentRequest(**fields))

    def drop_backup(self, home: str, name: str, segment_id: int, node: str
                    ) -> types_pb2.SegmentInfo:
        """Remove ``node`` from the backups of segment ``segment_id`` homed on ``home``."""
        return self._call(self.stub.DropBackup, pb.DropBackupRequest(
            home=home, name=name, id=segment_id, node=node))

    def add_backup(self, home: str, name: str, segment_id: int, node: str, version: int
                   ) -> types_pb2.SegmentInfo:
        """Add ``node``, filled to ``version``, to the backups of segment ``segment_id``."""
        return self._call(self.stub.AddBackup, pb.AddBackupRequest(
            home=home, name=name, id=segment_id, node=node, version=version))

    def finish_delete(self, name: str, segment_id: int, timeout: float) -> list[str]:
        """Remove the record of a freed segment; the nodes holding replicas of it."""
        return list(self._call(self.stub.FinishDelete,
                               pb.FinishDeleteRequest(name=name, id=segment_id), timeout).copies)

    # -- writer lock and versions
    def acquire_writer(self, caller, name: str, ttl: int) -> pb.AcquireWriterResponse:
        return self._call(self.stub.AcquireWriter,
                          pb.AcquireWriterRequest(caller=caller, name=name, ttl_seconds=ttl))

    def renew_writer(self, name: str, token: int, lease_id: int,
                     timeout: float | None = None) -> None:
        self._call(self.stub.RenewWriter,
                   pb.RenewWriterRequest(name=name, token=token, lease_id=lease_id), timeout)

    def release_writer(self, name: str, token: int, lease_id: int, timeout: float) -> None:
        self._call(self.stub.ReleaseWriter,
                   pb.ReleaseWriterRequest(name=name, token=token, lease_id=lease_id), timeout)

    def publish_version(self, caller, name: str, segment_id: int, token: int,
                        lease_id: int, base: int | None = None) -> types_pb2.SegmentInfo:
        """``base``: publish only if the segment is at that version (else Busy)."""
        return self._call(self.stub.PublishVersion, pb.PublishVersionRequest(
            caller=caller, name=name, id=segment_id, token=token, lease_id=lease_id,
            base_version=base))

    # -- spaces
    def create_space(self, caller, name: str, mode: int) -> types_pb2.SpaceInfo:
        return self._call(self.stub.CreateSpace,
                          pb.CreateSpaceRequest(caller=caller, name=name, mode=mode))

    def get_space(self, name: str) -> types_pb2.SpaceInfo:
        return self._call(self.stub.GetSpace, pb.GetSpaceRequest(name=name))

    def list_spaces(self, request: pb.ListSpacesRequest) -> pb.ListSpacesResponse:
        return self._call(self.stub.ListSpaces, request)

    def delete_space(self, caller, name: str) -> None:
        self._call(self.stub.DeleteSpace, pb.DeleteSpaceRequest(caller=caller, name=name))

    def space_add(self, caller, space: str, segment: str, mode: str) -> types_pb2.SpaceInfo:
        return self._call(self.stub.SpaceAdd, pb.SpaceAddRequest(
            caller=caller, space=space, segment=segment, mode=mode))

    def space_remove(self, caller, space: str, segment: str) -> types_pb2.SpaceInfo:
        return self._call(self.stub.SpaceRemove, pb.SpaceRemoveRequest(
            caller=caller, space=space, segment=segment))

    @contextlib.contextmanager
    def watch(self, request: pb.WatchRequest, timeout: float):
        """``with coordinator.watch(request, timeout) as events``: the Watch stream's events
        until ``timeout`` seconds pass (then it just ends); cancelled on leaving."""
        locks.assert_unlocked("Coordinator.Watch")
        call = self.stub.Watch(request, timeout=timeout)

        def events():
            try:
                yield from call
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise from_rpc_error(exc) from exc
        try:
            yield events()
        finally:
            call.cancel()

    def close(self) -> None:
        self.channel.close()


def unary(rpc, request, timeout: float):
    """Call the stub method ``rpc`` with a deadline; raise VasError on failure."""
    locks.assert_unlocked(method_name(rpc))
    try:
        return rpc(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


#: Seconds past its deadline a streaming call is waited for before it is cancelled here.
_DEADLINE_GRACE = 0.5


class PeerClients:
    """Node-service stubs of other agents, one cached channel per address (mutual TLS
    with ``tls``: the server must hold an agent certificate)."""

    def __init__(self, timeout: float, tls: TlsConfig | None = None):
        self.timeout = timeout
        self.tls = tls
        self._lock = locks.Lock("peer channels", locks.Rank.PEERS)
        self._channels: dict[str, tuple[grpc.Channel, node_pb2_grpc.NodeStub]] = {}

    def _stub(self, address: str) -> node_pb2_grpc.NodeStub:
        with self._lock:
            entry = self._channels.get(address)
            if entry is None:
                channel = open_channel(address, self.tls, NODE_HOST, CHANNEL_OPTIONS)
                entry = self._channels[address] = (channel, node_pb2_grpc.NodeStub(channel))
            return entry[1]

    def release_segment(self, address: str, name: str, segment_id: int, force: bool) -> bool:
        """Ask the agent at ``address`` to free segment ``segment_id``; True if freed at once."""
        request = node_pb2.ReleaseSegmentRequest(name=name, id=segment_id, force=force)
        return unary(self._stub(address).ReleaseSegment, request, self.timeout).freed

    def release_replica(self, address: str, name: str, segment_id: int,
                        timeout: float) -> bool:
        """Tell the agent at ``address`` that segment ``segment_id`` is gone: it drops its
        replica; True if one was retired."""
        request = node_pb2.ReleaseReplicaRequest(name=name, id=segment_id)
        return unary(self._stub(address).ReleaseReplica, request, timeout).dropped

    def open_bulk(self, address: str, name: str, segment_id: int, relay_address: str = "",
                  failed_relays: tuple[str, ...] = ()) -> node_pb2.OpenBulkResponse:
        """Where the agent at ``address`` serves segment ``segment_id`` over the bulk channel,
        and which relay to pull it from (``relay``, node/relay.py): ``relay_address``, this
        agent's listener if it relays the copy on; ``failed_relays``, ones that failed it."""
        request = node_pb2.OpenBulkRequest(name=name, id=segment_id, relay_address=relay_address,
                                           failed_relays=failed_relays)
        return unary(self._stub(address).OpenBulk, request, self.timeout)

    def read_pages_into(self, address: str, name: str, segment_id: int, view: memoryview,
                        timeout: float, offset: int = 0) -> None:
        """Fill ``view`` with segment ``segment_id``'s bytes from ``offset`` on, read from the
        agent at ``address`` (ReadPages).

        ``timeout`` bounds the whole stream. Raises Unavailable when the stream
        ends short or sends a chunk outside the range.
        """
        request = node_pb2.ReadPagesRequest(name=name, id=segment_id, offset=offset,
                                            length=view.nbytes)
        done = 0
        locks.assert_unlocked("Node.ReadPages")
        try:
            for chunk in self._stub(address).ReadPages(request, timeout=timeout):
                start = chunk.offset - offset
                end = start + len(chunk.data)
                if start != done or end > view.nbytes:
                    raise Unavailable(f"ReadPages of {name} from {address} sent bytes "
                                      f"[{chunk.offset}, {chunk.offset + len(chunk.data)}) "
                                      "out of order")
                view[start:end] = chunk.data
                metrics.RECEIVED_READ_PAGES.inc(end - start)
                done = end
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        if done != view.nbytes:
            raise Unavailable(f"ReadPages of {name} from {address} ended after "
                              f"{human_size(done)} of {human_size(view.nbytes)}")

    def write_pages(self, address: str, header: node_pb2.WritePagesHeader, view: memoryview,
                    runs: list[tuple[int, int]], timeout: float) -> types_pb2.SegmentInfo:
        """Send the byte ``runs`` ((offset, length) of ``view``, each at most 2 MiB) to the
        home agent at ``address`` as one WritePages publish; the record at the new version."""
        def messages():
            # The end is marked: a stream cut short (this agent dying mid-publish) publishes
            # nothing at the home.
            yield node_pb2.WritePagesChunk(header=node_pb2.WritePagesHeader(
                caller=header.caller, name=header.name, id=header.id, token=header.token,
                lease_id=header.lease_id, end_marked=True))
            for offset, length in runs:
                with view[offset:offset + length] as part:
                    yield node_pb2.WritePagesChunk(offset=offset, data=part.tobytes())
                metrics.SENT_WRITE_PAGES.inc(length)
            yield node_pb2.WritePagesChunk(last=True)
        locks.assert_unlocked("Node.WritePages")
        try:
            return self._stub(address).WritePages(messages(), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def hold_backup(self, address: str, name: str, segment_id: int, size: int,
                    timeout: float, version: int = 0) -> None:
        """Have the agent at ``address`` make an all-zero backup of segment ``segment_id``
        at ``version`` (0: a new segment; else one to fill)."""
        request = node_pb2.HoldBackupRequest(name=name, id=segment_id, size=size,
                                             version=version)
        unary(self._stub(address).HoldBackup, request, timeout)

    def stage_backup(self, address: str, name: str, segment_id: int, base: int,
                     pieces, timeout: float, fill: bool = False) -> None:
        """Stage ``pieces`` ((offset, bytes-like), each at most 2 MiB) at the backup held by
        the agent at ``address`` as version ``base`` + 1 (StageBackup); with ``fill``,
        write them at once as bytes of ``base`` (a new backup being filled)."""
        def messages():
            yield node_pb2.StageBackupChunk(header=node_pb2.StageBackupHeader(
                name=name, id=segment_id, base_version=base, fill=fill))
            for offset, data in pieces:
                yield node_pb2.StageBackupChunk(offset=offset, data=bytes(data))
                metrics.SENT_WRITE_PAGES.inc(len(data))
            yield node_pb2.StageBackupChunk(last=True)
        locks.assert_unlocked("Node.StageBackup")
        call = self._stub(address).StageBackup.future(messages(), timeout=timeout)
        try:
            # Waited for here, not by gRPC: a blocking stream call to a stopped peer
            # (SIGSTOP: its window full) was seen to outlive its deadline.
            call.result(timeout=timeout + _DEADLINE_GRACE)
        except grpc.FutureTimeoutError:
            call.cancel()
            raise Unavailable(f"backup of {name} at {address} did not take version "
                              f"{base + 1} within {timeout:.1f} s") from None
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def commit_backup(self, address: str, name: str, segment_id: int, version: int,
                      timeout: float) -> None:
        """Have the backup at ``address`` apply its staged ``version`` (published now)."""
        request = node_pb2.CommitBackupRequest(name=name, id=segment_id, version=version)
        unary(self._stub(address).CommitBackup, request, timeout)

    def chunk_hashes(self, address: str, name: str, segment_id: int, chunk_size: int
                     ) -> tuple[int, bytes]:
        """(version, chunk hashes) of segment ``segment_id`` held by the agent at ``address``."""
        request = node_pb2.ChunkHashesRequest(name=name, id=segment_id, chunk_size=chunk_size)
        response = unary(self._stub(address).ChunkHashes, request, self.timeout)
        return response.version, response.hashes

    def close(self) -> None:
        with self._lock:
            channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            channel.close()
