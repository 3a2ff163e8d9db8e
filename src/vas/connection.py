"""``Connection``: the client's one SOCK_SEQPACKET connection to the local agent.

The transport under ``vas.Client`` (vas/client.py: the public API and its argument
checks) and under each ``Mapping`` (vas/mapping.py), as node/local.py is under
node/localapi.py in the agent. It speaks proto/vas/v1/local.proto over
vas/core/wire.py: ``call`` sends one ``LocalRequest`` and waits for the
``LocalResponse`` with the same id; a non-zero status becomes the matching
``vas.VasError`` through vas.core.errors. Opening a connection says Hello, which
gives ``local_node`` and the identity the agent saw (``uid``/``gid``/``pid``).

The agent learns who we are from the socket (SO_PEERCRED), and closing the
connection releases every attachment and writer lock it holds, so a process
that dies cleans up after itself. A connection belongs to the process that made
it: after a fork every request raises ``Unavailable``. A socket error, an EOF, an
answer with another id or one that is no LocalResponse breaks it: the socket is
closed and every later request fails at once.

Threads: ``_lock`` spans each request/response pair and is the only lock here.
A Connection that has attached something runs one helper thread ("vas-client"),
holding only a weak reference to it between rounds, that sends the Detach of
attachments whose last buffer view went away and a KeepAlive every
``keepalive_seconds`` while a "rw" attachment lives. Every request, and close(),
sends the queued Detaches first.

Those Detaches come from finalizers (vas/mapping.py: one on each mapping's native
object, run when its last view goes), and a finalizer may run in any thread, even
one inside a request of this very connection, holding ``_lock``. So
``release_later``, what it calls, neither locks nor sends: it only puts the id on
the ``_releases`` SimpleQueue (safe there) and nudges the helper.

Lazy mappings are also handed to this process's guardian (vas/guard.py,
vas/guardian.py: ``guard_faults``), which holds a dup of this socket to see the
agent go. A dup keeps the socket open, so closing it would not end the
connection for the agent: ``close()``, a broken connection and a Connection
dropped without ``close()`` shut the socket down first (the agent sees EOF, the
guardian a hang-up).
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import itertools
import logging
import math
import os
import queue
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from vas import guard, pages
from vas.core import wire
from vas.core.errors import Unavailable, VasError, from_number
from vas.core.types import NodeInfo
from vas.core.validate import PAGE_SIZE
from vas.proto import LOCAL_PROTOCOL, local_pb2

if TYPE_CHECKING:
    from vas.mapping import Mapping

#: Most attachment ids one Revalidate request names (the agent's limit).
_REVALIDATE_BATCH = 1024
#: Shortest interval between two KeepAlives, seconds (whatever the agent asks).
_MIN_KEEPALIVE_SECONDS = 0.05

log = logging.getLogger(__name__)

#: This process's pid, kept current across fork() by the hook below: every request
#: checks ``forked``, and a getpid(2) per request was one syscall in ~10 of an
#: attach+detach.
_this_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _this_pid
    _this_pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Connection:
    """One connection to the local agent, shared by a ``Client`` and its mappings.

    Thread-safe: one request is in flight at a time. Attributes: ``socket_path``,
    ``local_node`` (the agent's ``NodeInfo`` as of Hello), ``uid``/``gid``/``pid``
    (the identity the agent saw on the socket).

    :raises Unavailable: nothing listens on ``socket_path``, or Hello failed.
    """

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._pid = _this_pid
        # Answers land here: one recvmsg per answer, into a buffer made once.
        self._inbox = wire.Inbox()
        # Attachment ids whose pages are unmapped but whose Detach is not sent yet
        # (queued by finalizers, see release_later); sent before the next request.
        self._releases: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Wake-ups of the helper thread (a Detach queued, a writer attached, closed).
        self._nudges: queue.SimpleQueue[None] = queue.SimpleQueue()
        # "rw" attachments alive at the agent (mapped here, views included): while
        # there are any the helper sends a KeepAlive every _keepalive_seconds.
        self._writer_ids: set[int] = set()
        self._keepalive_seconds = math.inf
        # Mappings told at close that the agent released their attachments.
        self._mappings: weakref.WeakSet[Mapping] = weakref.WeakSet()
        self._helper: threading.Thread | None = None
        # (guardian, key) once this connection's socket is watched by one (guard_faults).
        self._guarded: tuple | None = None
        # The agent's change counter (its first 8 bytes as one uint64), mapped read-only
        # at the first Revalidate: see changes() and node/changes.py.
        self._counter: memoryview | None = None
        # A Connection dropped without close(): its helper must not wait for it forever.
        weakref.finalize(self, self._nudges.put, None).atexit = False
        sock = wire.new_socket()
        try:
            sock.connect(socket_path)
        except OSError as exc:
            sock.close()
            raise Unavailable(
                f"cannot reach the vas agent at {socket_path}: {exc.strerror or exc} "
                "(is `vasctl node serve` running? set $VAS_NODE)") from exc
        self._sock = sock
        # peer_gone()'s poll of the socket, made once (a poll object per call, registered
        # anew, was ~0.6 us more of every switch that sends no request).
        self._hangups = select.poll()
        self._hangups.register(sock, select.POLLHUP | select.POLLERR)
        try:
            hello = self.call("hello", local_pb2.HelloRequest(protocol=LOCAL_PROTOCOL), "hello")
        except BaseException:
            self.close()
            raise
        self.local_node = NodeInfo.from_proto(hello.node)
        self.uid, self.gid, self.pid = hello.caller.uid, hello.caller.gid, hello.caller.pid

    # -- requests -----------------------------------------------------------------

    def call(self, field: str, body, expect: str | tuple[str, ...] | None = None, *,
             want_fds: bool = False, send_fds=()):
        """Send one request with ``body`` in oneof ``field`` (and ``send_fds``); return the
        response body.

        :param expect: the response bodies that may answer (``None`` in the tuple:
            no body); ``None``: any.
        :returns: the body, or ``(body, fds)`` with ``want_fds`` (the caller owns the fds).
        :raises VasError: the agent's status as its exception; a body not expected.
        :raises Unavailable: closed, made by another process, or broken now.
        """
        with self._lock:
            self._check_open()
            self._flush_releases()
            response, fds = self._roundtrip(field, body, send_fds)
        try:
            if response.code != 0:
                raise from_number(response.code, response.message)
            kind = response.WhichOneof("body")
            wanted = (expect,) if isinstance(expect, str) else expect
            if wanted is not None and kind not in wanted:
                raise VasError(f"vas agent at {self.socket_path} answered {field} with "
                               f"{kind or 'nothing'} (a protocol mismatch?)")
            result = getattr(response, kind) if kind else None
        except BaseException:
            close_fds(fds)
            raise
        if want_fds:
            return result, fds
        close_fds(fds)
        return result

    def _roundtrip(self, field: str, body, send_fds=()):
        """One request/response exchange; the caller holds the lock."""
        request = local_pb2.LocalRequest(id=next(self._ids))
        getattr(request, field).CopyFrom(body)
        self._send(request, send_fds)
        try:
            response, fds = self._inbox.receive_message(self._sock, local_pb2.LocalResponse)
        except OSError as exc:
            raise self._lost(exc) from exc
        except ValueError as exc:  # too large, or not a response at all
            self._broken()
            raise Unavailable(f"the vas agent at {self.socket_path} sent an answer that is "
                              f"{exc}; connection dropped") from exc
        if response is None:
            self._broken()
            raise Unavailable(f"the vas agent at {self.socket_path} closed the connection")
        if response.id != request.id:
            close_fds(fds)
            self._broken()
            raise Unavailable(f"the vas agent at {self.socket_path} answered request "
                              f"{request.id} with id {response.id}; connection dropped")
        return response, fds

    def _send(self, request, send_fds=()) -> None:
        """Send one request; the caller holds the lock."""
        try:
            wire.send_message(self._sock, request, send_fds)
        except OSError as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: OSError) -> Unavailable:
        self._broken()
        return Unavailable(f"lost the connection to the vas agent at {self.socket_path}: "
                           f"{exc.strerror or exc}")

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"this connection to the vas agent at {self.socket_path} is closed")
        if self.forked:
            raise Unavailable("this vas connection was made by another process (before a "
                              "fork); call vas.connect() again in this one")

    def _broken(self) -> None:
        """The socket is unusable: close it so every later call fails at once."""
        self._closed = True
        _end_socket(self._sock, self._pid)

    # -- the requests of a Mapping --------------------------------------------------

    def detach(self, attachment_id: int) -> None:
        """Release one attachment (Mapping.detach, and a failed attach) and wait for the
        answer: when this returns, every process sees it released (counts, a deleting
        segment freed, a writer lock free). Not sent unanswered (``no_reply``), though
        that saved a round trip: another process told "detached" could still find the
        attachment, e.g. the name of a segment it deleted still taken."""
        self._writer_ids.discard(attachment_id)
        self.call("detach", local_pb2.DetachRequest(attachment_id=attachment_id),
                  ("detach", "empty", None))

    def _send_detach(self, attachment_id: int) -> None:
        """Send an unanswered Detach (of a queued release); the caller holds the lock."""
        request = local_pb2.LocalRequest(id=next(self._ids))
        request.detach.attachment_id = attachment_id
        request.detach.no_reply = True
        self._send(request)

    def prefetch(self, attachment_id: int, offset: int, length: int) -> None:
        """Ask the agent to make [offset, offset + length) of an attachment present
        (Mapping.prefetch)."""
        self.call("prefetch", local_pb2.PrefetchRequest(
            attachment_id=attachment_id, offset=offset, length=length), "empty")

    def register_faults(self, attachment_id: int, address: int, size: int, uffd: int,
                        purpose: int = local_pb2.FAULT_PURPOSE_LAZY) -> None:
        """Hand the userfaultfd of a mapping to the agent: of a lazy one (``purpose``
        FAULT_PURPOSE_LAZY) or the writable mapping of a revocable "rw" attachment
        (FAULT_PURPOSE_WRITE_PROTECT). The caller still closes ``uffd``."""
        self.call("register_faults", local_pb2.RegisterFaultsRequest(
            attachment_id=attachment_id, address=address, size=size, purpose=purpose),
            "empty", send_fds=[uffd])

    def guard_faults(self, attachment_id: int, address: int, size: int, uffd: int,
                     fallback: Callable[[], None]) -> Callable[[], None] | None:
        """Hand a dup of a lazy mapping's userfaultfd to this process's guardian
        (started on first use), after ``register_faults``: if the agent goes, the
        guardian poisons the mapping's faults (SIGBUS) instead of letting them read
        zeros. The caller still closes ``uffd``.

        :param fallback: fetches the mapping whole; run (from another thread) if the
            guardian turns out not to start.
        :returns: the function to call once the mapping is unmapped (the guardian
            closes its dup), or None if no guardian can take it: the caller must
            fetch the mapping whole.
        """
        guardian = guard.current()
        with self._lock:  # one WATCH per connection and guardian
            if self._guarded is None or self._guarded[0] is not guardian:
                key = guardian.watch(self._sock)
                if key is None:
                    return None
                self._guarded = (guardian, key)
                # Dropped without close(): still end the connection for the agent.
                weakref.finalize(self, _end_socket, self._sock, self._pid).atexit = False
            key = self._guarded[1]
        if not guardian.add(key, attachment_id, address, size, uffd, fallback):
            return None
        return functools.partial(guardian.drop, key, attachment_id)

    def revalidate(self, space: str, attachment_ids: list[int]):
        """Space ``space`` and whether kept "r" attachments are still current
        (Client.switch): (the ``SpaceInfo`` proto, one ``Revalidated`` per id in order,
        the generation they hold at: 0 if none), in one Revalidate request per 1024
        ids (one in all, usually). The first maps the agent's change counter page."""
        answers, info, generation = [], None, None
        for start in range(0, max(1, len(attachment_ids)), _REVALIDATE_BATCH):
            ids = attachment_ids[start:start + _REVALIDATE_BATCH]
            response, fds = self.call("revalidate", local_pb2.RevalidateRequest(
                attachment_ids=ids, space="" if info else space,
                counter_page=self._counter is None), "revalidate", want_fds=True)
            self._map_counter(fds)
            if [answer.attachment_id for answer in response.attachments] != ids:
                raise VasError(f"vas agent at {self.socket_path} answered Revalidate about "
                               "other attachments (a protocol mismatch?)")
            info = info or response.space
            answers.extend(response.attachments)
            # The first batch's counter was read before every later answer was made:
            # they all hold at it, unless one of them does not hold at all (0).
            generation = response.generation if generation is None else \
                (generation if response.generation else 0)
        return info, answers, generation

    def _map_counter(self, fds) -> None:
        """Map the change counter page the agent sent (the first one; close the fds)."""
        try:
            if fds and self._counter is None:
                page = pages.native_mmap(fds[0], PAGE_SIZE, writable=False, address=0,
                                         fixed=False, offset=0)
                self._counter = memoryview(page).cast("B")[:8].cast("Q")
        finally:
            close_fds(fds)

    def changes(self) -> int | None:
        """The agent's change counter now (node/changes.py), read from its shared page
        without a request; None when there is no page yet, or this connection cannot
        be used (closed, forked, the agent gone: a request tells why)."""
        counter = self._counter
        if counter is None or _this_pid != self._pid or self.peer_gone():  # (not forked)
            return None
        return counter[0]

    def sync(self, attachment_id: int, ranges, *, tracked: bool = False):
        """Publish a "rw" attachment's writes (Mapping.sync); the new segment record.
        ``tracked``: ``ranges`` are every change (vas/written.py), possibly none."""
        return self.call("sync", local_pb2.SyncRequest(
            attachment_id=attachment_id, tracked=tracked,
            ranges=[local_pb2.ByteRange(offset=o, length=n) for o, n in ranges]), "segment")

    def write_from(self, attachment_id: int, offset: int, data: memoryview) -> None:
        """Have the agent copy ``data`` (C-contiguous bytes of this process) into a
        revocable "rw" attachment's segment at ``offset`` (Mapping.write). ``data`` must
        stay alive and unchanged until this returns."""
        import numpy as np

        address = int(np.frombuffer(data, dtype=np.uint8).ctypes.data)
        self.call("write_from", local_pb2.WriteFromRequest(
            attachment_id=attachment_id, offset=offset, length=data.nbytes,
            address=address), "empty")

    def refresh(self, attachment_id: int):
        """Bring an attachment's copy to the newest version (Mapping.refresh); its record."""
        return self.call("refresh", local_pb2.RefreshRequest(attachment_id=attachment_id),
                         "segment")

    def wait(self, attachment_id: int, version: int, timeout: float):
        """Block until a version above ``version`` is published or ``timeout`` seconds
        pass (Mapping.wait); the segment record."""
        return self.call("wait", local_pb2.WaitRequest(
            attachment_id=attachment_id, version=version, timeout_seconds=timeout), "segment")

    # -- attachments: the helper thread, queued Detaches, KeepAlives ----------------

    def start_helper(self) -> None:
        """Start the helper thread (module docstring) once: at the first attach, never
        from a finalizer (starting a thread takes locks and waits). It runs until the
        connection is closed or broken, or the Connection is gone."""
        if self._helper is not None:
            return
        with self._lock:  # one helper even when threads attach at once
            if self._helper is None:
                self._helper = threading.Thread(
                    target=_helper_loop, args=(weakref.ref(self), self._nudges),
                    name="vas-client", daemon=True)
                self._helper.start()

    def track(self, mapping: Mapping) -> None:
        """Tell ``mapping`` (``connection_closed``) when this connection closes."""
        self._mappings.add(mapping)

    def add_writer(self, attachment_id: int, keepalive_seconds: float) -> None:
        """A "rw" attachment lives: the helper sends a KeepAlive every
        ``keepalive_seconds`` (the agent's figure; at least _MIN_KEEPALIVE_SECONDS)
        until it is detached."""
        self._keepalive_seconds = max(keepalive_seconds, _MIN_KEEPALIVE_SECONDS)
        self._writer_ids.add(attachment_id)
        self._nudges.put(None)  # the helper starts its keepalive rounds

    def release_later(self, attachment_id: int) -> None:
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
        if self._releases.empty():  # the usual case: no exception raised per request
            return
        while True:
            try:
                attachment_id = self._releases.get_nowait()
            except queue.Empty:
                return
            if attachment_id in self._writer_ids:  # its answer: the writer lock is released
                self._writer_ids.discard(attachment_id)
                response, fds = self._roundtrip(
                    "detach", local_pb2.DetachRequest(attachment_id=attachment_id))
                close_fds(fds)  # an error here only means it is gone already
            else:
                self._send_detach(attachment_id)

    def _flush_releases_now(self) -> None:
        """Take the lock and send the queued Detaches (the helper thread)."""
        with self._lock:
            self._check_open()
            self._flush_releases()

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Send the queued Detaches, then close the socket (the agent releases every
        attachment of it) and tell the tracked mappings. Idempotent."""
        if self._closed:
            return
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(VasError, OSError):
                if not self.forked:
                    self._flush_releases()
            self._closed = True
            if self._guarded is not None and not self.forked:
                guardian, key = self._guarded
                guardian.closing(key)  # our own close, not the agent's death: no alarm
            _end_socket(self._sock, self._pid)
        self._counter = None
        self._writer_ids.clear()
        self._nudges.put(None)  # the helper thread ends
        for mapping in builtins.list(self._mappings):
            mapping.connection_closed()

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran or the connection broke."""
        return self._closed

    def peer_gone(self) -> bool:
        """True when the agent has closed its end (it stopped or was restarted), told by
        one poll(2) of the socket (HUP or ERR), without a request. The default
        connection (vas.client._default) asks this before each use, so a process's
        next call after an agent restart reconnects instead of failing once."""
        if self._closed:
            return True
        # poll(2) reports only what was asked (HUP, ERR) and NVAL: any event is the end.
        try:
            return bool(self._hangups.poll(0))
        except RuntimeError:  # another thread is in poll() on it: one poll object a call
            poller = select.poll()
            poller.register(self._sock, select.POLLHUP | select.POLLERR)
            return bool(poller.poll(0))

    @property
    def forked(self) -> bool:
        """True in a process other than the one that made this connection (a fork)."""
        return _this_pid != self._pid


def _helper_loop(connection_ref, nudges: queue.SimpleQueue) -> None:
    """Body of a Connection's helper thread (module docstring): send queued Detaches when
    nudged, a KeepAlive when one is due; end when the Connection is closed or gone.
    Holds the Connection only while working, never while waiting."""
    keepalive_due = math.inf
    while True:
        connection = connection_ref()
        if connection is None or connection.closed:
            return
        now = time.monotonic()
        if not connection._writer_ids:
            keepalive_due = math.inf
        elif keepalive_due == math.inf:
            keepalive_due = now + connection._keepalive_seconds
        del connection
        try:
            nudges.get(timeout=None if keepalive_due == math.inf else max(0.0, keepalive_due - now))
            keepalive = False
        except queue.Empty:
            keepalive = True
        connection = connection_ref()
        if connection is None or connection.closed:
            return
        try:
            if keepalive:  # any request proves us alive; it also sends queued Detaches
                keepalive_due = math.inf
                connection.call("keepalive", local_pb2.KeepAliveRequest(), "empty")
            else:
                connection._flush_releases_now()
        except VasError as exc:
            if connection.closed:
                return  # the connection is gone: the agent released everything already
            log.warning("vas agent at %s refused a request of the client's helper "
                        "thread: %s", connection.socket_path, exc)
        del connection


def _end_socket(sock, owner_pid: int) -> None:
    """Shut ``sock`` down, then close it: a dup held by the guardian must not keep the
    connection open for the agent. In a forked child (not ``owner_pid``) only close:
    the shutdown would end the parent's connection too."""
    if os.getpid() == owner_pid:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


#: Close every fd of ``fds``, ignoring errors (fds a response carried).
close_fds = wire.close_quietly
