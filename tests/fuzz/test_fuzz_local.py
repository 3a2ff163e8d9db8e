"""The local socket protocol under hostile clients: garbage and truncated datagrams,
huge length prefixes inside the protobuf, oversized datagrams, random requests, fds
where none belong, fds of the wrong kind where a userfaultfd belongs, too many fds.

Every datagram gets a LocalResponse with a precise code (never INTERNAL or UNKNOWN)
or a clean close; after each example a second connection (the "witness") still gets
its Hello answered, and after each fd test the agent holds no more fds than before.
"""
from __future__ import annotations

import array
import contextlib
import math
import os
import socket

import grpc
import pytest
from hypothesis import given, strategies as st

import strategies as s
from fuzzkit import CALL_TIMEOUT, EXPECTED_CODES, SENT, examples
from vas.core import wire
from vas.core.defaults import DEFAULT_MAX_CONNECTIONS_PER_UID
from vas.core.sizes import human_size
from vas.node.localwire import unanswered
from vas.proto import LOCAL_PROTOCOL, local_pb2
from waiting import wait_for

#: Codes a local reply may carry: the gRPC ones, and UNIMPLEMENTED for a request body
#: this agent does not know (an empty one included).
LOCAL_CODES = {code.value[0] for code in EXPECTED_CODES} | {
    grpc.StatusCode.UNIMPLEMENTED.value[0]}
#: A varint of 2**62: a length prefix no datagram can honour.
_HUGE_VARINT = bytes([0x80] * 8 + [0x40])


@contextlib.contextmanager
def connected(path: str):
    sock = wire.new_socket()
    try:
        # Connected blocking: with a timeout set, a full listen backlog (hundreds of
        # connections at once) fails with EAGAIN instead of waiting for the accept.
        sock.connect(path)
        sock.settimeout(CALL_TIMEOUT)  # the deadline of every exchange: a hang fails the test
        yield sock
    finally:
        sock.close()


def exchange(path: str, target: str, datagram: bytes, fds=()) -> None:
    """Send one datagram (with ``fds``) on a fresh connection; assert a precise reply
    or a clean close; close any fds that came back."""
    SENT[target] += 1
    with connected(path) as sock:
        if fds:
            sock.sendmsg([datagram], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", fds))])
        else:
            sock.send(datagram)
        if not datagram:  # an empty datagram reads as EOF: the agent just closes
            assert sock.recv(1) == b""
            return
        reply, back = wire.recv_message(sock, local_pb2.LocalResponse)
        for fd in back:
            os.close(fd)
    assert reply is None or reply.code in LOCAL_CODES, f"{target}: {reply}"


def assert_serving(fuzzed) -> None:
    """The witness: a new connection's Hello is answered."""
    with connected(fuzzed.local.nodes[0].socket) as sock:
        wire.send_message(sock, local_pb2.LocalRequest(
            id=1, hello=local_pb2.HelloRequest(protocol=LOCAL_PROTOCOL)))
        reply, _ = wire.recv_message(sock, local_pb2.LocalResponse)
    assert reply is not None and reply.code == 0, reply


def agent_fds(fuzzed) -> int:
    return len(os.listdir(f"/proc/{fuzzed.local.nodes[0].pid}/fd"))


def hello_bytes(request_id: int = 7) -> bytes:
    return local_pb2.LocalRequest(
        id=request_id, hello=local_pb2.HelloRequest(protocol=LOCAL_PROTOCOL)
    ).SerializeToString()


@examples(80)
@given(kind=st.sampled_from(["garbage", "truncated", "huge-length", "empty"]),
       blob=st.binary(max_size=200), cut=st.integers(0, 200))
def test_malformed_datagrams(fuzzed, kind, blob, cut):
    valid = local_pb2.LocalRequest(
        id=3, create=local_pb2.CreateRequest(name="fuzz-local", size=4096, mode=0o600,
                                             meta={"k": "v"})).SerializeToString()
    datagram = {
        "garbage": blob,
        "truncated": valid[:cut % max(1, len(valid))] or b"\x08",
        # Field 3 (create), length-delimited, announcing 2**62 bytes.
        "huge-length": b"\x08\x01\x1a" + _HUGE_VARINT + blob,
        "empty": b"",
    }[kind]
    exchange(fuzzed.local.nodes[0].socket, f"local.{kind}", datagram)
    assert_serving(fuzzed)


def test_oversized_datagram_gets_invalid_argument(fuzzed):
    """One byte over wire.MAX_MESSAGE: refused with id 0, the connection still usable."""
    SENT["local.oversize"] += 1
    with connected(fuzzed.local.nodes[0].socket) as sock:
        sock.send(b"\x08\x01" + b"\0" * (wire.MAX_MESSAGE - 1))
        reply, _ = wire.recv_message(sock, local_pb2.LocalResponse)
        assert (reply.id, reply.code) == (0, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert reply.message == f"request larger than {human_size(wire.MAX_MESSAGE)}"
        sock.send(hello_bytes())
        again, _ = wire.recv_message(sock, local_pb2.LocalResponse)
    assert again.code == 0 and again.id == 7


def _tame_waits(request: local_pb2.LocalRequest) -> local_pb2.LocalRequest:
    """A Wait may block as long as its timeout says (0: for ever) if the random
    attachment id happens to exist: keep only timeouts that fail or end quickly."""
    if request.WhichOneof("body") == "wait":
        timeout = request.wait.timeout_seconds
        if not (timeout < 0 or timeout > 86400 or math.isnan(timeout)):
            request.wait.timeout_seconds = 0.05
    return request


@examples(120)
@given(requests=st.lists(s.message(local_pb2.LocalRequest).map(_tame_waits),
                         min_size=1, max_size=4),
       node=st.integers(0, 1))
def test_random_requests(fuzzed, requests, node):
    """Random requests, several on one connection (any body, any field, ids included;
    a Detach with ``no_reply`` gets no answer, the next request still does); then the
    connection is closed, which releases whatever they attached."""
    SENT["local.request"] += len(requests)
    with connected(fuzzed.local.nodes[node].socket) as sock:
        for request in requests:
            wire.send_message(sock, request)
            if unanswered(request):  # a Detach with no_reply: nothing comes back
                continue
            reply, back = wire.recv_message(sock, local_pb2.LocalResponse)
            for fd in back:
                os.close(fd)
            if reply is None:
                break
            assert reply.code in LOCAL_CODES, f"{request} -> {reply}"
    assert_serving(fuzzed)


@contextlib.contextmanager
def fds_of(kinds: list[str], workdir: str):
    """Open one fd of each kind; close them all on leaving."""
    opened: list[int] = []
    try:
        for kind in kinds:
            if kind == "pipe":
                opened.extend(os.pipe())
            elif kind == "socket":
                opened.extend(s_.detach() for s_ in socket.socketpair())
            elif kind == "devnull":
                opened.append(os.open(os.devnull, os.O_RDWR))
            elif kind == "directory":
                opened.append(os.open(workdir, os.O_RDONLY | os.O_DIRECTORY))
            elif kind == "file":
                opened.append(os.open(os.path.join(workdir, "f"), os.O_RDWR | os.O_CREAT))
            elif kind == "memfd":
                opened.append(os.memfd_create("fuzz"))
        yield opened
    finally:
        for fd in opened:
            os.close(fd)


FD_KINDS = st.lists(st.sampled_from(["pipe", "socket", "devnull", "directory", "file",
                                     "memfd"]), min_size=1, max_size=6)


@examples(60)
@given(kinds=FD_KINDS, body=st.sampled_from(["hello", "register_faults", "attach",
                                            "garbage"]))
def test_fds_where_none_or_other_kinds_belong(fuzzed, tmp_path_factory, kinds, body):
    """Fds with a request that takes none, or of the wrong kind (or too many) with the
    one that takes a userfaultfd: a precise error, and every fd closed by the agent."""
    workdir = str(tmp_path_factory.getbasetemp())
    datagram = {
        "hello": hello_bytes(),
        "register_faults": local_pb2.LocalRequest(id=5, register_faults=local_pb2.
                                                  RegisterFaultsRequest(attachment_id=1,
                                                                        address=1 << 30,
                                                                        size=4096)
                                                  ).SerializeToString(),
        "attach": local_pb2.LocalRequest(id=6, attach=local_pb2.AttachRequest(
            name="fuzz-victim", mode="r")).SerializeToString(),
        "garbage": b"\xff\xff\xff",
    }[body]
    before = agent_fds(fuzzed)
    with fds_of(kinds, workdir) as fds:
        exchange(fuzzed.local.nodes[0].socket, f"local.fds-{body}", datagram, fds[:wire.MAX_FDS])
    # The agent closes received fds before answering, and the connection's own at EOF.
    wait_for(lambda: agent_fds(fuzzed) <= before, "the agent to close the fds it was sent",
             timeout=CALL_TIMEOUT)
    assert_serving(fuzzed)


def test_too_many_fds_are_dropped_not_leaked(fuzzed, tmp_path):
    """More fds than wire.MAX_FDS: the kernel truncates the control data; the agent
    answers and keeps none of them."""
    before = agent_fds(fuzzed)
    with fds_of(["devnull"] * (wire.MAX_FDS + 8), str(tmp_path)) as fds:
        exchange(fuzzed.local.nodes[0].socket, "local.fds-too-many", hello_bytes(), fds)
    wait_for(lambda: agent_fds(fuzzed) <= before, "the agent to drop the extra fds",
             timeout=CALL_TIMEOUT)


@pytest.mark.parametrize("kind, words", [
    ("pipe", "a pipe"), ("socket", "a socket"), ("devnull", "the file /dev/null"),
    ("memfd", "the file /memfd:fuzz (deleted)")])
def test_register_faults_names_the_wrong_kind(fuzzed, tmp_path, kind, words):
    """RegisterFaults with a non-userfaultfd is refused with a message naming what it got."""
    request = local_pb2.LocalRequest(id=9, register_faults=local_pb2.RegisterFaultsRequest(
        attachment_id=1, address=1 << 30, size=4096))
    with fds_of([kind], str(tmp_path)) as fds, \
            connected(fuzzed.local.nodes[0].socket) as sock:
        wire.send_message(sock, request, fds[:1])
        reply, _ = wire.recv_message(sock, local_pb2.LocalResponse)
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.message == f"RegisterFaults needs a userfaultfd, not {words}"


def test_per_uid_connection_limit_holds_under_garbage(fuzzed):
    """Connections that only ever send garbage still count: the one past
    --max-connections-per-uid is refused at its first request, and once they close, a
    new connection is served."""
    path, most = fuzzed.local.nodes[0].socket, DEFAULT_MAX_CONNECTIONS_PER_UID
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connected(path)) for _ in range(most)]
        for sock in held:
            sock.send(b"\xff\xfe garbage")
            reply, _ = wire.recv_message(sock, local_pb2.LocalResponse)
            assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], reply
        SENT["local.garbage-held"] += len(held)
        with connected(path) as extra:
            extra.send(hello_bytes())
            reply, _ = wire.recv_message(extra, local_pb2.LocalResponse)
        assert reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert reply.message == (f"uid {os.getuid()} has {most} connections to this agent, "
                                 "the most allowed (--max-connections-per-uid)")
    wait_for(lambda: _hello_served(path), "a connection to be served again",
             timeout=CALL_TIMEOUT)


def _hello_served(path: str) -> bool:
    with connected(path) as sock:
        sock.send(hello_bytes())
        reply, _ = wire.recv_message(sock, local_pb2.LocalResponse)
    return reply is not None and reply.code == 0
