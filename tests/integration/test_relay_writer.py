"""Relays on one machine (three agents on loopback, node/relay.py): a copy a writer takes
over is relayed no more, so a later reader sent to it by the home gets the published
bytes from the home, never the writer's unpublished ones; OpenBulk bounds its relay
fields."""
from __future__ import annotations

import os

import grpc
import pytest

import vas
from vas.core.tls import open_channel
from vas.proto import node_pb2, node_pb2_grpc
from waiting import wait_for

MiB = 1 << 20
SIZE = 16 * MiB  # above the ReadPages-only size: fetched (and relayed) on the bulk channel


@pytest.fixture(scope="module")
def three(module_cluster):
    return module_cluster(nodes=3, memory=256 * MiB)


def test_a_copy_taken_by_a_writer_is_relayed_no_more(three):
    node1, node2, node3 = three.nodes
    published = os.urandom(SIZE)
    with vas.connect(node1.socket) as home:
        home.create("relay/writer", SIZE, mode=0o644)
        with home.attach("relay/writer", "rw") as mapping:
            mapping.write(0, published)
    with vas.connect(node2.socket) as second, vas.connect(node3.socket) as third:
        with second.attach("relay/writer", fetch="eager") as mapping:  # the home's first
            assert bytes(mapping.buffer) == published                # fetcher: a relay
        with second.attach("relay/writer", "rw") as writer:  # the same copy, now changing
            writer.write(0, b"unpublished" * 100)
            with third.attach("relay/writer", fetch="eager") as mapping:  # sent to node2
                assert bytes(mapping.buffer) == published
    with open(node3.log_path) as log:
        text = log.read()
    assert "relay fetch of relay/writer from" in text and "relays no copy" in text
    wait_for(lambda: "over the bulk channel 127.0.0.1" in open(node3.log_path).read(),
             "node3's fetch from the home")


def test_open_bulk_refuses_oversized_relay_fields(three):
    """An agent's OpenBulk with a relay address longer than 300 characters, or naming
    more than 16 failed relays, is INVALID_ARGUMENT with the rule broken."""
    node1 = three.nodes[0]
    with vas.connect(node1.socket) as home:
        home.create("relay/fields", SIZE, mode=0o644)
        segment_id = home.stat("relay/fields").id
    with open_channel(node1.address, None, "") as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        for request, message in (
                (node_pb2.OpenBulkRequest(name="relay/fields", id=segment_id,
                                          relay_address="h" * 301 + ":1"),
                 "relay address of 303 characters: at most 300"),
                (node_pb2.OpenBulkRequest(name="relay/fields", id=segment_id,
                                          failed_relays=["h:1"] * 17),
                 "17 failed relays: at most 16")):
            with pytest.raises(grpc.RpcError) as raised:
                stub.OpenBulk(request, timeout=10)
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details() == message
