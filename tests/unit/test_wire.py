"""vas.core.wire: the framing of the local protocol, over a real SEQPACKET socket pair."""
from __future__ import annotations

import array
import os
import socket

import pytest

from vas.core import wire
from vas.proto import local_pb2


@pytest.fixture
def pair():
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (here, there):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wire.SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wire.SOCKET_BUFFER)
    yield here, there
    here.close()
    there.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_inbox_receives_each_message_and_its_fds(pair):
    here, there = pair
    inbox = wire.Inbox()
    memfd = os.memfd_create("wire-test")
    try:
        big = local_pb2.LocalResponse(id=2, message="y" * (1 << 20))
        wire.send_message(here, local_pb2.LocalResponse(id=1, message="x"), [memfd])
        wire.send_message(here, big)
        data, fds = inbox.receive(there)
        first = local_pb2.LocalResponse.FromString(bytes(data))
        assert (first.id, first.message, len(fds)) == (1, "x", 1)
        assert os.fstat(fds[0]).st_ino == os.fstat(memfd).st_ino  # the same file
        os.close(fds[0])
        data, fds = inbox.receive(there)  # the same buffer, a larger message
        assert local_pb2.LocalResponse.FromString(bytes(data)) == big and fds == []
        here.close()
        assert inbox.receive(there) == (None, [])  # EOF
    finally:
        os.close(memfd)
        inbox.close()


def test_inbox_refuses_an_oversized_datagram_and_closes_its_fds(pair):
    here, there = pair
    inbox = wire.Inbox()
    memfd = os.memfd_create("wire-test")
    try:
        before = open_fds()
        here.sendmsg([b"z" * (wire.MAX_MESSAGE + 1)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd]))])
        with pytest.raises(ValueError, match="larger than 4 MiB"):
            inbox.receive(there)
        assert open_fds() == before  # the fd that came with it was closed
    finally:
        os.close(memfd)
        inbox.close()


def test_inbox_does_not_block_when_asked_not_to(pair):
    inbox = wire.Inbox()
    try:
        with pytest.raises(BlockingIOError):
            inbox.receive(pair[1], socket.MSG_DONTWAIT)
    finally:
        inbox.close()


def test_receive_message_parses_and_refuses_what_is_not_one(pair):
    here, there = pair
    inbox = wire.Inbox()
    memfd = os.memfd_create("wire-test")
    try:
        wire.send_message(here, local_pb2.LocalResponse(id=7, code=5, message="gone"))
        response, fds = inbox.receive_message(there, local_pb2.LocalResponse)
        assert (response.id, response.code, response.message, fds) == (7, 5, "gone", [])
        before = open_fds()
        here.sendmsg([b"\xff\xff\xff\xff"],  # an invalid field tag: not a LocalResponse
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd]))])
        with pytest.raises(ValueError, match="not a LocalResponse"):
            inbox.receive_message(there, local_pb2.LocalResponse)
        assert open_fds() == before  # the fd that came with it was closed
        here.close()
        assert inbox.receive_message(there, local_pb2.LocalResponse) == (None, [])
    finally:
        os.close(memfd)
        inbox.close()


def test_inbox_names_the_sender_when_the_socket_passes_credentials(pair):
    here, there = pair
    inbox = wire.Inbox()
    try:
        wire.send_message(here, local_pb2.LocalResponse(id=1))
        inbox.receive(there)
        assert inbox.sender is None  # no SO_PASSCRED: the kernel does not say
        there.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        memfd = os.memfd_create("wire-test")
        try:
            wire.send_message(here, local_pb2.LocalResponse(id=2), [memfd])
            data, fds = inbox.receive(there)  # credentials and fds side by side
            assert inbox.sender == os.getpid() and len(fds) == 1
            os.close(fds[0])
        finally:
            os.close(memfd)
    finally:
        inbox.close()
