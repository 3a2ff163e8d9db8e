"""The public client API: ``vas.connect()``, ``Client``, ``SpaceView`` and the
module-level shortcuts (``vas.create``, ``vas.attach``, ...).

A ``Client`` holds one ``Connection`` (vas/connection.py: the SOCK_SEQPACKET socket
to the node agent of this machine, its lock, the helper thread and the queued
Detaches), as the agent's node/localapi.py sits over node/local.py. Every call
validates its arguments here first (so bad input fails fast with
``InvalidArgument``), then sends one request over the connection; a non-zero
status comes back as the matching ``vas.VasError``. ``attach`` maps the segment
into a ``Mapping`` (vas/mapping.py) that talks to the same connection.

Closing the client closes its connection, and the agent then releases every
attachment and writer lock it made, so a process that dies cleans up after itself.
Threads: see vas/connection.py (one request at a time; a mapping's finalizer only
queues its Detach).
"""
from __future__ import annotations

import builtins
import contextlib
import os
import threading

from vas import datasets
from vas.connection import Connection, close_fds
from vas.core import validate
from vas.core.defaults import DEFAULT_SOCKET, ray_node_socket
from vas.core.errors import InvalidArgument, VasError
from vas.core.fetch import probe_fault_support, write_protect_available
from vas.core.types import NodeInfo, SegmentInfo, SpaceInfo, cluster_status
from vas.mapping import Mapping
from vas.spaceview import KeptMembers, Switch
from vas.proto import coordinator_pb2, local_pb2

#: Segments asked for per ListSegments page.
LIST_PAGE_SIZE = 500

_MAX_UINT32 = (1 << 32) - 1


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
        path = node or os.environ.get("VAS_NODE") or ray_node_socket() or DEFAULT_SOCKET
        self.socket_path = path
        connection = self._connection = Connection(path)
        # The "r" members of spaces switched out of, for the next switch (vas/spaceview.py).
        self._kept = KeptMembers()
        self.local_node = connection.local_node
        self.uid, self.gid, self.pid = connection.uid, connection.gid, connection.pid

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Close the connection: the agent then releases every attachment it made,
        with its writer lock, at once.

        Idempotent. The members a ``switch`` kept mapped are let go, and Detaches
        already queued (mappings whose last view went) are sent, first. Mappings
        still attached and views still alive stay mapped
        in this process (valid memory), but no attachment holds their pages any
        more: the agent may free a deleted segment's pages (they then read as
        zeros), a touch of a lazy mapping's page not fetched yet raises SIGBUS
        (never zeros in place of the home's bytes), and a writer's lock is gone.
        A ``"rw"`` mapping of a segment homed on this node is write-protected
        before that lock goes: a store into it ends the process with SIGBUS
        (``Mapping.write`` raises ``Fenced`` instead). ``Mapping`` methods then
        raise ``Unavailable`` (or ``InvalidArgument`` once detached). Detach and
        drop views before closing to keep the bytes.
        """
        self._kept.release_all()
        self._connection.close()

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran or the connection broke."""
        return self._connection.closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"node={self.local_node.id!r}"
        return f"<vas.Client {self.socket_path} {state}>"

    # -- segments -----------------------------------------------------------------

    def create(self, name: str, size: int, *, mode: int = 0o600, replicas: int = 0,
               ttl: float | None = None, exist_ok: bool = False,
               meta: dict[str, str] | None = None) -> SegmentInfo:
        """Create a segment homed on this client's node.

        :param name: 1-255 chars of ``[A-Za-z0-9._/-]``, no leading ``/``, no ``..``.
        :param size: bytes (> 0), rounded up to whole pages.
        :param mode: permission bits, like a file's (default 0o600).
        :param replicas: backups kept on that many other nodes (0-16; 0 = none):
            ``sync()`` returns once they hold the new version, and one becomes the
            home if the home's agent dies.
        :param ttl: seconds until the segment is removed (None = never).
        :param exist_ok: return the existing segment of that name instead of failing
            (its own ``meta``, whatever ``meta`` says).
        :param meta: small user metadata kept in the record and returned in every
            ``SegmentInfo.meta``: str keys of 1-128 chars of ``[A-Za-z0-9._/:-]`` to
            str values, at most 4096 bytes (UTF-8) of keys and values together. Keys
            starting with ``vas.`` are those ``put_array``/``put_table`` write.
        :returns: the new segment's ``SegmentInfo`` (its cluster-unique ``address`` included).
        :raises InvalidArgument: bad name, size, mode, replicas, ttl or meta.
        :raises AlreadyExists: the name is taken (and not ``exist_ok``).
        :raises CapacityExceeded: the node's --memory cannot hold it, or fewer than
            ``replicas`` other live nodes have room for a backup.
        :raises Unavailable: the agent or coordinator cannot be reached.

        Example::

            info = c.create("frames/0", 64 << 20, mode=0o640, meta={"codec": "raw"})
        """
        return self._create(name, size, mode=mode, replicas=replicas, ttl=ttl,
                            exist_ok=exist_ok, meta=meta)

    def _create(self, name: str, size: int, *, mode: int = 0o600, replicas: int = 0,
                ttl: float | None = None, exist_ok: bool = False,
                meta: dict[str, str] | None = None,
                allocate_on_write: bool = False) -> SegmentInfo:
        """``create``; ``allocate_on_write``: the caller writes every byte at once with
        one ``Mapping.write`` (vas/datasets.py's put of an array), so the agent need not
        reserve the pages first (``CreateRequest.allocate_on_write``)."""
        validate.check_name(name)
        size = validate.check_size(size)
        validate.check_mode(mode)
        replicas = _check_count(replicas, "replicas")
        ttl_seconds = _check_ttl(ttl)
        meta = validate.check_meta(meta)
        request = local_pb2.CreateRequest(name=name, size=size, mode=mode, replicas=replicas,
                                          ttl_seconds=ttl_seconds, exist_ok=bool(exist_ok),
                                          meta=meta, allocate_on_write=allocate_on_write)
        return SegmentInfo.from_proto(self._connection.call("create", request, "segment"))

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
        :raises Unavailable: ``"rw"`` of a segment homed on this node, from a
            process that cannot have its mapping write-protected (no userfaultfd
            write-protect of shared memory: Linux before 5.19, userfaultfd denied,
            or ``VAS_DISABLE_USERFAULTFD=1``): attach ``"rw"`` from another node.
        :raises Fenced: ``"rw"`` whose writer lock was revoked before the attach
            finished (the process stalled past its lease meanwhile).
        :raises CapacityExceeded: no room for a remote segment's copy, or this uid
            holds the most attachments (or lazy mappings) the agent allows.

        A ``"rw"`` mapping of a segment homed on this node maps the home pages
        themselves (local readers see every store at once) and is *revocable*:
        when the agent lets its writer lock go without a detach (the process
        stalled past its lease, the connection closed, a force delete), it first
        write-protects the mapping, and a later store into it ends the process
        with SIGBUS instead of reaching the pages (see ``Mapping.sync``).

        Example::

            with c.attach("frames/0", "rw") as m:
                m.write(0, b"hello")
        """
        validate.check_name(name)
        validate.check_attach_mode(mode)
        validate.check_fetch(fetch)
        if fixed:  # a switch may have left it mapped at that address: let it go first
            self._kept.drop(name)
        response, fds = self._attach_request(name, mode, bool(fixed), fetch)
        return self._map(response, fds, mode, bool(fixed), fetch)

    def _attach_request(self, name: str, mode: str, fixed: bool, fetch: str):
        """Attach's request: (response, fds); the caller maps them (``_map``) or closes
        the fds and releases the attachment (vas/datasets.py reuses a warm mapping)."""
        request = local_pb2.AttachRequest(name=name, mode=mode, fetch=fetch,
                                          fault_support=probe_fault_support(fixed))
        if mode == "rw":  # a home "rw" mapping must be revocable (vas/mapping.py)
            request.write_protect_support = write_protect_available()
        self._connection.start_helper()
        return self._connection.call("attach", request, "attach", want_fds=True)

    def _map(self, response, fds: list[int], mode: str, fixed: bool, fetch: str) -> Mapping:
        """The ``Mapping`` of an attach response; closes ``fds``."""
        connection = self._connection
        if len(fds) != 1:
            close_fds(fds)
            self._release_quietly(response.attachment_id)
            raise VasError(f"vas agent sent {len(fds)} file descriptors for attach of "
                           f"{response.segment.name}")
        try:
            mapping = Mapping(connection, response, fds[0], mode, fixed=fixed,
                              requested_fetch=fetch)
        except BaseException:
            self._release_quietly(response.attachment_id)
            raise
        finally:
            close_fds(fds)  # the mapping keeps the pages; the fd is not needed after mmap
        connection.track(mapping)
        if mode == "rw":
            connection.add_writer(int(response.attachment_id), response.keepalive_seconds)
        return mapping

    # -- datasets (vas/datasets.py) --------------------------------------------------

    def put_array(self, name: str, array, *, mode: int = 0o600, ttl: float | None = None,
                  exist_ok: bool = False) -> SegmentInfo:
        """A new segment, homed here, holding a C-order copy of ``array``, written and
        published (version 1); dtype and shape go to its ``meta``. ``exist_ok``: an
        existing array of the same dtype and shape is returned unchanged, other contents
        are ``AlreadyExists``. Raises InvalidArgument for an object dtype. See vas/datasets.py.

        Example: ``c.put_array("points", np.arange(10.0))``"""
        return datasets.write_array(self, name, array, mode=mode, ttl=ttl, exist_ok=exist_ok)

    def get_array(self, name: str, *, fetch: str = "lazy"):
        """A read-only, zero-copy numpy array over a segment made by ``put_array``; it keeps
        the pages mapped (and the attachment alive) as long as it lives. Raises NotFound,
        or InvalidArgument when the segment holds no array. Example: ``c.get_array("p")``"""
        return datasets.read_array(self, name, fetch=fetch)

    def put_table(self, name: str, table, *, mode: int = 0o600, ttl: float | None = None,
                  exist_ok: bool = False) -> SegmentInfo:
        """Like ``put_array`` for a ``pyarrow.Table`` (or ``RecordBatch``), kept in Arrow
        IPC stream format (needs pyarrow). ``exist_ok`` returns an existing table."""
        return datasets.write_table(self, name, table, mode=mode, ttl=ttl, exist_ok=exist_ok)

    def get_table(self, name: str, *, fetch: str = "lazy"):
        """A ``pyarrow.Table`` over the pages of a segment made by ``put_table``: no byte
        copied; its buffers keep the pages mapped. Errors as ``get_array``."""
        return datasets.read_table(self, name, fetch=fetch)

    def _release_quietly(self, attachment_id: int) -> None:
        with contextlib.suppress(VasError):
            self._connection.detach(attachment_id)

    def stat(self, name: str) -> SegmentInfo:
        """The segment's current ``SegmentInfo``.

        :raises InvalidArgument: bad name.
        :raises NotFound: no such segment.

        Example::

            print(c.stat("frames/0").version)
        """
        validate.check_name(name)
        return SegmentInfo.from_proto(
            self._connection.call("stat", coordinator_pb2.GetSegmentRequest(name=name), "segment"))

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
            page = self._connection.call("list", coordinator_pb2.ListSegmentsRequest(
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
        datasets.WARM.drop(self._connection, name)  # this process's own reads let go first
        self._kept.drop(name)                       # and its last switch's "r" members
        self._connection.call("delete", local_pb2.DeleteRequest(name=name, force=bool(force)))

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
        return _segment_or_none(
            self._connection.call("chmod", local_pb2.ChmodRequest(name=name, mode=mode)))

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
            self._connection.call("chown", local_pb2.ChownRequest(name=name, uid=uid, gid=gid)))

    # -- spaces -------------------------------------------------------------------

    def _space(self, op: str, body, expect):
        request = local_pb2.LocalSpaceRequest()
        getattr(request, op).CopyFrom(body)
        return self._connection.call("space", request, expect)

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

    def switch(self, space: str) -> Switch:
        """Attach every member of ``space`` at its own fixed address, for a ``with`` block.

        Each member is attached with the mode it was added with. If one attach
        fails, the ones already made are detached and the error is raised. On
        exit every member's ``Mapping`` is detached, but the pages of the "r" ones
        stay mapped in this Client (still attachments) for the next switch, which
        reuses those the agent says are still current (one request for the space
        and all of them) and attaches the others afresh; kept members are let go
        by a switch that does not need them, a ``delete`` or ``fixed=True`` attach
        of the segment from this Client, and ``close()`` (vas/spaceview.py).

        :returns: a context manager (``vas.spaceview.Switch``) whose ``with`` yields a
            ``SpaceView``: ``view[segment_name]`` is that member's ``Mapping``.
            Leaving the block by an exception never replaces that exception.
        :raises NotFound: no such space, or a member segment is gone.
        :raises AddressConflict: a member's range is already mapped in this process.
        :raises PermissionDenied, Busy: as for ``attach``.

        Example::

            with c.switch("model") as view:
                head = view["nodes"].read(0, 64)
        """
        return Switch(self, space)

    # -- cluster ------------------------------------------------------------------

    def nodes(self, *, include_down: bool = False) -> builtins.list[NodeInfo]:
        """Every live node agent, ordered by id.

        :param include_down: also the nodes whose lease lapsed (state "down", with
            ``down_since``) and that were not removed since (``remove_node``).

        Example::

            sockets = {n.id: n.socket for n in c.nodes()}
        """
        response = self._connection.call(
            "nodes", coordinator_pb2.ListNodesRequest(include_down=include_down), "nodes")
        return [NodeInfo.from_proto(n) for n in response.nodes]

    def remove_node(self, node_id: str, *, force: bool = False) -> NodeInfo:
        """Forget node ``node_id`` (root only): a down node is no longer listed.

        :param force: also remove a live node (its lease is revoked; an agent still
            running registers again at its next heartbeat).
        :returns: the node as it was listed.
        :raises Busy: the node is up and ``force`` is not set.
        :raises NotFound: no node has that id.
        :raises PermissionDenied: the caller is not root.

        Example::

            for n in c.nodes(include_down=True):
                if n.state == "down":
                    c.remove_node(n.id)
        """
        response = self._connection.call(
            "remove_node", coordinator_pb2.RemoveNodeRequest(node_id=node_id, force=force),
            "removed_node")
        return NodeInfo.from_proto(response.node)

    def status(self) -> dict:
        """A summary of the cluster for operators (what ``vasctl status`` prints).

        :returns: a dict with ``etcd`` (endpoint), ``revision``, ``nodes``
            (list of live ``NodeInfo``), ``segments`` (count), ``segment_bytes``,
            ``spaces`` (count), ``local_node`` (this agent's id), ``down_nodes``
            (``NodeInfo`` of the nodes whose lease lapsed), ``lost`` (names of the
            segments no memory can serve: home down or gone, or marked lost) and
            ``degraded`` (names of segments whose home is up but that lost a replica
            with a down node).

        Example::

            print(c.status()["segments"])
        """
        response = self._connection.call("status", coordinator_pb2.ClusterStatusRequest(), "status")
        return cluster_status(response, local_node=self.local_node.id)


def connect(node: str | None = None) -> Client:
    """Connect to the vas agent of this machine.

    :param node: the agent's Unix socket path; default ``$VAS_NODE``; else, in a Ray
        driver, task or actor whose Ray node runs an agent of ``vas.ray.start()``,
        that agent; else ``/run/vas/node.sock``.
    :returns: a ``Client`` (a context manager; ``close()`` is idempotent).
    :raises Unavailable: nothing listens on that socket.
    :raises CapacityExceeded: this uid holds the most connections the agent allows
        (``vasctl node serve --max-connections-per-uid``).

    Example::

        with vas.connect() as c:
            print([s.name for s in c.list()])
    """
    return Client(node)


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
    """Seconds of a segment's lease; None (like 0) means no expiry."""
    return 0.0 if ttl is None else validate.check_seconds(ttl, "ttl")


# -- the default connection of the module-level shortcuts ------------------------

_default_lock = threading.Lock()
_default_client: Client | None = None


def _default(node: str | None = None) -> Client:
    """The shared connection of vas.create/attach/...: made on first use, and again
    after it broke or the agent closed it (restarted), after a fork (a connection must
    not be shared across processes), or when ``node`` names another agent (vas.ray)."""
    global _default_client
    with _default_lock:
        client = _default_client
        if (client is None or client._connection.forked or client._connection.peer_gone()
                or (node is not None and client.socket_path != node)):
            _default_client = client = Client(node)
        return client


def create(name: str, size: int, *, mode: int = 0o600, replicas: int = 0,
           ttl: float | None = None, exist_ok: bool = False,
           meta: dict[str, str] | None = None) -> SegmentInfo:
    """``Client.create`` on the default connection. Example: ``vas.create("x", 4096)``."""
    return _default().create(name, size, mode=mode, replicas=replicas, ttl=ttl,
                             exist_ok=exist_ok, meta=meta)


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

