"""The agent's coordinator client and the admin client make a call again only when its
connection failed under it and that is safe (vas/core/repeat.py): its request could not
be written, or the method reads or sets the same again; the agent's create made again
that finds the name taken stays the first attempt's Unavailable (its own record, maybe)."""
from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from vas.admin import AdminClient
from vas.core.errors import AlreadyExists, Unavailable
from vas.node.clients import CoordinatorClient
from vas.proto import types_pb2

BROKEN_PIPE = "Stream removed (sendmsg: Broken pipe (32))"
CLOSED = "Stream removed (Delayed close due to in-progress write (Socket closed))"


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class Rpc:
    """A stub method (of ``method``) answering from ``outcomes`` in turn (an exception is
    raised)."""

    def __init__(self, method: str, *outcomes):
        self._method = f"/vas.v1.Coordinator/{method}".encode()
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self, request, timeout):
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture
def client():
    made = CoordinatorClient("127.0.0.1:1", timeout=5)
    yield made
    made.channel.close()


def test_a_call_that_could_not_be_written_is_made_again(client):
    reply = types_pb2.SegmentInfo(name="a")
    client.stub = SimpleNamespace(GetSegment=Rpc("GetSegment",
        Failed(grpc.StatusCode.UNAVAILABLE, BROKEN_PIPE), reply))
    assert client.get_segment("a") == reply
    assert client.stub.GetSegment.calls == 2


def test_other_failures_are_raised_at_once(client):
    for details in ("failed to connect to all addresses", "Deadline Exceeded"):
        client.stub = SimpleNamespace(GetSegment=Rpc("GetSegment",
            Failed(grpc.StatusCode.UNAVAILABLE, details), types_pb2.SegmentInfo()))
        with pytest.raises(Unavailable, match=details):
            client.get_segment("a")
        assert client.stub.GetSegment.calls == 1


def test_a_second_failure_is_raised(client):
    client.stub = SimpleNamespace(GetSegment=Rpc("GetSegment",
        Failed(grpc.StatusCode.UNAVAILABLE, BROKEN_PIPE),
        Failed(grpc.StatusCode.UNAVAILABLE, BROKEN_PIPE)))
    with pytest.raises(Unavailable, match="Broken pipe"):
        client.get_segment("a")
    assert client.stub.GetSegment.calls == 2


def test_a_create_made_again_that_finds_its_name_taken_is_unavailable(client):
    client.stub = SimpleNamespace(CreateSegment=Rpc("CreateSegment",
        Failed(grpc.StatusCode.UNAVAILABLE, BROKEN_PIPE),
        Failed(grpc.StatusCode.ALREADY_EXISTS, "segment a already exists")))
    with pytest.raises(Unavailable, match="Broken pipe"):
        client.create_segment(name="a", size=4096)
    client.stub = SimpleNamespace(CreateSegment=Rpc("CreateSegment",
        Failed(grpc.StatusCode.ALREADY_EXISTS, "segment a already exists")))
    with pytest.raises(AlreadyExists):
        client.create_segment(name="a", size=4096)


def test_a_lost_connection_repeats_reads_and_creates_only(client):
    reply = types_pb2.SegmentInfo(name="a")
    client.stub = SimpleNamespace(
        GetSegment=Rpc("GetSegment", Failed(grpc.StatusCode.UNAVAILABLE, CLOSED), reply),
        CreateSegment=Rpc("CreateSegment", Failed(grpc.StatusCode.UNAVAILABLE, CLOSED), reply),
        DeleteSegment=Rpc("DeleteSegment", Failed(grpc.StatusCode.UNAVAILABLE, CLOSED), reply))
    assert client.get_segment("a") == reply
    assert client.create_segment(name="a", size=4096) == reply
    with pytest.raises(Unavailable, match="Socket closed"):  # a delete that landed: NotFound
        client.delete_segment(name="a")
    assert [client.stub.GetSegment.calls, client.stub.CreateSegment.calls,
            client.stub.DeleteSegment.calls] == [2, 2, 1]


def test_the_admin_client_makes_a_read_again_and_a_delete_once():
    admin = AdminClient.__new__(AdminClient)  # no coordinator: its stub is replaced
    admin.timeout, admin.caller = 5.0, types_pb2.Caller(uid=0)
    reply = types_pb2.SegmentInfo(name="a", size=4096)
    admin._coordinator = SimpleNamespace(
        GetSegment=Rpc("GetSegment", Failed(grpc.StatusCode.UNAVAILABLE, CLOSED), reply),
        DeleteSegment=Rpc("DeleteSegment", Failed(grpc.StatusCode.UNAVAILABLE, CLOSED)))
    assert admin.stat("a").name == "a"
    assert admin._coordinator.GetSegment.calls == 2
    with pytest.raises(Unavailable, match="Socket closed"):
        admin.delete("a")
    assert admin._coordinator.DeleteSegment.calls == 1
