"""The client side of the local protocol: ``vas.connect()`` and ``Client``.

A ``Client`` is one SOCK_SEQPACKET connection to the node agent of this machine
(proto/vas/v1/local.proto over vas/core/wire.py). Every call validates its arguments
here first (so bad input fails fast with ``InvalidArgument``), then sends one
``LocalRequest`` and waits for the ``LocalResponse`` with the same id; a
non-zero status becomes the matching ``vas.VasError`` through vas.core.errors.

The agent learns who we are from the socket (SO_PEERCRED), and closing the
connection releases every attachment and writer lock it holds, so a process
that dies cleans up after itself.

Threads: ``_lock`` spans each request/response pair and is the only lock here.
A Client that has attached something runs one helper thread ("vas-client"),
holding only a weak reference to it between rounds, that sends the Detach of
attachments whose last buffer view went away (see vas/mapping.py: their
finalizers, which may run in any thread, even one inside a request, only put the
id on the ``_releases`` queue and nudge the helper) and a KeepAlive every
``keepalive_seconds`` while a "rw" attachment lives. Every request, and close(),
sends the queued Detaches first.
"""
from __future__ import annotations

import builtins
import collections.abc
import contextlib
import itertools
import logging
import math
import os
import queue
import threading
import time
import weakref
from typing import Iterator

from vas.core import validate, wire
from vas.core.defaults import DEFAULT_SOCKET
from vas.core.errors import InvalidArgument, Unavailable, VasError, from_status, status_code
from vas.core.fetch import probe_fault_support
from vas.core.types import NodeInfo, SegmentInfo, SpaceInfo
from vas.mapping import Mapping
from vas.proto import LOCAL_PROTOCOL, coordinator_pb2, local_pb2

#: Segments asked for per ListSegments page.
LIST_PAGE_SIZE = 500

_MAX_UINT32 = (1 << 32) - 1
#: Shortest interval between two KeepAlives, seconds (whatever the agent asks).
_MIN_KEEPALIVE_SECONDS = 0.05

log = logging.getLogger(__name__)


class Client:
    """A connection to the local vas agent. Use ``vas.connect()`` to make one.

    Thread-safe: one request is in flight at a time (a lock spans each
    request/response pair). A context manager: leaving the ``with`` block
    closes the connection, which releases the attachments it made (see ``close``).

    Attributes: ``socket_path`` (the agent's socket), ``local_node`` (the
    agent's ``NodeInfo`` as of connecting), ``uid``/``gid``/``pid`` (the
    identity the agent saw on the socket).
    """

    def __init__(self, node: str | None = None):
        path = node or os.environ.get("VAS_NODE") or DEFAULT_SOCKET
        self.socket_path = path
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._pid = os.getpid()
        # Attachment ids whose pages are unmapped but whose Detach is not sent yet
        # (queued by finalizers, see _release_later); sent before the next request.
        self._releases: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Wake-ups of the helper thread (a Detach queued, a writer attached, closed).
        self._nudges: queue.SimpleQueue[None] = queue.SimpleQueue()
        # "rw" attachments alive at the agent (mapped here, views included): while
        # there are any the helper sends a KeepAlive every _keepalive_seconds.
        self._writer_ids: set[int] = set()
        self._keepalive_seconds = math.inf
        self._mappings: weakref.WeakSet[Mapping] = weakref.WeakSet()
        self._helper: threading.Thread | None = None
        # A Client dropped without close(): its helper must not wait for it forever.
        weakref.finalize(self, self._nudges.put, None).atexit = False
        sock = wire.new_socket()
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise Unavailable(
                f"cannot reach the vas agent at {path}: {exc.strerror or exc} "
                "(is `vasctl node serve` running? set $VAS_NODE)") from exc
        self._sock = sock
        try:
            hello = self._call("hello", local_pb2.HelloRequest(protocol=LOCAL_PROTOCOL), "hello")
        except BaseException:
            self.close()
            raise
        self.local_node = NodeInfo.from_proto(hello.node)
        self.uid, self.gid, self.pid = hello.caller.uid, hello.caller.gid, hello.caller.pid

    # -- plumbing ---------------------------------------------------------------

    def _call(self, field: str, body, expect: str | tuple[str, ...] | None = None, *,
              want_fds: bool = False, send_fds=()):
        """Send one request with ``body`` in oneof ``field`` (and ``send_fds``); return the
        response body.

        With ``want_fds`` returns ``(body, fds)`` and the caller owns the fds.
        """
        with self._lock:
            self._check_open()
            self._flush_releases()
            response, fds = self._roundtrip(field, body, send_fds)
        try:
            if response.code != 0:
                raise from_status(status_code(response.code), response.message)
            kind = response.WhichOneof("body")
            wanted = (expect,) if isinstance(expect, str) else expect
            if wanted is not None and kind not in wanted:
                raise VasError(f"vas agent at {self.socket_path} answered {field} with "
                               f"{kind or 'nothing'} (a protocol mismatch?)")
            result = getattr(response, kind) if kind else None
        except BaseException:
            _close_fds(fds)
            raise
        if want_fds:
            return result, fds
        _close_fds(fds)
        return result

    def _roundtrip(self, field: str, body, send_fds=()):
        """One request/response exchange; the caller holds the lock."""
        request = local_pb2.LocalRequest(id=next(self._ids))
        getattr(request, field).CopyFrom(body)
        try:
            wire.send_message(self._sock, request, send_fds)
            response, fds = wire.recv_message(self._sock, local_pb2.LocalResponse)
        except OSError as exc:
            self._broken()
            raise Unavailable(f"lost the connection to the vas agent at {self.socket_path}: "
                              f"{exc.strerror or exc}") from exc
        if response is None:
            self._broken()
            raise Unavailable(f"the vas agent at {self.socket_path} closed the connection")
        if response.id != request.id:
            _close_fds(fds)
            self._broken()
            raise Unavailable(f"the vas agent at {self.socket_path} answered request "
                              f"{request.id} with id {response.id}; connection dropped")
        return response, fds

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"this connection to the vas agent at {self.socket_path} is closed")
        if os.getpid() != self._pid:
            raise Unavailable("this vas connection was made by another process (before a "
                              "fork); call vas.connect() again in this one")

    def _broken(self) -> None:
        """The socket is unusable: close it so every later call fails at once."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def _detach(self, attachment_id: int) -> None:
        """Release one attachment (used by Mapping.detach)."""
        self._writer_ids.discard(attachment_id)
        self._call("detach", local_pb2.DetachRequest(attachment_id=attachment_id),
                   ("detach", "empty", None))

    def _prefetch(self, attachment_id: int, offset: int, length: int) -> None:
        """Ask the agent to make [offset, offset + length) of an attachment present
        (used by Mapping.prefetch)."""
        self._call("prefetch", local_pb2.PrefetchRequest(
            attachment_id=attachment_id, offset=offset, length=length), "empty")

    def _register_faults(self, attachment_id: int, address: int, size: int, uffd: int) -> None:
        """Hand the userfaultfd of a lazy mapping to the agent (used by Mapping)."""
        self._call("register_faults", local_pb2.RegisterFaultsRequest(
            attachment_id=attachment_id, address=address, size=size), "empty", send_fds=[uffd])

    def _sync(self, attachment_id: int, ranges) -> local_pb2.LocalResponse:
        """Publish a "rw" attachment's writes (used by Mapping.sync); the new record."""
        return self._call("sync", local_pb2.SyncRequest(
            attachment_id=attachment_id,
            ranges=[local_pb2.ByteRange(offset=o, length=n) for o, n in ranges]), "segment")

    def _refresh(self, attachment_id: int):
        """Bring an attachment's copy to the newest version (used by Mapping.refresh)."""
        return self._call("refresh", local_pb2.RefreshRequest(attachment_id=attachment_id),
                          "segment")

    def _wait(self, attachment_id: int, version: int, timeout: float):
        """Block until a version above ``version`` is published (used by Mapping.wait)."""
        return self._call("wait", local_pb2.WaitRequest(
            attachment_id=attachment_id, version=version, timeout_seconds=timeout), "segment")

    def _start_helper(self) -> None:
        """Start the helper thread (module docstring) once: at the first attach, never
        from a finalizer (starting a thread takes locks and waits). It runs until the
        connection is closed or broken, or the Client is gone."""
        if self._helper is not None:
            return
        with self._lock:  # one helper even when threads attach at once
            if self._helper is None:
                self._helper = threading.Thread(
                    target=_helper_loop, args=(weakref.ref(self), self._nudges),
                    name="vas-client", daemon=True)
                self._helper.start()

    def _release_later(self, attachment_id: int) -> None:
        """Queue the Detach of an attachment whose pages were just unmapped.

        The finalizer of a mapping's native object (vas/mapping.py) calls this
        when its last view goes: in any thread, possibly one that holds
        ``_lock`` in the middle of a request. So it neither locks nor sends:
        ``SimpleQueue.put`` is safe there, and the helper thread (or the next
        request, or close) sends it.
        """
        self._releases.put(attachment_id)
        self._nudges.put(None)

    def _flush_releases(self) -> None:
        """Send the queued Detaches; the caller holds the lock."""
        while True:
            try:
                attachment_id = self._releases.get_nowait()
            except queue.Empty:
                return
            self._writer_ids.discard(attachment_id)
            response, fds = self._roundtrip(
                "detach", local_pb2.DetachRequest(attachment_id=attachment_id))
            _close_fds(fds)  # an error here only means it is gone already

    def _flush_releases_now(self) -> None:
        """Take the lock and send the queued Detaches (the helper thread)."""
        with self._lock:
            self._check_open()
            self._flush_releases()

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Close the connection: the agent then releases every attachment it made,
        with its writer lock, at once.

        Idempotent. Detaches already queued (mappings whose last view went) are
        sent first. Mappings still attached and views still alive stay mapped
        in this process (valid memory: never a crash), but no attachment holds
        their pages any more: the agent may free a deleted segment's pages (they
        then read as zeros), a lazy mapping's pages not touched yet read as
        zeros, and a writer's lock is gone. ``Mapping`` methods then raise
        ``Unavailable`` (or ``InvalidArgument`` once detached). Detach and drop
        views before closing to keep the bytes.
        """
        if self._closed:
            return
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(VasError, OSError):
                if os.getpid() == self._pid:
                    self._flush_releases()
            self._closed = True
            self._sock.close()
        self._writer_ids.clear()
        self._nudges.put(None)  # the helper thread ends
        for mapping in builtins.list(self._mappings):
            mapping._client_closed()

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran or the connection broke."""
        return self._closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"node={self.local_node.id!r}"
        return f"<vas.Client {self.socket_path} {state}>"

    # -- segments -----------------------------------------------------------------

    def create(self, name: str, size: int, *, mode: int = 0o600, replicas: int = 0,
               ttl: float | None = None, exist_ok: bool = False) -> SegmentInfo:
        """Create a segment homed on this client's node.

        :param name: 1-255 chars of ``[A-Za-z0-9._/-]``, no leading ``/``, no ``..``.
        :param size: bytes (> 0), rounded up to whole pages.
        :param mode: permission bits, like a file's (default 0o600).
        :param replicas: extra copies kept on other nodes (0 = none).
        :param ttl: seconds until the segment is removed (None = never).
        :param exist_ok: return the existing segment of that name instead of failing.
        :returns: the new segment's ``SegmentInfo`` (its cluster-unique ``address`` included).
        :raises InvalidArgument: bad name, size, mode, replicas or ttl.
        :raises AlreadyExists: the name is taken (and not ``exist_ok``).
        :raises CapacityExceeded: the node's --memory cannot hold it.
        :raises Unavailable: the agent or coordinator cannot be reached.

        Example::

            info = c.create("frames/0", 64 << 20, mode=0o640)
        """
        validate.check_name(name)
        size = validate.check_size(size)
        validate.check_mode(mode)
        replicas = _check_count(replicas, "replicas")
        ttl_seconds = _check_ttl(ttl)
        request = local_pb2.CreateRequest(name=name, size=size, mode=mode, replicas=replicas,
                                          ttl_seconds=ttl_seconds, exist_ok=bool(exist_ok))
        return SegmentInfo.from_proto(self._call("create", request, "segment"))

    def attach(self, name: str, mode: str = "r", *, fixed: bool = False,
               fetch: str = "lazy") -> Mapping:
        """Map a segment into this process.

        :param name: the segment.
        :param mode: ``"r"`` (read-only) or ``"rw"`` (takes the cluster-wide writer lock).
        :param fixed: map at the segment's own address (``info.address``), so
            pointers stored inside it are valid here; otherwise anywhere.
        :param fetch: ``"lazy"`` or ``"eager"`` (how a remote segment's pages arrive:
            lazy maps at once and fills pages on first touch; without userfaultfd,
            or with ``fixed=True``, the agent fetches the whole segment instead,
            logged and shown in ``Mapping.fetch``; see vas/core/fetch.py). A remote
            ``"rw"`` attach always fetches eagerly: sync() diffs every chunk.
        :returns: a ``Mapping`` (a context manager that detaches on exit; leaving
            the block by an exception never replaces that exception).
        :raises InvalidArgument: bad name, mode or fetch.
        :raises NotFound: no such segment (or it is being deleted).
        :raises PermissionDenied: the mode bits do not allow it.
        :raises Busy: ``"rw"`` while another attachment holds the writer lock.
        :raises AddressConflict: ``fixed=True`` and the range is already mapped here.
        :raises CapacityExceeded: no room for a remote segment's copy, or this uid
            holds the most attachments (or lazy mappings) the agent allows.

        Example::

            with c.attach("frames/0", "rw") as m:
                m.write(0, b"hello")
        """
        validate.check_name(name)
        validate.check_attach_mode(mode)
        validate.check_fetch(fetch)
        request = local_pb2.AttachRequest(name=name, mode=mode, fetch=fetch,
                                          fault_support=probe_fault_support(bool(fixed)))
        self._start_helper()
        response, fds = self._call("attach", request, "attach", want_fds=True)
        if len(fds) != 1:
            _close_fds(fds)
            self._release_quietly(response.attachment_id)
            raise VasError(f"vas agent sent {len(fds)} file descriptors for attach of {name}")
        try:
            mapping = Mapping(self, response, fds[0], mode, fixed=bool(fixed))
        except BaseException:
            self._release_quietly(response.attachment_id)
            raise
        finally:
            _close_fds(fds)  # the mapping keeps the pages; the fd is not needed after mmap
        self._mappings.add(mapping)
        if mode == "rw":
            self._keepalive_seconds = max(response.keepalive_seconds, _MIN_KEEPALIVE_SECONDS)
            self._writer_ids.add(mapping._attachment_id)
            self._nudges.put(None)  # the helper starts its keepalive rounds
        return mapping

    def _release_quietly(self, attachment_id: int) -> None:
        with contextlib.suppress(VasError):
            self._detach(attachment_id)

    def stat(self, name: str) -> SegmentInfo:
        """The segment's current ``SegmentInfo``.

        :raises InvalidArgument: bad name.
        :raises NotFound: no such segment.

        Example::

            print(c.stat("frames/0").version)
        """
        validate.check_name(name)
        return SegmentInfo.from_proto(
            self._call("stat", coordinator_pb2.GetSegmentRequest(name=name), "segment"))

    def list(self, prefix: str = "") -> builtins.list[SegmentInfo]:
        """Every segment whose name starts with ``prefix``, ordered by name.

        Follows the coordinator's pages until the end.

        Example::

            names = [s.name for s in c.list("frames/")]
        """
        if not isinstance(prefix, str):
            raise InvalidArgument(f"invalid prefix {prefix!r}: must be a string")
        segments: builtins.list[SegmentInfo] = []
        token = ""
        while True:
            page = self._call("list", coordinator_pb2.ListSegmentsRequest(
                prefix=prefix, page_size=LIST_PAGE_SIZE, page_token=token), "list")
            segments.extend(SegmentInfo.from_proto(s) for s in page.segments)
            token = page.next_page_token
            if not token:
                return segments

    def delete(self, name: str, *, force: bool = False) -> None:
        """Delete a segment (owner or root only).

        An attached segment turns ``"deleting"`` and is freed at its last detach;
        ``force=True`` revokes the attachments at once.

        :raises NotFound: no such segment.
        :raises PermissionDenied: not the owner or root.

        Example::

            c.delete("frames/0")
        """
        validate.check_name(name)
        self._call("delete", local_pb2.DeleteRequest(name=name, force=bool(force)))

    def chmod(self, name: str, mode: int) -> SegmentInfo | None:
        """Set a segment's permission bits (owner or root only).

        :returns: the updated ``SegmentInfo``.
        :raises InvalidArgument: bad name or mode.
        :raises NotFound: no such segment.
        :raises PermissionDenied: not the owner or root.

        Example::

            c.chmod("frames/0", 0o644)
        """
        validate.check_name(name)
        validate.check_mode(mode)
        return _segment_or_none(self._call("chmod", local_pb2.ChmodRequest(name=name, mode=mode)))

    def chown(self, name: str, uid: int, gid: int) -> SegmentInfo | None:
        """Set a segment's owner and group (owner or root only).

        :returns: the updated ``SegmentInfo``.
        :raises InvalidArgument: bad name, uid or gid.
        :raises NotFound: no such segment.
        :raises PermissionDenied: not the owner or root.

        Example::

            c.chown("frames/0", 1000, 1000)
        """
        validate.check_name(name)
        uid = _check_id(uid, "uid")
        gid = _check_id(gid, "gid")
        return _segment_or_none(
            self._call("chown", local_pb2.ChownRequest(name=name, uid=uid, gid=gid)))

    # -- spaces -------------------------------------------------------------------

    def _space(self, op: str, body, expect):
        request = local_pb2.LocalSpaceRequest()
        getattr(request, op).CopyFrom(body)
        return self._call("space", request, expect)

    def create_space(self, name: str, *, mode: int = 0o600) -> SpaceInfo:
        """Create an empty space (a named set of segments).

        :raises InvalidArgument: bad name or mode.
        :raises AlreadyExists: the name is taken.

        Example::

            c.create_space("model", mode=0o640)
        """
        validate.check_name(name, "space")
        validate.check_mode(mode)
        return SpaceInfo.from_proto(self._space(
            "create", coordinator_pb2.CreateSpaceRequest(name=name, mode=mode), "space_info"))

    def get_space(self, name: str) -> SpaceInfo:
        """One space's ``SpaceInfo`` (members in the order they were added).

        :raises NotFound: no such space.

        Example::

            members = c.get_space("model").members
        """
        validate.check_name(name, "space")
        return SpaceInfo.from_proto(
            self._space("get", coordinator_pb2.GetSpaceRequest(name=name), "space_info"))

    def space_add(self, space: str, segment: str, mode: str = "r") -> SpaceInfo:
        """Add a segment to a space, attached with ``mode`` when switching into it.

        :raises NotFound: no such space or segment.
        :raises AlreadyExists: the segment is a member already.
        :raises PermissionDenied: no write permission on the space.

        Example::

            c.space_add("model", "weights", "r")
        """
        validate.check_name(space, "space")
        validate.check_name(segment)
        validate.check_attach_mode(mode)
        return SpaceInfo.from_proto(self._space("add", coordinator_pb2.SpaceAddRequest(
            space=space, segment=segment, mode=mode), "space_info"))

    def space_remove(self, space: str, segment: str) -> SpaceInfo:
        """Remove a member from a space (the segment itself is untouched).

        :raises NotFound: no such space, or the segment is not a member.

        Example::

            c.space_remove("model", "weights")
        """
        validate.check_name(space, "space")
        validate.check_name(segment)
        return SpaceInfo.from_proto(self._space("remove", coordinator_pb2.SpaceRemoveRequest(
            space=space, segment=segment), "space_info"))

    def list_spaces(self, prefix: str = "") -> builtins.list[SpaceInfo]:
        """Every space whose name starts with ``prefix``, ordered by name.

        Example::

            names = [s.name for s in c.list_spaces()]
        """
        if not isinstance(prefix, str):
            raise InvalidArgument(f"invalid prefix {prefix!r}: must be a string")
        response = self._space("list", coordinator_pb2.ListSpacesRequest(prefix=prefix), "spaces")
        return [SpaceInfo.from_proto(s) for s in response.spaces]

    def delete_space(self, name: str) -> None:
        """Delete a space (owner or root only); its member segments are untouched.

        :raises NotFound: no such space.
        :raises PermissionDenied: not the owner or root.

        Example::

            c.delete_space("model")
        """
        validate.check_name(name, "space")
        self._space("delete", coordinator_pb2.DeleteSpaceRequest(name=name), None)

    @contextlib.contextmanager
    def switch(self, space: str) -> Iterator["SpaceView"]:
        """Attach every member of ``space`` at its own fixed address, for a ``with`` block.

        Each member is attached with the mode it was added with. If one attach
        fails, the ones already made are detached and the error is raised. On
        exit every member is detached.

        :yields: a ``SpaceView``: ``view[segment_name]`` is that member's ``Mapping``.
            Leaving the block by an exception never replaces that exception.
        :raises NotFound: no such space, or a member segment is gone.
        :raises AddressConflict: a member's range is already mapped in this process.
        :raises PermissionDenied, Busy: as for ``attach``.

        Example::

            with c.switch("model") as view:
                head = view["nodes"].read(0, 64)
        """
        info = self.get_space(space)
        mappings: dict[str, Mapping] = {}
        try:
            for segment, mode in info.members.items():
                mappings[segment] = self.attach(segment, mode, fixed=True)
        except BaseException:
            for mapping in reversed(builtins.list(mappings.values())):
                with contextlib.suppress(VasError):
                    mapping.detach()
            raise
        view = SpaceView(info, mappings)
        try:
            yield view
        except BaseException as exc:
            view._detach_all(exc)
            raise
        view._detach_all()

    # -- cluster ------------------------------------------------------------------

    def nodes(self) -> builtins.list[NodeInfo]:
        """Every live node agent, ordered by id.

        Example::

            sockets = {n.id: n.socket for n in c.nodes()}
        """
        response = self._call("nodes", coordinator_pb2.ListNodesRequest(), "nodes")
        return [NodeInfo.from_proto(n) for n in response.nodes]

    def status(self) -> dict:
        """A summary of the cluster for operators (what ``vasctl status`` prints).

        :returns: a dict with ``etcd`` (endpoint), ``revision``, ``nodes``
            (list of ``NodeInfo``), ``segments`` (count), ``segment_bytes``,
            ``spaces`` (count), ``local_node`` (this agent's id).

        Example::

            print(c.status()["segments"])
        """
        response = self._call("status", coordinator_pb2.ClusterStatusRequest(), "status")
        return {
            "etcd": response.etcd, "revision": response.revision,
            "nodes": [NodeInfo.from_proto(n) for n in response.nodes],
            "segments": response.segments, "segment_bytes": response.segment_bytes,
            "spaces": response.spaces, "local_node": self.local_node.id,
        }


class SpaceView(collections.abc.Mapping):
    """The members of a space while switched into it: ``view[name]`` is a ``Mapping``.

    Iterates over segment names in the order they were added; ``view.info`` is
    the ``SpaceInfo`` read when switching.
    """

    def __init__(self, info: SpaceInfo, mappings: dict[str, Mapping]):
        self.info = info
        self._mappings = mappings

    def __getitem__(self, name: str) -> Mapping:
        try:
            return self._mappings[name]
        except KeyError:
            raise KeyError(f"segment {name!r} is not a member of space {self.info.name!r}") from None

    def __iter__(self):
        return iter(self._mappings)

    def __len__(self) -> int:
        return len(self._mappings)

    def __repr__(self) -> str:
        return f"<vas.SpaceView {self.info.name} {builtins.list(self._mappings)}>"

    def _detach_all(self, leaving: BaseException | None = None) -> None:
        """Detach every member; raise the first error, or, when the block is left by
        ``leaving``, add the errors to it as notes (never replacing it)."""
        first: BaseException | None = None
        for mapping in reversed(builtins.list(self._mappings.values())):
            try:
                mapping.detach()
            except VasError as exc:
                if leaving is not None:
                    leaving.add_note(f"and detaching segment {mapping.name} failed: {exc!r}")
                first = first or exc
        if first is not None and leaving is None:
            raise first


def _helper_loop(client_ref, nudges: queue.SimpleQueue) -> None:
    """Body of a Client's helper thread (module docstring): send queued Detaches when
    nudged, a KeepAlive when one is due; end when the Client is closed or gone.
    Holds the Client only while working, never while waiting."""
    keepalive_due = math.inf
    while True:
        client = client_ref()
        if client is None or client.closed:
            return
        now = time.monotonic()
        if not client._writer_ids:
            keepalive_due = math.inf
        elif keepalive_due == math.inf:
            keepalive_due = now + client._keepalive_seconds
        del client
        try:
            nudges.get(timeout=None if keepalive_due == math.inf else max(0.0, keepalive_due - now))
            keepalive = False
        except queue.Empty:
            keepalive = True
        client = client_ref()
        if client is None or client.closed:
            return
        try:
            if keepalive:  # any request proves us alive; it also sends queued Detaches
                keepalive_due = math.inf
                client._call("keepalive", local_pb2.KeepAliveRequest(), "empty")
            else:
                client._flush_releases_now()
        except VasError as exc:
            if client.closed:
                return  # the connection is gone: the agent released everything already
            log.warning("vas agent at %s refused a request of the client's helper "
                        "thread: %s", client.socket_path, exc)
        del client


def connect(node: str | None = None) -> Client:
    """Connect to the vas agent of this machine.

    :param node: the agent's Unix socket path; default ``$VAS_NODE``, else
        ``/run/vas/node.sock``.
    :returns: a ``Client`` (a context manager; ``close()`` is idempotent).
    :raises Unavailable: nothing listens on that socket.
    :raises CapacityExceeded: this uid holds the most connections the agent allows
        (``vasctl node serve --max-connections-per-uid``).

    Example::

        with vas.connect() as c:
            print([s.name for s in c.list()])
    """
    return Client(node)


def _close_fds(fds) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _segment_or_none(body) -> SegmentInfo | None:
    from vas.proto import types_pb2

    return SegmentInfo.from_proto(body) if isinstance(body, types_pb2.SegmentInfo) else None


def _check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_UINT32:
        raise InvalidArgument(f"invalid {what} {value!r}: must be an integer >= 0")
    return value


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_UINT32:
        raise InvalidArgument(f"invalid {what} {value!r}: must be an integer 0..{_MAX_UINT32 - 1}")
    return value


def _check_ttl(ttl: object) -> float:
    if ttl is None:
        return 0.0
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
        raise InvalidArgument(f"invalid ttl {ttl!r}: must be a number of seconds > 0, or None")
    return float(ttl)


# -- the default connection of the module-level shortcuts ------------------------

_default_lock = threading.Lock()
_default_client: Client | None = None


def _default() -> Client:
    """The shared connection of vas.create/attach/...: made on first use, and again
    after it broke or after a fork (a connection must not be shared across processes)."""
    global _default_client
    with _default_lock:
        client = _default_client
        if client is None or client.closed or client._pid != os.getpid():
            _default_client = client = Client()
        return client


def create(name: str, size: int, *, mode: int = 0o600, replicas: int = 0,
           ttl: float | None = None, exist_ok: bool = False) -> SegmentInfo:
    """``Client.create`` on the default connection. Example: ``vas.create("x", 4096)``."""
    return _default().create(name, size, mode=mode, replicas=replicas, ttl=ttl, exist_ok=exist_ok)


def attach(name: str, mode: str = "r", *, fixed: bool = False, fetch: str = "lazy") -> Mapping:
    """``Client.attach`` on the default connection. Example: ``m = vas.attach("x")``."""
    return _default().attach(name, mode, fixed=fixed, fetch=fetch)


def stat(name: str) -> SegmentInfo:
    """``Client.stat`` on the default connection. Example: ``vas.stat("x").size``."""
    return _default().stat(name)


def list(prefix: str = "") -> builtins.list[SegmentInfo]:  # noqa: A001  (SPEC name)
    """``Client.list`` on the default connection. Example: ``vas.list("frames/")``."""
    return _default().list(prefix)


def delete(name: str, *, force: bool = False) -> None:
    """``Client.delete`` on the default connection. Example: ``vas.delete("x")``."""
    return _default().delete(name, force=force)
