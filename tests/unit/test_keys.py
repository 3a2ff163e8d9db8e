"""The coordinator's pure logic: etcd key formats, the JSON codec, page tokens,
address placement, mode-bit checks and state derivation (no etcd needed)."""
from __future__ import annotations

import pytest

from vas.coordinator import access, keys
from vas.coordinator.etcd import grpc_target
from vas.coordinator.segments import ALIGN, GUARD, WINDOW_END, WINDOW_START, place, state_of
from vas.core.errors import CapacityExceeded, InvalidArgument, PermissionDenied
from vas.proto import types_pb2


def test_key_formats():
    assert keys.segment_key("a/b") == b"/vas/segments/a/b"
    assert keys.node_key("host:7301") == b"/vas/nodes/host:7301"
    assert keys.attach_key("a/b", "node1") == b"/vas/attach/a/b#node1"
    assert keys.writer_key("a/b") == b"/vas/writers/a/b"
    assert keys.space_key("job") == b"/vas/spaces/job"
    assert keys.ALLOC == b"/vas/alloc"
    assert keys.split_attach_key(b"/vas/attach/a/b#host:1#x") == ("a/b", "host:1#x")
    assert keys.name_of(b"/vas/segments/a/b", keys.SEGMENTS) == "a/b"


def test_prefix_end_covers_exactly_the_prefix():
    assert keys.prefix_end(b"/vas/segments/") == b"/vas/segments0"
    assert keys.prefix_end(b"a\xff") == b"b"
    assert keys.prefix_end(b"\xff\xff") == b"\0"
    start, end = b"/vas/segments/ab", keys.prefix_end(b"/vas/segments/ab")
    assert start <= b"/vas/segments/ab/c" < end
    assert not start <= b"/vas/segments/ac" < end


def test_attach_prefix_matches_no_longer_name():
    prefix = keys.attach_prefix("seg")
    end = keys.prefix_end(prefix)
    assert prefix <= keys.attach_key("seg", "n1") < end
    for other in ("seg2", "seg/x", "seg-x", "seg.x", "seg_x"):
        assert not prefix <= keys.attach_key(other, "n1") < end


@pytest.mark.parametrize("names", [
    ["a", "a-b", "a.b", "a/b", "a0", "aA", "a_", "ab"],
    ["x/1", "x/10", "x/1/y", "x/2"],
])
def test_attach_keys_sort_like_segment_keys(names):
    by_segment = sorted(names, key=keys.segment_key)
    by_attach = sorted(names, key=lambda n: keys.attach_key(n, "node"))
    assert by_segment == by_attach
    start, end = keys.attach_span(by_segment[1], by_segment[-2])
    inside = [n for n in names if start <= keys.attach_key(n, "zz") < end]
    assert sorted(inside, key=keys.segment_key) == by_segment[1:-1]


def test_codec_round_trips_compactly():
    record = {"size": 4096, "home": "n1", "deleting": False, "expires": 0.0,
              "members": [["a", "r"]]}
    data = keys.encode(record)
    assert b" " not in data and keys.decode(data) == record


def test_page_tokens_round_trip_and_reject_garbage():
    token = keys.encode_page_token("a/b\0")
    assert keys.decode_page_token(token) == "a/b\0"
    for bad in ("!!", "é", "\xff"):
        with pytest.raises(InvalidArgument, match="invalid page token"):
            keys.decode_page_token(bad)


def test_place_aligns_and_leaves_a_guard_gap():
    address, after = place(0, 1)
    assert address == WINDOW_START and after == WINDOW_START + ALIGN + GUARD
    second, after2 = place(after, 3 * ALIGN - 1)
    assert second == after and second % ALIGN == 0
    assert after2 == second + 3 * ALIGN + GUARD
    assert place(WINDOW_START + 1, 4096)[0] == WINDOW_START + ALIGN  # rounded up
    assert place(WINDOW_END - ALIGN, ALIGN)[0] == WINDOW_END - ALIGN
    with pytest.raises(CapacityExceeded, match="address window is exhausted"):
        place(WINDOW_END - ALIGN, ALIGN + 1)


def caller(uid, gid):
    return types_pb2.Caller(uid=uid, gid=gid)


@pytest.mark.parametrize("who, bits, allowed", [
    (caller(10, 10), access.READ | access.WRITE, True),    # owner rw-
    (caller(11, 20), access.READ, True),                   # group r--
    (caller(11, 20), access.READ | access.WRITE, False),
    (caller(12, 30), access.READ, False),                  # other ---
    (caller(0, 0), access.READ | access.WRITE, True),      # root
    (caller(10, 20), access.WRITE, True),                  # owner bits win over group bits
])
def test_mode_bits_like_files(who, bits, allowed):
    record = {"mode": 0o640, "uid": 10, "gid": 20}
    assert access.allowed(who, record, bits) is allowed


def test_owner_checks_and_messages():
    record = {"mode": 0o777, "uid": 10, "gid": 20}
    access.require_owner(caller(10, 1), record, "segment 'x'")
    access.require_owner(caller(0, 0), record, "segment 'x'")
    with pytest.raises(PermissionDenied, match=r"only the owner \(uid 10\) or root"):
        access.require_owner(caller(11, 20), record, "segment 'x'")
    with pytest.raises(PermissionDenied, match="uid 12 may not read and write segment 'x'"):
        access.require(caller(12, 1), {"mode": 0o604, "uid": 10, "gid": 20},
                       access.ATTACH_BITS["rw"], "segment 'x'")


def test_state_derivation():
    record = {"deleting": False, "home": "n1", "replicas": 0}
    assert state_of(record, {"n1"}) == types_pb2.SEGMENT_STATE_READY
    assert state_of(record, set()) == types_pb2.SEGMENT_STATE_LOST
    # No replica is promoted when the home is gone: a segment that asked for one is lost too.
    assert state_of({**record, "replicas": 1}, set()) == types_pb2.SEGMENT_STATE_LOST
    assert state_of({**record, "deleting": True}, {"n1"}) == types_pb2.SEGMENT_STATE_DELETING


def test_the_lost_mark_outranks_a_live_home_but_not_a_delete_mark():
    """A record marked lost (its home restarted without it) stays lost whatever nodes
    live and whatever replicas it asked for; records written before the mark existed
    have no "lost" key and derive as before."""
    record = {"deleting": False, "home": "n1", "replicas": 0, "lost": True}
    assert state_of(record, {"n1"}) == types_pb2.SEGMENT_STATE_LOST
    assert state_of({**record, "replicas": 1}, {"n1"}) == types_pb2.SEGMENT_STATE_LOST
    assert state_of({**record, "deleting": True}, {"n1"}) == types_pb2.SEGMENT_STATE_DELETING
    assert state_of({**record, "lost": False}, {"n1"}) == types_pb2.SEGMENT_STATE_READY


def test_grpc_target_of_etcd_urls():
    assert grpc_target("http://127.0.0.1:2379") == "127.0.0.1:2379"
    assert grpc_target("http://etcd") == "etcd:2379"
    assert grpc_target("http://10.0.0.1:1,http://10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert grpc_target("https://127.0.0.1:2379") == "127.0.0.1:2379"  # etcd behind TLS
    for bad in ("127.0.0.1:2379", "ftp://x:1", "http://a:1,http://b:2",
                "http://10.0.0.1:1,https://10.0.0.2:2"):
        with pytest.raises(InvalidArgument):
            grpc_target(bad)
