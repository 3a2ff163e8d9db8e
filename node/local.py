"""The agent's local server: a SOCK_SEQPACKET Unix socket speaking local.proto.

One datagram is one ``LocalRequest``; the answer is one ``LocalResponse`` with the
same id, and the fds an attach hands out ride along as SCM_RIGHTS. The caller's
uid/gid/pid come from SO_PEERCRED at accept, so no request can claim another
identity. Each connection gets its own thread and serves its requests in order;
when the peer closes the socket (or dies) the thread reads EOF and the agent
releases every attachment and writer lock of that connection at once.

Bad input never ends the agent: an unparsable or oversized datagram gets an
INVALID_ARGUMENT response with id 0, an unknown request UNIMPLEMENTED, and an
unexpected exception INTERNAL with a one-line message (the traceback goes to
the log). Fds a client sends are closed unread, except the userfaultfd of
RegisterFaults (node/lazy.py).
"""
from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import socket
import stat
import struct
import threading
import time

from google.protobuf.message import DecodeError

from vas.core import wire
from vas.core.errors import InvalidArgument, VasError
from vas.node.agent import Agent, Session, Unimplemented
from vas.proto import local_pb2

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_ANCILLARY_SPACE = socket.CMSG_SPACE(wire.MAX_FDS * 4)
# Plain ints: ``flags & socket.MSG_TRUNC`` goes through enum.Flag and costs ~2 us.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
_INTERNAL = 13         # grpc.StatusCode.INTERNAL
_INVALID_ARGUMENT = 3  # grpc.StatusCode.INVALID_ARGUMENT


class _BadRequest(Exception):
    """A datagram that is not a LocalRequest; answered with id 0."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:1000]


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Receiver:
    """Receives the requests of one connection.

    The framing is vas.core.wire's, but received here rather than with
    ``wire.recv_message`` for two reasons: fds sent along with garbage are
    closed at once (the agent takes an fd only with RegisterFaults); and the
    datagram lands in a buffer reused across requests (an anonymous mapping
    whose untouched pages cost nothing), where a fresh 4 MiB buffer per
    receive would add ~15 us to every request.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        # One byte more than the largest request, so an oversized one shows as MSG_TRUNC.
        self._buffer = mmap.mmap(-1, wire.MAX_MESSAGE + 1)
        self._view = memoryview(self._buffer)
        self.fds: list[int] = []

    def close(self) -> None:
        try:
            self._view.release()
            self._buffer.close()
        except BufferError:  # a slice still alive somewhere: the GC unmaps it later
            pass

    def _drop_fds(self) -> None:
        _close_fds(self.fds)
        self.fds = []

    def receive(self) -> local_pb2.LocalRequest | None:
        """One request; None at EOF. Raises _BadRequest for a datagram that is not one.

        The fds that came with it are in ``fds`` (the caller closes them).
        """
        size, ancdata, flags, _ = self.sock.recvmsg_into([self._view], _ANCILLARY_SPACE)
        self.fds = []
        for level, kind, payload in ancdata:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if not size or flags & _MSG_TRUNC or size > wire.MAX_MESSAGE:
            self._drop_fds()
        if not size:
            return None
        if flags & _MSG_TRUNC or size > wire.MAX_MESSAGE:
            raise _BadRequest(f"request larger than {wire.MAX_MESSAGE} bytes")
        request = local_pb2.LocalRequest()
        try:
            request.ParseFromString(self._view[:size])
        except DecodeError as exc:
            self._drop_fds()
            raise _BadRequest(f"malformed request: not a LocalRequest ({_one_line(exc)})") from exc
        return request


class LocalServer:
    """Accepts local connections on ``path`` and serves them with ``agent``."""

    def __init__(self, path: str, agent: Agent, *, backlog: int = 128):
        self.path = os.path.abspath(path)
        self.agent = agent
        self.backlog = backlog
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._closing = False
        self._handlers = {
            "hello": agent.hello, "create": agent.create, "attach": agent.attach,
            "detach": agent.detach, "stat": agent.stat, "list": agent.list,
            "delete": agent.delete, "chmod": agent.chmod, "chown": agent.chown,
            "nodes": agent.nodes, "space": agent.space, "status": agent.status,
            "prefetch": agent.prefetch, "register_faults": agent.register_faults,
            "sync": agent.sync, "refresh": agent.refresh, "wait": agent.wait,
            "keepalive": agent.keepalive,
        }

    # ------------------------------------------------------------------ socket file

    def bind(self) -> None:
        """Create the socket file (mode 0666; parents created; a stale file replaced)."""
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        self._remove_stale()
        listener = wire.new_socket()
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o666)  # access control is per caller (SO_PEERCRED), not by file
            listener.listen(self.backlog)
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

    # ------------------------------------------------------------------ accepting

    def start(self) -> None:
        """Start accepting connections (after ``bind``)."""
        self._accept_thread = threading.Thread(target=self._accept_loop, name="vas-node-accept",
                                               daemon=True)
        self._accept_thread.start()

    def stop_accepting(self) -> None:
        """Stop taking new connections; existing ones keep being served."""
        with self._lock:
            self._closing = True
            listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(5.0)

    def close_connections(self, timeout: float = 5.0) -> None:
        """End every connection; each one's attachments are released as at EOF."""
        with self._lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in connections:
            thread.join(timeout)

    def _accept_loop(self) -> None:
        listener = self._listener
        while True:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                with self._lock:
                    if self._closing:
                        return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept a local connection: %s", exc)
                    threading.Event().wait(0.1)
                continue
            try:
                pid, uid, gid = _UCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wire.SOCKET_BUFFER)
            except OSError as exc:
                log.warning("dropping a local connection: %s", exc)
                sock.close()
                continue
            session = self.agent.open_session(uid, gid, pid)
            session.sock = sock
            thread = threading.Thread(target=self._serve, args=(sock, session),
                                      name=f"vas-node-conn-{pid}", daemon=True)
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self._connections[sock] = thread
            try:
                thread.start()
            except RuntimeError as exc:  # out of threads: refuse this client, keep serving
                log.error("cannot serve a local connection from pid %d: %s", pid, exc)
                with self._lock:
                    self._connections.pop(sock, None)
                sock.close()

    # ------------------------------------------------------------------ serving

    def _serve(self, sock: socket.socket, session: Session) -> None:
        log.debug("connection from %r", session)
        receiver = Receiver(sock)
        try:
            while True:
                try:
                    request = receiver.receive()
                except _BadRequest as exc:
                    self._send(sock, local_pb2.LocalResponse(
                        id=0, code=_INVALID_ARGUMENT, message=str(exc)), [])
                    continue
                if request is None:
                    break
                session.last_seen, session.busy = time.monotonic(), True
                try:
                    response, fds = self.handle(session, request, receiver.fds)
                finally:
                    session.last_seen, session.busy = time.monotonic(), False
                    _close_fds(receiver.fds)  # whatever a handler did not take
                self._send(sock, response, fds)
        except OSError as exc:  # the peer is gone (ECONNRESET, EPIPE, ...): same as EOF
            log.debug("connection of %r ended: %s", session, exc)
        except Exception:
            log.exception("connection of %r failed", session)
        finally:
            with self._lock:
                self._connections.pop(sock, None)
            sock.close()
            receiver.close()
            try:
                self.agent.close_session(session)
            except Exception:
                log.exception("releasing the attachments of %r failed", session)

    def handle(self, session: Session, request: local_pb2.LocalRequest, fds=None):
        """The response to one request and the fds to send with it.

        ``fds`` (a list) came with the request; a handler that keeps one removes it.
        """
        response = local_pb2.LocalResponse(id=request.id)
        body = request.WhichOneof("body")
        try:
            if request.id == 0:
                raise InvalidArgument("request id must not be 0")
            handler = self._handlers.get(body)
            if handler is None:
                raise Unimplemented("unknown or empty request" if body is None
                                    else f"unknown request {body}")
            if body == "register_faults":
                return response, handler(session, request.register_faults, response,
                                         fds if fds is not None else [])
            return response, handler(session, getattr(request, body), response)
        except VasError as exc:
            failed = local_pb2.LocalResponse(id=request.id, code=exc.code.value[0],
                                             message=_one_line(exc.message))
        except Exception as exc:
            log.exception("request %s of %r failed", body, session)
            failed = local_pb2.LocalResponse(
                id=request.id, code=_INTERNAL,
                message=_one_line(f"internal error in {body}: {type(exc).__name__}: {exc}"))
        return failed, []

    def _send(self, sock: socket.socket, response: local_pb2.LocalResponse, fds) -> None:
        try:
            wire.send_message(sock, response, fds)
        except (ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno != errno.EMSGSIZE:
                raise
            # Too big for one datagram (a huge listing page): say so instead.
            wire.send_message(sock, local_pb2.LocalResponse(
                id=response.id, code=_INVALID_ARGUMENT,
                message=f"response of {response.ByteSize()} bytes is too large for the local "
                        "socket; ask for a smaller page_size"))
        finally:
            _close_fds(fds)

