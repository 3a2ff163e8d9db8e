"""Write requests of the bulk channel (node/bulk.py ``VASWRITE``): a real ``BulkServer``
on loopback whose ``write_sink`` records what it was handed, and ``Channel.write``
sending runs of a memfd with sendfile.

The sink stands for the agent's (``Agent.bulk_write``, tested end to end in
tests/integration/test_publish.py): here only the framing is checked: the runs'
bytes arrive whole and in order (sha256), a connection cut mid-bytes never reaches
a publish, a refusal comes back as the home's error, and a dead listener is a
``WriteFailed`` (the writer's agent then uses WritePages).
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest

from vas.core.errors import PermissionDenied
from vas.node import bulk
from vas.node import store as store_mod
from waiting import wait_for

SIZE = 4 << 20
SEGMENT = 7
TIMEOUT = 5.0


@pytest.fixture
def home():
    """(server, memfd holding random bytes, those bytes, what the sink was handed)."""
    data = os.urandom(SIZE)
    fd, ro_fd = store_mod.allocate("write", SIZE)
    os.pwrite(fd, data, 0)
    handed: dict = {"published": [], "refuse": None, "tried": 0}

    def sink(segment_id, header, runs, peer, receive):
        handed["tried"] += 1
        if handed["refuse"] is not None:
            raise handed["refuse"]
        received = bytes(receive(sum(length for _, length in runs)))
        handed["published"].append((segment_id, header, runs, received))
        return b"the new record"

    server = bulk.BulkServer("127.0.0.1", lambda *a: os.dup(fd), TIMEOUT, per_peer=32,
                             write_sink=sink)
    server.start()
    yield server, fd, data, handed
    server.close()
    store_mod.release(fd, ro_fd, SIZE)


def test_runs_arrive_whole_and_in_order(home):
    server, fd, data, handed = home
    channel = bulk.Channel(f"127.0.0.1:{server.port}", TIMEOUT)
    runs = [(3 << 20, 1 << 20), (4096, 300_000), (0, 5)]
    try:
        for _ in range(2):  # the second on the kept connection (and receive buffer)
            assert channel.write(SEGMENT, b"header", runs, fd, TIMEOUT) == b"the new record"
        assert channel.write(SEGMENT, b"empty", [], fd, TIMEOUT) == b"the new record"
    finally:
        channel.close()
    expected = b"".join(data[offset:offset + length] for offset, length in runs)
    for segment_id, header, got_runs, got in handed["published"][:2]:
        assert (segment_id, header, got_runs) == (SEGMENT, b"header", runs)
        assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    assert handed["published"][2] == (SEGMENT, b"empty", [], b"")


def test_a_connection_cut_mid_bytes_publishes_nothing(home):
    server, _, _, handed = home
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as conn:
        conn.sendall(struct.pack("<8sQQQ", bulk.WRITE_MAGIC, SEGMENT, 6, 1) + b"header"
                     + struct.pack("<QQ", 0, 1 << 20) + os.urandom(100_000))
    wait_for(lambda: handed["tried"] == 1, "the sink to be called", timeout=TIMEOUT)
    assert handed["published"] == []


def test_a_refusal_is_the_homes_error_and_a_dead_listener_a_write_failure(home):
    server, fd, _, handed = home
    handed["refuse"] = PermissionDenied("permission denied: user 65534 may not write")
    channel = bulk.Channel(f"127.0.0.1:{server.port}", TIMEOUT)
    try:
        with pytest.raises(PermissionDenied, match="may not write"):
            channel.write(SEGMENT, b"header", [(0, 4096)], fd, TIMEOUT)
        server.close()
        with pytest.raises(bulk.WriteFailed):
            channel.write(SEGMENT, b"header", [(0, 4096)], fd, TIMEOUT)
    finally:
        channel.close()
    assert handed["published"] == []


def test_an_oversized_request_is_refused_before_any_read():
    server = bulk.BulkServer("127.0.0.1", lambda *a: -1, TIMEOUT, per_peer=4,
                             write_sink=lambda *a: pytest.fail("sink called"))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as conn:
            conn.sendall(struct.pack("<8sQQQ", bulk.WRITE_MAGIC, SEGMENT, 1 << 40, 1))
            magic, code, size = struct.unpack("<8sIQ", conn.recv(20, socket.MSG_WAITALL))
            assert (magic, code) == (bulk.MAGIC, 3)  # INVALID_ARGUMENT
            assert b"at most" in conn.recv(size, socket.MSG_WAITALL)
            assert conn.recv(1) == b""  # closed: its framing cannot be trusted
    finally:
        server.close()
