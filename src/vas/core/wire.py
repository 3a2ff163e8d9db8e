"""Framing of the local protocol (proto/vas/v1/local.proto) on a Unix socket.

The socket is SOCK_SEQPACKET, so one datagram is exactly one serialized
message and file descriptors ride along as SCM_RIGHTS ancillary data. Both
the client (vas.connection) and the agent (vas.node) use these two functions.
"""
from __future__ import annotations

import array
import os
import socket

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
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
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


def recv_message(sock: socket.socket, message_type):
    """Receive one message of ``message_type`` and the fds sent with it.

    Returns ``(message, fds)``, or ``(None, [])`` when the peer closed the socket.
    The caller owns (and must close) the returned fds.
    """
    # Peek the datagram's real size first: a fresh MAX_MESSAGE buffer per receive
    # would cost more than the whole request on the attach path.
    size = sock.recv_into(_PEEK_BYTE, 1, _PEEK_SIZE)
    data, ancdata, flags, _ = sock.recvmsg(min(max(size, 1), MAX_MESSAGE + 1), _ANCILLARY_SPACE)
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fd_array = array.array("i")
            fd_array.frombytes(payload[: len(payload) - len(payload) % fd_array.itemsize])
            fds.extend(fd_array)
    if not data:
        for fd in fds:
            _close_quietly(fd)
        return None, []
    if flags & _TRUNCATED or len(data) > MAX_MESSAGE:
        for fd in fds:
            _close_quietly(fd)
        raise ValueError("local message truncated")
    message = message_type()
    message.ParseFromString(data)
    return message, fds


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
