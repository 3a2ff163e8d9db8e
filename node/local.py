"""The agent's local server: a SOCK_SEQPACKET Unix socket speaking local.proto.

One datagram is one ``LocalRequest``; the answer is one ``LocalResponse`` with the
same id, and the fds an attach hands out ride along as SCM_RIGHTS. The caller's
uid/gid/pid come from SO_PEERCRED at accept, so no request can claim another
identity.

Threads: a fixed pool of ``--local-workers`` + 1 threads (``vas-node-local-N``)
serves every connection, whatever their number. The listening socket and
every connection sit in one epoll set, each with ``EPOLLONESHOT``; every idle
thread waits in ``epoll_wait`` on it and the kernel wakes one per event. That
thread accepts, or reads one request (into its own reusable buffer) and, as
node/dispatch.py allows, serves it itself, else queues it for the next thread
free. A connection is not read again until its answer is sent and it is
re-armed (``epoll_ctl``, from the serving thread), so the requests of one
connection are served in order, one at a time, while different connections
run in parallel. (``select.epoll`` directly: the ``selectors`` module has no
one-shot mode and is not safe to share between threads.)

When the peer closes the socket (or dies) the thread that reads EOF closes it
and the agent releases every attachment and writer lock of that connection at
once (a task of the connection's uid when there are any: it may call the
coordinator).

Per-uid limits (node/limits.py): a uid holding ``--max-connections-per-uid``
connections has its next ones refused. A refused connection gets no session:
its first request (Hello) is answered with the ``CapacityExceeded`` error and
it is closed; at most ``_MOST_REFUSED_WAITING`` of one uid wait for that
request, a newer one shuts the oldest down.

Bad input never ends the agent: an unparsable or oversized datagram gets an
INVALID_ARGUMENT response with id 0, an unknown request UNIMPLEMENTED, and an
unexpected exception INTERNAL with a one-line message (the traceback goes to
the log). Fds a client sends are closed unread, except the userfaultfd of
RegisterFaults (node/faults.py). A client that does not read its answers for
``_SEND_TIMEOUT`` seconds loses its connection (no thread is stuck on it).

Locking: ``_lock`` (rank CONNECTIONS) guards the connection table, the
refused connections and the listener; reading and serving a connection need
no lock (the one thread woken for it owns it until it re-arms it).
"""
from __future__ import annotations

import collections
import enum
import errno
import functools
import logging
import os
import select
import socket
import stat
import struct
import threading
import time

from vas.core import wire
from vas.core.errors import CapacityExceeded
from vas.node import locks
from vas.node.dispatch import Dispatcher, Job
from vas.node.limits import Counts, Limit
from vas.node.localapi import LocalApi
from vas.node.localwire import BadRequest, Receiver, Responder, close_fds, unanswered
from vas.node.sessions import Session
from vas.proto import local_pb2

log = logging.getLogger(__name__)

_TIMEVAL = struct.Struct("ll")  # struct timeval: seconds, microseconds
_DONTWAIT = int(socket.MSG_DONTWAIT)
_READ_ONCE = select.EPOLLIN | select.EPOLLONESHOT

#: Seconds a send of an answer may block (the client is not reading) before the
#: connection is dropped: a client waits for each answer, so only a broken one blocks.
_SEND_TIMEOUT = 10
#: Refused connections of one uid waiting for their first request (to be told why).
_MOST_REFUSED_WAITING = 32
#: Connections accepted per wake-up before the thread waits for events again.
_ACCEPTS_PER_WAKE = 64
#: Seconds accepting pauses after running out of fds or memory.
_ACCEPT_PAUSE = 0.1
#: Seconds between two warnings about one uid's refused connections.
_WARN_EVERY = 60.0


class Phase(enum.Enum):
    """The server's life cycle (``_move`` checks each step)."""

    SERVING = "serving"    # accepting (until stop_accepting) and serving requests
    DRAINING = "draining"  # close_connections: every connection is being ended
    STOPPED = "stopped"    # the threads end


_MOVES = {Phase.SERVING: {Phase.DRAINING, Phase.STOPPED}, Phase.DRAINING: {Phase.STOPPED},
          Phase.STOPPED: set()}


class _Connection:
    """An accepted client: its socket and session."""

    __slots__ = ("sock", "fd", "session")

    def __init__(self, sock: socket.socket, session: Session):
        self.sock, self.fd, self.session = sock, sock.fileno(), session


class _Refused:
    """A connection over its uid's limit, waiting for its first request to be told why.

    Only the thread woken for it closes it (another may hold its event: closing
    it elsewhere could let that thread meet a reused fd number); ``evicted`` ones
    are shut down instead, so that their event comes and closes them."""

    __slots__ = ("sock", "fd", "uid", "error", "evicted")

    def __init__(self, sock: socket.socket, uid: int, error: CapacityExceeded):
        self.sock, self.fd, self.uid, self.error = sock, sock.fileno(), uid, error
        self.evicted = False


class LocalServer:
    """Accepts local connections on ``path`` and serves them with ``api``.

    :param workers: requests served at once (``--local-workers``; one more thread waits).
    :param requests_per_uid: requests of one uid served at once (``--max-requests-per-uid``).
    :param connections_per_uid: connections one uid may hold (``--max-connections-per-uid``).
    """

    def __init__(self, path: str, api: LocalApi, *, workers: int, requests_per_uid: int,
                 connections_per_uid: int, backlog: int = 128):
        self.path = os.path.abspath(path)
        self.agent = api.agent
        self.backlog = backlog
        self.workers = workers
        self.connections = Counts(Limit.CONNECTIONS, connections_per_uid)
        self.responder = Responder(api)
        self.dispatcher = Dispatcher(workers, requests_per_uid)
        self.phase = Phase.SERVING
        self._listener: socket.socket | None = None
        self._listen_fd = -1
        self._inode: tuple[int, int] | None = None
        self._threads: list[threading.Thread] = []
        self._epoll = select.epoll()
        # Written once at stop and never read: level-triggered, it wakes every thread.
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._stop_r, select.EPOLLIN)
        self._lock = locks.Lock("local connections", locks.Rank.CONNECTIONS)
        # Guarded by _lock: every socket in the epoll set but the listener and the pipe.
        self._owners: dict[int, _Connection | _Refused] = {}
        self._refused: dict[int, collections.deque[_Refused]] = {}  # by uid, oldest first
        self._warned: dict[int, float] = {}  # uid -> when its refusals were last logged
        self._releasing = 0                  # sessions whose attachments are being released
        self._drained = threading.Event()    # DRAINING, and every connection is gone

    # ------------------------------------------------------------------ socket file

    def bind(self) -> None:
        """Create the socket file (mode 0666; parents created; a stale file replaced)."""
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        self._remove_stale()
        listener = wire.new_socket()
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o666)  # access control is per caller (SO_PEERCRED), not by file
            # Every request then carries its sender's pid (SCM_CREDENTIALS; accepted
            # sockets inherit the option): a connection serves only its opener.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            listener.listen(self.backlog)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._listener = listener

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, "exists and is not a socket", self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket %s", self.path)
            os.unlink(self.path)
            return
        except OSError as exc:  # e.g. a socket of another type: not an agent, but a live one
            raise OSError(errno.EADDRINUSE, f"socket in use ({exc})", self.path) from exc
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, "another agent is serving this socket", self.path)

    def remove_socket_file(self) -> None:
        """Unlink the socket file if it is still the one this server created."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the threads, which accept and serve (after ``bind``)."""
        self._listen_fd = self._listener.fileno()
        self._epoll.register(self._listen_fd, _READ_ONCE)
        self._threads = [threading.Thread(target=self._run, name=f"vas-node-local-{i}",
                                          daemon=True)
                         for i in range(self.workers + 1)]
        for thread in self._threads:
            thread.start()

    def stop_accepting(self) -> None:
        """Stop taking new connections; existing ones keep being served."""
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                if self._threads:
                    self._epoll.unregister(listener.fileno())
                listener.close()

    def close_connections(self, timeout: float = 5.0) -> None:
        """End every connection (each one's attachments are released as at EOF), then
        the threads."""
        with self._lock:
            self._move(Phase.DRAINING)
            for owner in list(self._owners.values()):
                if type(owner) is _Refused:
                    self._evict_locked(owner)
                    continue
                try:  # idle ones read EOF at once, busy ones once answered
                    owner.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._check_drained_locked()
        if not self._drained.wait(timeout):
            log.warning("local connections still open after %.0f s; stopping anyway", timeout)
        with self._lock:
            self._move(Phase.STOPPED)
        os.write(self._stop_w, b"x")
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            return  # the fds stay: closing them under a thread could reach a reused number
        self._epoll.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _move(self, phase: Phase) -> None:
        if phase not in _MOVES[self.phase]:
            raise RuntimeError(f"local server: no move from {self.phase.value} to {phase.value}")
        self.phase = phase

    # ------------------------------------------------------------------ the threads

    def _run(self) -> None:
        """One thread: wait for an event, handle it, run what the dispatcher gives."""
        receiver = Receiver()
        try:
            while True:
                try:
                    events = self._epoll.poll(-1, 1)
                except OSError as exc:  # EBADF: the epoll set was closed (a thread left late)
                    log.debug("local thread ends: %s", exc)
                    return
                for fd, _ in events:
                    if fd == self._stop_r:
                        return
                    try:
                        job = self._handle(fd, receiver)
                    except Exception:  # serving everyone: no event may end a thread
                        log.exception("local connections: handling fd %d failed", fd)
                        continue
                    self._run_jobs(job)
        finally:
            receiver.close()

    def _run_jobs(self, job: Job | None) -> None:
        """Run ``job`` and then whatever the dispatcher gives this thread next."""
        while job is not None:
            answered = None
            try:
                answered = job[1]()
            except Exception:
                log.exception("a local request task failed")
            job = self.dispatcher.done(job)
            if answered is not None:  # answered: read its next request (re-armed after
                try:                  # done(), so a thread woken for it seldom waits for our GIL)
                    self._epoll.modify(answered.fd, _READ_ONCE)
                except OSError as exc:
                    log.error("cannot watch the connection of %r again: %s", answered.session,
                              exc)

    def _handle(self, fd: int, receiver: Receiver) -> Job | None:
        """Handle the event of ``fd``; a job for this thread to run, or None."""
        owner = self._owners.get(fd)
        if type(owner) is _Connection:
            return self._read(owner, receiver)
        if owner is not None:
            self._tell_refused(owner, receiver)
        elif fd == self._listen_fd:
            self._accept()
        return None

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        with self._lock:
            if self._listener is None:  # stopped accepting meanwhile
                return
            exhausted = self._accept_locked()
        if exhausted:  # the listener stays readable: pause, or every thread would spin
            threading.Event().wait(_ACCEPT_PAUSE)
        with self._lock:
            if self._listener is not None:
                self._epoll.modify(self._listen_fd, _READ_ONCE)

    def _accept_locked(self) -> bool:
        """Accept what is waiting (at most _ACCEPTS_PER_WAKE); True when out of fds or memory."""
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept a local connection: %s", exc)
                    return True
                return False
            self._admit_locked(sock)
        return False

    def _admit_locked(self, sock: socket.socket) -> None:
        try:
            pid, uid, gid = wire.UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, wire.UCRED.size))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wire.SOCKET_BUFFER)
            # A blocking send that cannot finish in this time fails with EAGAIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            _TIMEVAL.pack(_SEND_TIMEOUT, 0))
        except OSError as exc:
            log.warning("dropping a local connection: %s", exc)
            sock.close()
            return
        if self.phase is not Phase.SERVING:
            sock.close()
            return
        try:
            self.connections.take(uid)
        except CapacityExceeded as exc:
            self._refuse_locked(sock, uid, exc)
            return
        session = self.agent.open_session(uid, gid, pid)
        session.sock = sock
        connection = _Connection(sock, session)
        self._owners[connection.fd] = connection
        self._epoll.register(connection.fd, _READ_ONCE)
        log.debug("connection from %r", session)

    def _read(self, connection: _Connection, receiver: Receiver) -> Job | None:
        """Read the connection's next request and offer it (or end the connection at EOF)."""
        session = connection.session
        try:
            request, fds = receiver.receive(connection.sock)
        except BadRequest as exc:
            answer = self.responder.bad(exc)
            return self.dispatcher.offer(session.uid,
                                         lambda: self._answer(connection, answer, []))
        except BlockingIOError:  # woken with nothing to read
            self._epoll.modify(connection.fd, _READ_ONCE)
            return None
        except OSError as exc:  # ECONNRESET, ...: the peer is gone, as at EOF
            log.debug("connection of %r ended: %s", session, exc)
            request, fds = None, []
        if request is None:
            if self._end(connection):  # a task of its uid: it may call the coordinator
                return self.dispatcher.offer(session.uid, lambda: self._release(session))
            return None
        session.last_seen, session.busy = time.monotonic(), True
        return self.dispatcher.offer(session.uid, functools.partial(
            self._serve, connection, request, fds, receiver.sender))

    def _end(self, connection: _Connection) -> bool:
        """Close a connection that this thread holds (no other can); True when its
        attachments are still to be released (``_release``), else that is done."""
        session = connection.session
        with self._lock:
            del self._owners[connection.fd]
            self._epoll.unregister(connection.fd)
            connection.sock.close()
            self.connections.give(session.uid)
            holding = bool(session.attachments)  # only its own requests change them: none runs
            if holding:
                self._releasing += 1
            else:
                self._check_drained_locked()
        if not holding:
            self.agent.close_session(session)  # nothing to release: no coordinator call
        return holding

    def _refuse_locked(self, sock: socket.socket, uid: int, error: CapacityExceeded) -> None:
        now = time.monotonic()
        if now - self._warned.get(uid, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[uid] = now
            log.warning("refusing local connections: %s", error.message)
        waiting = self._refused.get(uid, ())
        if len(waiting) >= _MOST_REFUSED_WAITING:
            self._evict_locked(waiting[0])
        refused = _Refused(sock, uid, error)
        self._refused.setdefault(uid, collections.deque()).append(refused)
        self._owners[refused.fd] = refused
        self._epoll.register(refused.fd, _READ_ONCE)

    def _tell_refused(self, refused: _Refused, receiver: Receiver) -> None:
        """Answer the first request of a refused connection with its error, then close it."""
        answer = local_pb2.LocalResponse(id=0, code=refused.error.code.value[0],
                                         message=refused.error.message)
        try:
            try:
                request, fds = receiver.receive(refused.sock)
                close_fds(fds)
            except BadRequest:
                request = local_pb2.LocalRequest()  # answered with id 0
            if request is not None and not refused.evicted:
                answer.id = request.id
                refused.sock.send(answer.SerializeToString(), _DONTWAIT)
        except OSError as exc:  # gone, or not reading: it is closed all the same
            log.debug("a refused connection of uid %d: %s", refused.uid, exc)
        with self._lock:
            self._evict_locked(refused)
            del self._owners[refused.fd]
            self._epoll.unregister(refused.fd)
            refused.sock.close()
            self._check_drained_locked()

    def _evict_locked(self, refused: _Refused) -> None:
        """Stop counting a refused connection; shut it down (its event closes it)."""
        if refused.evicted:
            return
        refused.evicted = True
        waiting = self._refused[refused.uid]
        waiting.remove(refused)
        if not waiting:
            del self._refused[refused.uid]
        try:
            refused.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _check_drained_locked(self) -> None:
        if self.phase is Phase.DRAINING and not self._owners and not self._releasing:
            self._drained.set()

    # ------------------------------------------------------------------ serving

    def _serve(self, connection: _Connection, request: local_pb2.LocalRequest,
               fds: list[int], sender: int | None) -> _Connection | None:
        session = connection.session
        try:
            try:
                response, out = self.responder.handle(session, request, fds, sender)
            finally:
                session.last_seen, session.busy = time.monotonic(), False
                close_fds(fds)  # whatever a handler did not take
            if unanswered(request):  # the client does not wait: nothing is sent
                close_fds(out)
                if response.code:
                    log.debug("an unanswered request of %r failed: %s", session,
                              response.message)
                return connection
            return self._answer(connection, response, out)
        except Exception:  # a bug: end the connection rather than leave its client waiting
            log.exception("connection of %r failed", session)
            if self._end(connection):
                self._release(session)
            return None

    def _answer(self, connection: _Connection, response: local_pb2.LocalResponse,
                fds: list[int]) -> _Connection | None:
        """Send the answer; the connection, to be read again (``_run``), or None if it ended."""
        try:
            self.responder.send(connection.sock, response, fds)
            return connection
        except (OSError, ValueError) as exc:  # gone, not reading its answers, or shut down
            log.debug("connection of %r ended: %s", connection.session, exc)
            if self._end(connection):
                self._release(connection.session)  # within this task of its uid
            return None

    def _release(self, session: Session) -> None:
        try:
            self.agent.close_session(session)
        except Exception:
            log.exception("releasing the attachments of %r failed", session)
        finally:
            with self._lock:
                self._releasing -= 1
                self._check_drained_locked()
