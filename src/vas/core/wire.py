"""Framing of the local protocol (proto/vas/v1/local.proto) on a Unix socket.

The socket is SOCK_SEQPACKET, so one datagram is exactly one serialized
message and file descriptors ride along as SCM_RIGHTS ancillary data. Both
the client (vas.connection) and the agent (vas.node) use ``send_message`` and
receive into an ``Inbox`` (``recv_message`` for one-off receives, as in tests).
"""
from __future__ import annotations

import array
import mmap
import os
import socket
import struct

from google.protobuf.message import DecodeError

from vas.core.sizes import human_size

#: Largest message either side sends or accepts.
MAX_MESSAGE = 4 << 20
#: Most file descriptors one message may carry.
MAX_FDS = 8
#: Socket buffer size that lets MAX_MESSAGE datagrams through.
SOCKET_BUFFER = MAX_MESSAGE + 65536

# Plain ints: flag-enum arithmetic costs microseconds per message.
_PEEK_SIZE = int(socket.MSG_PEEK | socket.MSG_TRUNC)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
#: struct ucred (pid, uid, gid): SO_PEERCRED's value and SCM_CREDENTIALS' payload.
UCRED = struct.Struct("3i")
# Room for the fds and for the sender's credentials (SCM_CREDENTIALS), which the
# kernel adds to every datagram sent to or from a socket with SO_PASSCRED (the agent's).
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(UCRED.size)
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
_SCM_CREDENTIALS = int(socket.SCM_CREDENTIALS)
_PEEK_BYTE = bytearray(1)


def new_socket() -> socket.socket:
    """A SOCK_SEQPACKET Unix socket with buffers big enough for MAX_MESSAGE."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return sock


def send_message(sock: socket.socket, message, fds=()) -> None:
    """Send one protobuf ``message`` (never empty: requests carry an id) with ``fds``."""
    data = message.SerializeToString()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {human_size(len(data))} exceeds the "
                         f"{human_size(MAX_MESSAGE)} limit")
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


class TooLarge(ValueError):
    """A datagram larger than MAX_MESSAGE (its fds closed)."""


class Malformed(ValueError):
    """A datagram that does not parse as the message type asked for (its fds closed)."""


class Inbox:
    """A receive buffer reused for every datagram of its owner: one ``recvmsg_into``
    per message, no size peek, nothing allocated for the bytes.

    An anonymous mapping of MAX_MESSAGE + 1 bytes (one more, so that an oversized
    datagram shows as truncated): its pages cost nothing until a large message
    touches them. A fresh MAX_MESSAGE buffer per receive cost 15-60 us on the 2-CPU
    development VM; peeking the size first (``recv_message``) one more syscall,
    ~2 us a message. Not thread-safe: one receive at a time, and what it returns
    is valid only until the next one (parse it first).
    """

    def __init__(self):
        self._buffer = mmap.mmap(-1, MAX_MESSAGE + 1)
        self._view = memoryview(self._buffer)
        self._views = [self._view]
        #: The pid that sent the last datagram received, as the kernel told it
        #: (SCM_CREDENTIALS: the receiving socket has SO_PASSCRED), else None.
        self.sender: int | None = None

    def receive(self, sock: socket.socket, flags: int = 0) -> tuple[memoryview | None, list[int]]:
        """(the datagram's bytes, or None at EOF; the fds that came with it: the caller
        owns them). Raises ``TooLarge`` (its fds closed) for a datagram larger
        than MAX_MESSAGE, and what ``recvmsg_into`` raises (``flags``: MSG_DONTWAIT)."""
        size, ancdata, msg_flags, _ = sock.recvmsg_into(self._views, _ANCILLARY_SPACE, flags)
        fds, self.sender = _ancillary(ancdata) if ancdata else ([], None)
        if not size:
            close_quietly(fds)
            return None, []
        if msg_flags & _TRUNCATED or size > MAX_MESSAGE:
            close_quietly(fds)
            raise TooLarge(f"larger than {human_size(MAX_MESSAGE)}")
        return self._view[:size], fds

    def receive_message(self, sock: socket.socket, message_type, flags: int = 0):
        """``receive``, parsed: (a ``message_type``, or None at EOF; the fds). Raises
        ``TooLarge`` or ``Malformed`` (both ValueErrors; its fds closed) for a datagram
        too large or not a ``message_type``."""
        data, fds = self.receive(sock, flags)
        if data is None:
            return None, []
        message = message_type()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            close_quietly(fds)
            raise Malformed(f"not a {message_type.DESCRIPTOR.name} ({exc})") from exc
        return message, fds

    def close(self) -> None:
        """Unmap the buffer (at once, or when the last slice still alive goes)."""
        try:
            self._view.release()
            self._buffer.close()
        except BufferError:  # a slice still alive somewhere: the GC unmaps it later
            pass


def _ancillary(ancdata) -> tuple[list[int], int | None]:
    """(the fds of SCM_RIGHTS, the sender's pid of SCM_CREDENTIALS or None) of a
    datagram's ancillary data."""
    fds: list[int] = []
    sender = None
    for level, kind, payload in ancdata:
        if level != _SOL_SOCKET:
            continue
        if kind == _SCM_RIGHTS:
            fd_array = array.array("i")
            fd_array.frombytes(payload[: len(payload) - len(payload) % fd_array.itemsize])
            fds.extend(fd_array)
        elif kind == _SCM_CREDENTIALS and len(payload) >= UCRED.size:
            sender = UCRED.unpack_from(payload)[0]
    return fds, sender


def close_quietly(fds) -> None:
    """Close every fd of ``fds``, ignoring errors."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_message(sock: socket.socket, message_type):
    """Receive one message of ``message_type`` and the fds sent with it, without an
    ``Inbox`` (a few bytes allocated per message: for one-off receives).

    Returns ``(message, fds)``, or ``(None, [])`` when the peer closed the socket.
    The caller owns (and must close) the returned fds.
    """
    # Peek the datagram's real size first: a fresh MAX_MESSAGE buffer per receive
    # would cost more than the whole request on the attach path.
    size = sock.recv_into(_PEEK_BYTE, 1, _PEEK_SIZE)
    data, ancdata, flags, _ = sock.recvmsg(min(max(size, 1), MAX_MESSAGE + 1), _ANCILLARY_SPACE)
    fds, _ = _ancillary(ancdata)
    if not data:
        close_quietly(fds)
        return None, []
    if flags & _TRUNCATED or len(data) > MAX_MESSAGE:
        close_quietly(fds)
        raise ValueError("local message truncated")
    message = message_type()
    message.ParseFromString(data)
    return message, fds
