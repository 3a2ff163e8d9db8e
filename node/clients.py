"""gRPC clients the agent uses: its coordinator and the Node service of other agents.

Every unary call has a deadline and turns a failed status into the matching
``vas.core.errors`` exception (``raise from_rpc_error(exc) from exc``), so the agent's
policy code only ever sees VasError.
"""
from __future__ import annotations

import contextlib
import threading

import grpc

from vas.core.errors import Unavailable, from_rpc_error
from vas.proto import coordinator_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

#: Channel options shared by every channel the agent opens: the local protocol
#: allows 4 MiB messages, so the gRPC hop must carry them too.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


class CoordinatorClient:
    """Unary calls to the coordinator(s) at ``target``, by method name, with VasError translation.

    ``target`` is a gRPC target: "host:port", or "ipv4:a:1,b:2" to fail over between
    several coordinators. Example::

        coordinator = CoordinatorClient("127.0.0.1:7300", timeout=10)
        nodes = coordinator.call("ListNodes", coordinator_pb2.ListNodesRequest()).nodes
    """

    def __init__(self, target: str, timeout: float):
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def call(self, method: str, request, timeout: float | None = None):
        """Call the unary RPC ``method`` with ``request``; raise VasError on failure."""
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    @contextlib.contextmanager
    def watch(self, request, timeout: float):
        """``with coordinator.watch(request, timeout) as events``: the Watch stream's events
        until ``timeout`` seconds pass (then it just ends); cancelled on leaving."""
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


class PeerClients:
    """Node-service stubs of other agents, one cached channel per address."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, node_pb2_grpc.NodeStub]] = {}

    def _stub(self, address: str) -> node_pb2_grpc.NodeStub:
        with self._lock:
            entry = self._channels.get(address)
            if entry is None:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                entry = self._channels[address] = (channel, node_pb2_grpc.NodeStub(channel))
            return entry[1]

    def release_segment(self, address: str, name: str, segment_id: int, force: bool) -> bool:
        """Ask the agent at ``address`` to free segment ``segment_id``; True if freed at once."""
        request = node_pb2.ReleaseSegmentRequest(name=name, id=segment_id, force=force)
        try:
            return self._stub(address).ReleaseSegment(request, timeout=self.timeout).freed
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def segment_changed(self, address: str, name: str, segment_id: int) -> None:
        """Tell the home agent at ``address`` to re-read the record of ``segment_id``."""
        request = node_pb2.SegmentChangedRequest(name=name, id=segment_id)
        try:
            self._stub(address).SegmentChanged(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def open_bulk(self, address: str, name: str, segment_id: int) -> node_pb2.OpenBulkResponse:
        """Where the agent at ``address`` serves segment ``segment_id`` over the bulk channel."""
        request = node_pb2.OpenBulkRequest(name=name, id=segment_id)
        try:
            return self._stub(address).OpenBulk(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

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
        try:
            for chunk in self._stub(address).ReadPages(request, timeout=timeout):
                start = chunk.offset - offset
                end = start + len(chunk.data)
                if start != done or end > view.nbytes:
                    raise Unavailable(f"ReadPages of {name} from {address} sent bytes "
                                      f"[{chunk.offset}, {chunk.offset + len(chunk.data)}) "
                                      "out of order")
                view[start:end] = chunk.data
                done = end
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        if done != view.nbytes:
            raise Unavailable(f"ReadPages of {name} from {address} ended after {done} of "
                              f"{view.nbytes} bytes")

    def write_pages(self, address: str, header: node_pb2.WritePagesHeader, view: memoryview,
                    runs: list[tuple[int, int]], timeout: float) -> types_pb2.SegmentInfo:
        """Send the byte ``runs`` ((offset, length) of ``view``, each at most 2 MiB) to the
        home agent at ``address`` as one WritePages publish; the record at the new version."""
        def messages():
            yield node_pb2.WritePagesChunk(header=header)
            for offset, length in runs:
                with view[offset:offset + length] as part:
                    yield node_pb2.WritePagesChunk(offset=offset, data=part.tobytes())
        try:
            return self._stub(address).WritePages(messages(), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def chunk_hashes(self, address: str, name: str, segment_id: int, chunk_size: int
                     ) -> tuple[int, bytes]:
        """(version, chunk hashes) of segment ``segment_id`` held by the agent at ``address``."""
        request = node_pb2.ChunkHashesRequest(name=name, id=segment_id, chunk_size=chunk_size)
        try:
            response = self._stub(address).ChunkHashes(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return response.version, response.hashes

    def close(self) -> None:
        with self._lock:
            channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            channel.close()
