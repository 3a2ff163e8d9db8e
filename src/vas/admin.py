"""``AdminClient``: operate a cluster straight over gRPC, from a machine with no agent.

``vasctl --coordinator HOST:PORT ...`` (vas/cli/backend.py) runs on it. Metadata calls
go to the Coordinator service; ``read``/``write`` stream a segment's bytes from/to
its *home* agent (Node.ReadPages, Node.WritePages), which the coordinator's record
names. Methods have the names, arguments and return types of ``vas.Client``'s
(``stat``, ``list``, ``delete``, ``chmod``, ..., ``nodes``, ``remove_node``, ``status``), so the CLI
prints the same shapes whichever served it; every failed call becomes the
``VasError`` of its status (vas.core.errors), with its message.

Who the requests act as:

- with TLS (``tls``: the admin's certificate, key and CA): whoever the certificate
  names (``vas://user/UID/GID``, vas.core.identity); servers ignore any Caller sent,
  and the home checks the record's mode bits on every page read and write.
- without TLS: only against loopback addresses (``check_plaintext``), the rule the
  daemons follow for plaintext ports (vas.core.tls.check_listen). The requests carry
  this process's uid/gid/pid, as an agent's do for its local callers, and are
  believed as the machine is trusted. A home believes a plaintext page read, so
  ``read`` first checks the mode bits for this uid/gid itself, as an agent would.
  The Caller names no node: no agent vouches for it, and a delete made so is
  announced by the coordinator (to the home and the nodes holding copies).

A write takes the segment's writer lock (Coordinator.AcquireWriter: Busy while
another writer holds it), renews it while the bytes stream, and releases it at the
end; the home publishes the bytes as one new version only if the lock still holds
(Fenced otherwise). Every call has a deadline; streams get one that grows with
their size (``MIN_RATE``).

Example::

    with AdminClient("127.0.0.1:7300") as admin:
        print([s.name for s in admin.list()])
        data = b"".join(admin.read("frames/0"))
"""
from __future__ import annotations

import builtins
import os
import threading
import time
from typing import Iterable, Iterator

import grpc

from vas.core import validate
from vas.core.access import may_attach
from vas.core.defaults import MAX_GRPC_MESSAGE
from vas.core.errors import (InvalidArgument, PermissionDenied, Unavailable, VasError,
                             from_rpc_error, segment_lost)
from vas.core.repeat import call_once_more, method_name
from vas.core.sizes import human_size
from vas.core.tls import COORDINATOR_HOST, NODE_HOST, TlsConfig, is_loopback, open_channel
from vas.core.types import NodeInfo, SegmentInfo, SpaceInfo, cluster_status
from vas.proto import coordinator_pb2 as pb
from vas.proto import coordinator_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

#: Deadline of one unary call, seconds.
DEFAULT_TIMEOUT = 10.0
#: Seconds to wait for the coordinator's channel to connect (TLS handshake included).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Slowest transfer a stream's deadline allows, bytes per second: a stream of N bytes
#: gets ``timeout + N / MIN_RATE`` seconds.
MIN_RATE = 8 << 20
#: Bytes per WritePages message (the home's ReadPages sends the same): a message stays
#: under gRPC's default 4 MiB limit.
CHUNK = 2 << 20
#: Segments asked for per ListSegments page.
LIST_PAGE_SIZE = 500

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
                    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE)]


def target_hosts(target: str) -> list[str]:
    """The hosts of a gRPC target: "host:port", "[::1]:port" or "ipv4:a:1,b:2".

    >>> target_hosts("ipv4:127.0.0.1:7300,127.0.0.2:7300")
    ['127.0.0.1', '127.0.0.2']
    """
    scheme, sep, rest = target.partition(":")
    addresses = rest.split(",") if sep and scheme in ("ipv4", "ipv6", "dns") else [target]
    return [address.rpartition(":")[0] or address for address in addresses]


def check_plaintext(target: str, tls: TlsConfig | None, what: str) -> None:
    """InvalidArgument when ``target`` is not loopback and there is no TLS: only a
    loopback-bound cluster believes the uid/gid a plaintext request claims."""
    if tls is None and not all(is_loopback(host) for host in target_hosts(target)):
        raise InvalidArgument(
            f"refusing to reach {what} at {target} without TLS: only a loopback-bound "
            "cluster may be operated in the clear; give --tls-cert/--tls-key/--tls-ca "
            "($VAS_TLS_*)")


class AdminClient:
    """A client of a cluster's coordinator (and of its agents' Node services).

    :param target: the coordinator's gRPC address, "host:port" (or "ipv4:a,b").
    :param tls: the admin's certificate, key and CA; None for plaintext (loopback only).
    :param timeout: deadline of each unary call, seconds.
    :param connect_timeout: seconds to wait for the coordinator at construction.
    :raises InvalidArgument: plaintext to a non-loopback address.
    :raises Unavailable: the coordinator does not answer within ``connect_timeout``.

    Not a vas.Client: it attaches nothing (no agent here), so ``create`` and
    ``attach`` are not offered. Thread-safe (gRPC stubs are). A context manager.
    """

    def __init__(self, target: str, tls: TlsConfig | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
        check_plaintext(target, tls, "the coordinator")
        self.target = target
        self.tls = tls
        self.timeout = timeout
        # Without TLS the servers believe the Caller: this process's identity, as an
        # agent reports its local callers (SO_PEERCRED), without a node. With TLS the
        # certificate's uid/gid replace whatever is sent.
        self.caller = (types_pb2.Caller() if tls else
                       types_pb2.Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()))
        self._lock = threading.Lock()
        self._nodes: dict[str, tuple[grpc.Channel, node_pb2_grpc.NodeStub]] = {}
        self._channel = open_channel(target, tls, COORDINATOR_HOST, _CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise Unavailable(
                f"cannot reach the vas coordinator at {target} within {connect_timeout:g} s"
                + (" (or its TLS handshake failed: check --tls-ca)" if tls else "")
                + " (is `vasctl coordinator serve` running? set --coordinator or "
                  "$VAS_COORDINATOR)") from None
        self._coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Close every channel. Idempotent."""
        with self._lock:
            nodes, self._nodes = self._nodes, {}
        for channel, _ in nodes.values():
            channel.close()
        self._channel.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vas.AdminClient {self.target} {'tls' if self.tls else 'plaintext'}>"

    def _call(self, rpc, request, timeout: float | None = None):
        """One coordinator call, made once more when its connection failed under it and
        that is safe (vas/core/repeat.py): with several coordinators in ``target`` the
        second goes to another."""
        def attempt(left: float):
            try:
                return rpc(request, timeout=left)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc

        return call_once_more(attempt, method_name(rpc), timeout or self.timeout)

    # -- segments -----------------------------------------------------------------

    def stat(self, name: str) -> SegmentInfo:
        """The segment's current ``SegmentInfo``. Raises NotFound, InvalidArgument."""
        return SegmentInfo.from_proto(self._get(name))

    def _get(self, name: str) -> types_pb2.SegmentInfo:
        validate.check_name(name)
        return self._call(self._coordinator.GetSegment, pb.GetSegmentRequest(name=name))

    def list(self, prefix: str = "") -> builtins.list[SegmentInfo]:
        """Every segment whose name starts with ``prefix``, ordered by name (all pages)."""
        if not isinstance(prefix, str):
            raise InvalidArgument(f"invalid prefix {prefix!r}: must be a string")
        segments: builtins.list[SegmentInfo] = []
        token = ""
        while True:
            page = self._call(self._coordinator.ListSegments, pb.ListSegmentsRequest(
                prefix=prefix, page_size=LIST_PAGE_SIZE, page_token=token))
            segments.extend(SegmentInfo.from_proto(s) for s in page.segments)
            token = page.next_page_token
            if not token:
                return segments

    def delete(self, name: str, *, force: bool = False) -> None:
        """Delete a segment (owner or root). The coordinator marks it deleting and tells
        its home, which frees it at once when unattached or with ``force``, else at its
        last detach (the reply does not wait for that). Raises NotFound, PermissionDenied."""
        validate.check_name(name)
        self._call(self._coordinator.DeleteSegment, pb.DeleteSegmentRequest(
            caller=self.caller, name=name, force=bool(force)))

    def chmod(self, name: str, mode: int) -> SegmentInfo:
        """Set a segment's permission bits (owner or root); the updated record."""
        validate.check_name(name)
        validate.check_mode(mode)
        return SegmentInfo.from_proto(self._call(self._coordinator.SetSegmentMode,
                                                 pb.SetSegmentModeRequest(
                                                     caller=self.caller, name=name, mode=mode)))

    def chown(self, name: str, uid: int, gid: int) -> SegmentInfo:
        """Set a segment's owner and group (owner or root); the updated record."""
        validate.check_name(name)
        return SegmentInfo.from_proto(self._call(self._coordinator.SetSegmentOwner,
                                                 pb.SetSegmentOwnerRequest(
                                                     caller=self.caller, name=name, uid=uid,
                                                     gid=gid)))

    # -- pages --------------------------------------------------------------------

    def read(self, name: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Stream bytes [offset, offset + length) of segment ``name`` from its home, in
        pieces of at most 2 MiB, in order (``length`` None: to the end).

        The pieces are one version: the one the home held when the stream started.
        The record is read (and the range and permission checked) before this returns.

        :raises NotFound: no such segment, or its home no longer holds it.
        :raises InvalidArgument: the range is outside the segment.
        :raises PermissionDenied: no read permission.
        :raises Unavailable: the home node is down or too slow.

        Example::

            with open("out.bin", "wb") as out:
                for piece in admin.read("frames/0"):
                    out.write(piece)
        """
        record = self._get(name)
        length = record.size - offset if length is None else length
        check_range(name, offset, length, record.size)
        if self.tls is None and not may_attach(record, self.caller.uid, self.caller.gid, "r"):
            raise PermissionDenied(
                f"permission denied: uid {self.caller.uid} gid {self.caller.gid} may not "
                f"read segment {name} (mode 0o{record.mode:03o}, owner "
                f"{record.uid}:{record.gid})")
        # The home is found now too, so a caller learns of a down home before it made
        # anything (an output file) to take the bytes.
        return self._read_stream(self._home(record), record, offset, length)

    def _read_stream(self, stub: node_pb2_grpc.NodeStub, record: types_pb2.SegmentInfo,
                     offset: int, length: int) -> Iterator[bytes]:
        if length == 0:
            return
        stream = stub.ReadPages(
            node_pb2.ReadPagesRequest(name=record.name, id=record.id, offset=offset,
                                      length=length),
            timeout=self.timeout + length / MIN_RATE)
        position, end = offset, offset + length
        try:
            for chunk in stream:
                if chunk.offset != position or position + len(chunk.data) > end:
                    raise Unavailable(f"node {record.home} sent bytes at {chunk.offset} of "
                                      f"segment {record.name} where {position} was due")
                position += len(chunk.data)
                yield chunk.data
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            stream.cancel()  # a no-op once the stream ended; ends it if the reader stopped
        if position != end:
            raise Unavailable(f"node {record.home} ended segment {record.name}'s bytes at "
                              f"{position} of [{offset}, {end})")

    def write(self, name: str, pieces: Iterable[bytes], offset: int = 0, *,
              ttl: int = 0) -> SegmentInfo:
        """Write ``pieces`` (bytes-like, in order) into segment ``name`` from ``offset`` on
        and publish them at its home as one new version; the record at that version.

        Takes the writer lock for the duration (renewed every third of its ``ttl``,
        0 = the coordinator's default) and releases it at the end. The home keeps
        the bytes aside until the stream ends and copies them into the segment
        only if the lock still holds. An exception raised by ``pieces`` ends the
        write without publishing anything and is re-raised.

        :raises InvalidArgument: the bytes go past the segment's end.
        :raises Busy: another writer holds the lock.
        :raises PermissionDenied: no read and write permission.
        :raises Fenced: the lock was lost (lease lapsed) before the publish.
        :raises NotFound, Unavailable: as for ``read``.

        Example::

            admin.write("frames/0", [b"header", payload], offset=4096)
        """
        validate.check_name(name)
        lock = self._call(self._coordinator.AcquireWriter, pb.AcquireWriterRequest(
            caller=self.caller, name=name, ttl_seconds=ttl))
        renewer = _Renewer(self, name, lock)
        try:
            record = self._get(name)
            check_range(name, offset, 0, record.size)
            stub = self._home(record)
            header = node_pb2.WritePagesHeader(caller=self.caller, name=name, id=record.id,
                                               token=lock.token, lease_id=lock.lease_id,
                                               end_marked=True)
            feed = _Feed(record, offset, pieces, header, renewer)
            renewer.start()
            published = self._await_publish(feed.start(stub.WritePages), feed, renewer)
            return SegmentInfo.from_proto(published)
        finally:
            renewer.stop()
            try:
                self._call(self._coordinator.ReleaseWriter, pb.ReleaseWriterRequest(
                    name=name, token=lock.token, lease_id=lock.lease_id))
            except VasError:
                pass  # the lease ends on its own within its ttl

    def _await_publish(self, future: grpc.Future, feed: "_Feed", renewer: "_Renewer"):
        """The WritePages reply. No deadline while ``pieces`` still feeds the stream: the
        bytes come as fast as the caller gives them (a pipe may be slow), and the lock
        stays renewed meanwhile. Once all is sent, the home has ``timeout`` plus the
        bytes' time at MIN_RATE to publish them and answer."""
        try:
            while True:
                try:
                    return future.result(timeout=0.2)
                except grpc.FutureTimeoutError:
                    limit = self.timeout + feed.sent / MIN_RATE
                    if feed.sent_at is not None and time.monotonic() > feed.sent_at + limit:
                        raise Unavailable(f"node {feed.record.home} did not publish segment "
                                          f"{feed.record.name} within {limit:.0f} s") from None
                except grpc.FutureCancelledError:
                    feed.reraise()
                    renewer.reraise()
                    raise Unavailable(f"the write of segment {feed.record.name} was "
                                      "cancelled") from None
                except grpc.RpcError as exc:
                    feed.reraise()
                    renewer.reraise()
                    raise from_rpc_error(exc) from exc
        except BaseException:
            future.cancel()  # a no-op once it ended; else the home publishes nothing
            raise

    # -- spaces -------------------------------------------------------------------

    def create_space(self, name: str, *, mode: int = 0o600) -> SpaceInfo:
        validate.check_name(name, "space")
        validate.check_mode(mode)
        return SpaceInfo.from_proto(self._call(self._coordinator.CreateSpace,
                                               pb.CreateSpaceRequest(caller=self.caller,
                                                                     name=name, mode=mode)))

    def get_space(self, name: str) -> SpaceInfo:
        validate.check_name(name, "space")
        return SpaceInfo.from_proto(self._call(self._coordinator.GetSpace,
                                               pb.GetSpaceRequest(name=name)))

    def space_add(self, space: str, segment: str, mode: str = "r") -> SpaceInfo:
        validate.check_name(space, "space")
        validate.check_name(segment)
        validate.check_attach_mode(mode)
        return SpaceInfo.from_proto(self._call(self._coordinator.SpaceAdd, pb.SpaceAddRequest(
            caller=self.caller, space=space, segment=segment, mode=mode)))

    def space_remove(self, space: str, segment: str) -> SpaceInfo:
        validate.check_name(space, "space")
        validate.check_name(segment)
        return SpaceInfo.from_proto(self._call(self._coordinator.SpaceRemove,
                                               pb.SpaceRemoveRequest(caller=self.caller,
                                                                     space=space,
                                                                     segment=segment)))

    def list_spaces(self, prefix: str = "") -> builtins.list[SpaceInfo]:
        if not isinstance(prefix, str):
            raise InvalidArgument(f"invalid prefix {prefix!r}: must be a string")
        response = self._call(self._coordinator.ListSpaces, pb.ListSpacesRequest(prefix=prefix))
        return [SpaceInfo.from_proto(s) for s in response.spaces]

    def delete_space(self, name: str) -> None:
        validate.check_name(name, "space")
        self._call(self._coordinator.DeleteSpace,
                   pb.DeleteSpaceRequest(caller=self.caller, name=name))

    # -- cluster ------------------------------------------------------------------

    def nodes(self, *, include_down: bool = False) -> builtins.list[NodeInfo]:
        """Every live node agent, ordered by id (``include_down``: also the down ones)."""
        response = self._call(self._coordinator.ListNodes,
                              pb.ListNodesRequest(include_down=include_down))
        return [NodeInfo.from_proto(n) for n in response.nodes]

    def remove_node(self, node_id: str, *, force: bool = False) -> NodeInfo:
        """Forget node ``node_id`` (root only; ``force``: even a live one), as
        ``vas.Client.remove_node``; the node as it was listed."""
        response = self._call(self._coordinator.RemoveNode, pb.RemoveNodeRequest(
            caller=self.caller, node_id=node_id, force=force))
        return NodeInfo.from_proto(response.node)

    def status(self) -> dict:
        """The cluster summary of ``vas.Client.status``; ``local_node`` is None (no agent)."""
        return cluster_status(self._call(self._coordinator.ClusterStatus,
                                         pb.ClusterStatusRequest()), local_node=None)

    # -- the homes ----------------------------------------------------------------

    def _home(self, record: types_pb2.SegmentInfo) -> node_pb2_grpc.NodeStub:
        """The Node stub of the home of ``record``: Unavailable if the home is not
        registered, NotFound if it is but the record is lost (it restarted without it)."""
        address = next((n.address for n in self._call(
            self._coordinator.ListNodes, pb.ListNodesRequest()).nodes if n.id == record.home),
            None)
        if address is None:
            raise Unavailable(f"home node {record.home} of segment {record.name} is not "
                              "registered (down?)")
        if record.state == types_pb2.SEGMENT_STATE_LOST:
            raise segment_lost(record.name, record.home)
        check_plaintext(address, self.tls, f"node {record.home}")
        with self._lock:
            entry = self._nodes.get(address)
            if entry is None:
                channel = open_channel(address, self.tls, NODE_HOST, _CHANNEL_OPTIONS)
                entry = self._nodes[address] = (channel, node_pb2_grpc.NodeStub(channel))
            return entry[1]


def check_range(name: str, offset: int, length: int, size: int) -> None:
    """InvalidArgument unless [offset, offset + length) lies inside segment ``name``."""
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidArgument(f"range [{offset}, {offset + max(length, 0)}) is outside "
                              f"segment {name} of {human_size(size)}")


class _Feed:
    """The WritePages messages of one write: the header (``end_marked``), then ``pieces``
    re-cut into CHUNK-sized messages at their offsets, then the message marked last.

    An exception of the pieces (or of the bounds check, or of the lock's renewal) is
    kept and the call cancelled before the last mark, so the home publishes nothing;
    ``reraise`` then raises it in place of the CANCELLED status. (Raised inside the
    request iterator it would also cancel the call, but gRPC logs a traceback for it.)"""

    def __init__(self, record, offset: int, pieces: Iterable[bytes], header, renewer):
        self.record = record
        self.offset = offset
        self.pieces = pieces
        self.header = header
        self.renewer = renewer
        self.error: BaseException | None = None
        #: Bytes sent so far, and when the last one was (monotonic; None until then).
        self.sent = 0
        self.sent_at: float | None = None
        self._future: grpc.Future | None = None
        self._started = threading.Event()

    def start(self, rpc) -> grpc.Future:
        """Start the stream on ``rpc`` (a stream-unary multicallable); its future."""
        self._future = rpc.future(self._messages())
        self._started.set()
        return self._future

    def _messages(self) -> Iterator[node_pb2.WritePagesChunk]:
        yield node_pb2.WritePagesChunk(header=self.header, offset=self.offset)
        position, size = self.offset, self.record.size
        try:
            for piece in self.pieces:
                self.renewer.reraise()
                view = memoryview(piece).cast("B")
                if position + len(view) > size:
                    raise InvalidArgument(
                        f"the data does not fit in segment {self.record.name} of "
                        f"{human_size(size)} at offset {self.offset}")
                for start in range(0, len(view), CHUNK):
                    part = view[start:start + CHUNK]
                    yield node_pb2.WritePagesChunk(offset=position, data=bytes(part))
                    position += len(part)
                    self.sent = position - self.offset
        except Exception as exc:  # noqa: BLE001  (kept for reraise; the call is cancelled)
            # Whether the home sees the cancel or an end of stream, the end is not
            # marked: it publishes nothing.
            self.error = exc
            # The first messages may go before start() has returned the future.
            if not self._started.wait(DEFAULT_TIMEOUT):
                raise  # cannot happen; gRPC then cancels the call itself
            self._future.cancel()
            return
        self.sent_at = time.monotonic()
        yield node_pb2.WritePagesChunk(last=True)

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


class _Renewer:
    """Renews a writer lock's lease every third of its ttl in a thread, while a write
    streams; the first failure (Fenced: the lock is lost) is kept for ``reraise``."""

    def __init__(self, admin: AdminClient, name: str, lock: pb.AcquireWriterResponse):
        self.admin = admin
        self.name = name
        self.lock = lock
        self.error: VasError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vas-admin-renew", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        interval = max(self.lock.ttl_seconds, 1) / 3
        while not self._stop.wait(interval):
            try:
                self.admin._call(self.admin._coordinator.RenewWriter, pb.RenewWriterRequest(
                    name=self.name, token=self.lock.token, lease_id=self.lock.lease_id),
                    timeout=interval)
            except VasError as exc:
                self.error = exc
                return

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(self.admin.timeout)
