"""The agent's side of the local protocol's framing: datagrams in, responses out.

``Receiver`` turns one datagram into a ``LocalRequest`` and its fds (or
``BadRequest``); ``Responder`` runs a request through its handler
(node/localapi.py) and turns the outcome into a ``LocalResponse``: a
``vas.core.errors`` exception becomes its status code and one-line message, any
other exception INTERNAL (traceback in the log); ``send`` sends it with its
fds. node/local.py moves the datagrams; this module decides what they say.
"""
from __future__ import annotations

import errno
import logging
import socket

from vas.core import wire
from vas.core.wire import close_quietly as close_fds
from vas.core.errors import InvalidArgument, PermissionDenied, VasError
from vas.core.sizes import human_size
from vas.node.localapi import LocalApi, Unimplemented, one_line
from vas.node.sessions import Session
from vas.proto import local_pb2

log = logging.getLogger(__name__)

_DONTWAIT = int(socket.MSG_DONTWAIT)  # a plain int: enum.Flag arithmetic costs ~2 us
_INTERNAL = 13            # grpc.StatusCode.INTERNAL
INVALID_ARGUMENT = 3      # grpc.StatusCode.INVALID_ARGUMENT


class BadRequest(Exception):
    """A datagram that is not a LocalRequest; answered with id 0."""


def unanswered(request: local_pb2.LocalRequest) -> bool:
    """Whether ``request`` asks for no response: a Detach with ``no_reply`` (the only
    request that may: nothing the client does next depends on its outcome)."""
    return request.WhichOneof("body") == "detach" and request.detach.no_reply


def _foreign(session: Session, sender: int | None) -> PermissionDenied:
    """Why a request sent by another process than the connection's opener is refused.
    Why check: the opener's identity (SO_PEERCRED at accept) decides what a request
    may do, and WriteFrom reads the opener's memory; a socket inherited across fork,
    or passed to another process, must not carry it."""
    who = "a sender the kernel did not name" if sender is None else f"pid {sender}"
    return PermissionDenied(f"request from {who} on a connection opened by pid {session.pid}: "
                            "a connection serves only the process that opened it; connect "
                            "from this process")


class Receiver:
    """Receives requests (the event loop's: one at a time, from any connection).

    The framing is vas.wire's, into one ``wire.Inbox`` per local thread, reused
    across requests and connections (the request is parsed before the next
    receive); and fds sent along with garbage are closed at once (the agent takes
    an fd only with RegisterFaults).
    """

    def __init__(self):
        self._inbox = wire.Inbox()

    def close(self) -> None:
        self._inbox.close()

    @property
    def sender(self) -> int | None:
        """The pid that sent the request last received (None: the kernel did not say)."""
        return self._inbox.sender

    def receive(self, sock: socket.socket) -> tuple[local_pb2.LocalRequest | None, list[int]]:
        """(one request or None at EOF, the fds that came with it; the caller closes them).

        Never blocks (BlockingIOError when nothing is there); raises BadRequest for a
        datagram that is not a request (its fds closed).
        """
        try:
            return self._inbox.receive_message(sock, local_pb2.LocalRequest, _DONTWAIT)
        except wire.TooLarge as exc:
            raise BadRequest(f"request {exc}") from exc
        except wire.Malformed as exc:
            raise BadRequest(one_line(f"malformed request: {exc}")) from exc


class Responder:
    """Runs requests through the handlers of ``api`` into responses, and sends them."""

    def __init__(self, api: LocalApi):
        self._handlers = api.handlers

    @staticmethod
    def bad(exc: BadRequest) -> local_pb2.LocalResponse:
        """The answer to a datagram that is not a request (id 0: it has none)."""
        return local_pb2.LocalResponse(id=0, code=INVALID_ARGUMENT, message=str(exc))

    def handle(self, session: Session, request: local_pb2.LocalRequest, fds=None,
               sender: int | None = None):
        """The response to one request and the fds to send with it.

        ``fds`` (a list) came with the request; a handler that keeps one removes it.
        ``sender``: the pid that sent it (SCM_CREDENTIALS); a request from any process
        but the connection's opener is refused (PermissionDenied).
        """
        response = local_pb2.LocalResponse(id=request.id)
        body = request.WhichOneof("body")
        try:
            if request.id == 0:
                raise InvalidArgument("request id must not be 0")
            if sender != session.pid:
                raise _foreign(session, sender)
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
                                             message=one_line(exc.message))
        except Exception as exc:
            log.exception("request %s of %r failed", body, session)
            failed = local_pb2.LocalResponse(
                id=request.id, code=_INTERNAL,
                message=one_line(f"internal error in {body}: {type(exc).__name__}: {exc}"))
        return failed, []

    def send(self, sock: socket.socket, response: local_pb2.LocalResponse, fds) -> None:
        try:
            wire.send_message(sock, response, fds)
        except (ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno != errno.EMSGSIZE:
                raise
            # Too big for one datagram (a huge listing page): say so instead.
            wire.send_message(sock, local_pb2.LocalResponse(
                id=response.id, code=INVALID_ARGUMENT,
                message=f"response of {human_size(response.ByteSize())} is too large for the local "
                        "socket; ask for a smaller page_size"))
        finally:
            close_fds(fds)
