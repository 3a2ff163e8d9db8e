"""The bulk channel (node/bulk.py) under hostile peers: garbage and truncated headers,
bad magic, huge offsets and lengths, unknown segment ids, several requests on one
connection; and its per-peer connection limit.

A reply is a status from fuzzkit.EXPECTED_CODES (then, on OK, exactly the canary's
bytes) or a clean close; after each test the agents serve and the canary is intact.
"""
from __future__ import annotations

import contextlib
import socket

import grpc
import pytest
from hypothesis import given, strategies as st

import strategies as s
from fuzzkit import CALL_TIMEOUT, CANARY_SIZE, EXPECTED_CODES, SENT, examples
from vas.node import bulk
from vas.proto import node_pb2
from waiting import wait_for

_CODES = {code.value[0] for code in EXPECTED_CODES}


def bulk_address(fuzzed) -> tuple[str, int]:
    """The bulk listener of node1, the canary's home (node2's serves the same code)."""
    opened = fuzzed.nodes[0].OpenBulk(node_pb2.OpenBulkRequest(id=fuzzed.canary.id),
                                          timeout=CALL_TIMEOUT)
    host, _, port = opened.address.rpartition(":")
    return host, int(port)


@contextlib.contextmanager
def connected(address):
    conn = socket.create_connection(address, timeout=CALL_TIMEOUT)
    try:
        yield conn
    finally:
        conn.close()


def recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None if the agent closed the connection first."""
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_reply(conn: socket.socket) -> tuple[int, str] | None:
    """(status, message) of one reply, or None at a clean close."""
    header = recv_exact(conn, bulk._REPLY.size)
    if header is None:
        return None
    magic, code, size = bulk._REPLY.unpack(header)
    assert magic == bulk.MAGIC and size <= 4096, header
    message = recv_exact(conn, size)
    assert message is not None, "closed inside a reply"
    return code, message.decode()


def request(conn, fuzzed, magic: bytes, segment_id: int, offset: int, length: int) -> bool:
    """Send one request and check its reply; False once the agent closed the connection."""
    SENT["bulk.request"] += 1
    conn.sendall(bulk._REQUEST.pack(magic, segment_id, offset, length))
    reply = read_reply(conn)
    if reply is None:
        return False
    code, message = reply
    assert code in _CODES, (code, message)
    if magic != bulk.MAGIC:
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0], message
        return read_reply(conn) is None  # then it closes
    if code == 0:
        data = recv_exact(conn, length)
        assert data is not None and len(data) == length
        if segment_id == fuzzed.canary.id:  # its bytes, then zeros up to the page end
            pages = fuzzed.canary_bytes.ljust(fuzzed.canary.size, b"\0")
            assert data == pages[offset:offset + length]
    return True


_SEGMENT_IDS = st.one_of(s.u64, st.integers(1, 64))
_OFFSETS = st.one_of(s.u64, st.integers(0, 4 * 4096))
_MAGICS = st.one_of(st.just(bulk.MAGIC), st.binary(min_size=8, max_size=8))


@examples(60)
@given(data=st.data())
def test_requests(fuzzed, data):
    """Several requests on one connection: random ids (the canary's often), ranges from
    inside to far outside, sometimes a bad magic (which ends the connection)."""
    with connected(bulk_address(fuzzed)) as conn:
        for _ in range(data.draw(st.integers(1, 5))):
            segment_id = data.draw(st.one_of(st.just(fuzzed.canary.id), _SEGMENT_IDS))
            if not request(conn, fuzzed, data.draw(_MAGICS), segment_id,
                           data.draw(_OFFSETS), data.draw(_OFFSETS)):
                break


_RUNS = st.lists(st.tuples(_OFFSETS, st.integers(0, 8192)), max_size=4)


@examples(40)
@given(data=st.data())
def test_write_requests_never_publish(fuzzed, data):
    """Write requests (VASWRITE) with random or well-formed headers (the canary's id, any
    token: none is current), random runs and bytes: each answered with an error status
    and nothing published (the canary check after the test), or a clean close."""
    segment_id = data.draw(st.one_of(st.just(fuzzed.canary.id), _SEGMENT_IDS))
    header = data.draw(st.one_of(st.binary(max_size=64), st.builds(
        lambda token, lease: node_pb2.WritePagesHeader(
            name=fuzzed.canary.name, id=segment_id, token=token,
            lease_id=lease).SerializeToString(), s.i64, s.i64)))  # both int64 fields
    runs = data.draw(_RUNS)
    SENT["bulk.write"] += 1
    with connected(bulk_address(fuzzed)) as conn:
        conn.sendall(bulk._REQUEST.pack(bulk.WRITE_MAGIC, segment_id, len(header), len(runs))
                     + header + b"".join(bulk._RUN.pack(*run) for run in runs)
                     + bytes(sum(length for _, length in runs)))
        reply = read_reply(conn)
        assert reply is None or (reply[0] in _CODES and reply[0] != 0), reply


@examples(40)
@given(header=st.binary(max_size=bulk._REQUEST.size - 1))
def test_truncated_header_is_a_clean_close(fuzzed, header):
    """Fewer bytes than a header, then our write side closed: the agent closes too."""
    SENT["bulk.truncated"] += 1
    with connected(bulk_address(fuzzed)) as conn:
        conn.sendall(header)
        conn.shutdown(socket.SHUT_WR)
        assert read_reply(conn) is None


def test_bad_magic_is_invalid_argument(fuzzed):
    with connected(bulk_address(fuzzed)) as conn:
        conn.sendall(bulk._REQUEST.pack(b"GET / HT", 1, 0, 4096))
        code, message = read_reply(conn)
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert message == ("not a bulk request: magic b'GET / HT', expected b'VASBULK1', "
                           "b'VASRELAY' or b'VASWRITE'")
        assert read_reply(conn) is None


@pytest.mark.parametrize("offset, length, words", [
    ((1 << 64) - 1, 2, "is outside the segment"),  # offset + length overflows 64 bits
    (0, (1 << 63), "is outside the segment"),
    (0, 0, "invalid length 0"),
])
def test_out_of_range_keeps_the_connection(fuzzed, offset, length, words):
    with connected(bulk_address(fuzzed)) as conn:
        conn.sendall(bulk._REQUEST.pack(bulk.MAGIC, fuzzed.canary.id, offset, length))
        code, message = read_reply(conn)
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and words in message, message
        assert request(conn, fuzzed, bulk.MAGIC, fuzzed.canary.id, 0, CANARY_SIZE)


def test_connections_per_peer_are_limited(fuzzed):
    """Past --max-bulk-per-peer (32) a connection is answered RESOURCE_EXHAUSTED naming
    the flag and closed; once one closes, a new one is served."""
    address = bulk_address(fuzzed)
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connected(address)) for _ in range(32)]
        for conn in held:  # each served: a thread of the agent's holds it
            assert request(conn, fuzzed, bulk.MAGIC, fuzzed.canary.id, 0, 4096)
        with connected(address) as extra:
            code, message = read_reply(extra)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert message == ("peer 127.0.0.1 has 32 bulk connections to this agent, the "
                               "most allowed (--max-bulk-per-peer)")
            assert read_reply(extra) is None
        held[0].close()
        SENT["bulk.limit"] += 34

        def served() -> bool:
            with connected(address) as again:
                again.sendall(bulk._REQUEST.pack(bulk.MAGIC, fuzzed.canary.id, 0, 1))
                code, _ = read_reply(again)
                return code == 0
        wait_for(served, "a connection to be served again", timeout=CALL_TIMEOUT)

