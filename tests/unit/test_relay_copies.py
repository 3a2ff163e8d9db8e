"""Relays without daemons (node/relay.py): the home's ``Directory`` (who pulls from
whom), and a ``Copy`` served by a real ``BulkServer`` over loopback while its bytes
arrive: each byte sent only once it arrived, a copy that stops serving cuts its
requests short, a wrong version or id is refused, and its memory is released only
after the last request served from it."""
from __future__ import annotations

import os
import threading
import types

import pytest

from vas.core.errors import NotFound, Unavailable
from vas.node import bulk, relay
from vas.node import store as store_mod

from waiting import wait_for

MiB = 1 << 20
SIZE = 32 * MiB  # two ranges of 16 MiB: longer than a relay's 4 MiB runs
SEGMENT = 11
VERSION = 3
TIMEOUT = 5.0


# ---------------------------------------------------------------- Directory


def test_directory_builds_a_tree_of_the_fanout():
    tree = relay.Directory(fanout=2)
    sources = [tree.source(SEGMENT, VERSION, f"r{i}:1", []) for i in range(7)]
    # r0 from the home; r1, r2 from r0; r3, r4 from r1; r5, r6 from r2
    assert sources == ["", "r0:1", "r0:1", "r1:1", "r1:1", "r2:1", "r2:1"]
    # asking again keeps one's place; a fetcher that does not relay gets a source too
    assert tree.source(SEGMENT, VERSION, "r3:1", []) == "r1:1"
    assert tree.source(SEGMENT, VERSION, "", []) == "r3:1"


def test_directory_forgets_failed_relays_and_never_points_back():
    tree = relay.Directory(fanout=1)
    assert [tree.source(SEGMENT, VERSION, f"r{i}:1", []) for i in range(3)] == \
        ["", "r0:1", "r1:1"]
    # r1's source r0 died: r1 moves up and pulls from the home, r2 still from r1
    assert tree.source(SEGMENT, VERSION, "r1:1", ["r0:1"]) == ""
    assert tree.source(SEGMENT, VERSION, "r2:1", []) == "r1:1"
    # a fetcher cannot remove itself, and a source is always earlier in the order
    assert tree.source(SEGMENT, VERSION, "r2:1", ["r2:1"]) == "r1:1"
    # r0, forgotten while still fetching, asks again (its own source failed): its children
    # may be anywhere in the order now, so it pulls from the home (and relays again)
    assert tree.source(SEGMENT, VERSION, "r0:1", ["home?"]) == ""
    assert tree.source(SEGMENT, VERSION, "r3:1", []) == "r0:1"  # the chain goes on from it


def test_directory_starts_over_at_a_new_version_and_can_be_off():
    tree = relay.Directory(fanout=2)
    tree.source(SEGMENT, VERSION, "r0:1", [])
    assert tree.source(SEGMENT, VERSION + 1, "r1:1", []) == ""  # r0 holds the old bytes
    assert relay.Directory(fanout=0).source(SEGMENT, VERSION, "r0:1", []) == ""


# ---------------------------------------------------------------- Copy served


@pytest.fixture
def relayed():
    """A BulkServer relaying one Copy of SEGMENT at VERSION whose bytes the test
    'receives' by hand: (server, copy, data, released-event)."""
    data = os.urandom(SIZE)
    fd, ro_fd = store_mod.allocate("relay", SIZE)
    copies = relay.Copies()
    info = types.SimpleNamespace(id=SEGMENT, size=SIZE, name="s")
    copy = copies.begin(info, fd)
    copy.expect(bulk.split(SIZE, 2))
    released = threading.Event()

    def source(segment_id, offset, length, peer):
        return copies.find(segment_id)

    server = bulk.BulkServer("127.0.0.1", lambda *a: os.dup(fd), TIMEOUT, per_peer=32,
                             relay_source=source)
    server.start()
    yield server, copy, data, fd, released
    server.close()
    copy.release(released.set)
    store_mod.release(fd, ro_fd, SIZE)


def _arrive(fd: int, copy: relay.Copy, data: bytes, offset: int, length: int) -> None:
    os.pwrite(fd, data[offset:offset + length], offset)
    copy.received(offset, length)


def _fetch_async(server, version=VERSION, parts=None):
    view = memoryview(bytearray(SIZE))
    outcome: dict = {}

    def run():
        try:
            bulk.fetch(f"127.0.0.1:{server.port}", SEGMENT, view,
                       parts or bulk.split(SIZE, 2), timeout=TIMEOUT, version=version)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            outcome["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    return view, outcome, thread


def test_bytes_are_relayed_as_they_arrive(relayed):
    server, copy, data, fd, _ = relayed
    copy.opened(VERSION)
    view, outcome, thread = _fetch_async(server)
    half = SIZE // 2
    for offset in range(0, half, MiB):  # both ranges arrive piece by piece
        _arrive(fd, copy, data, offset, MiB)
        _arrive(fd, copy, data, half + offset, MiB)
    thread.join(TIMEOUT * 2)
    assert outcome == {"ok": True}
    assert view.tobytes() == data


def test_a_copy_that_stops_cuts_its_requests_and_sent_only_what_arrived(relayed):
    server, copy, data, fd, _ = relayed
    copy.opened(VERSION)
    received = []
    view = memoryview(bytearray(SIZE))
    _arrive(fd, copy, data, 0, 5 * MiB)  # one run of 4 MiB or more is sent, then it waits
    errors = []

    def run():
        try:
            bulk.fetch(f"127.0.0.1:{server.port}", SEGMENT, view, [(0, SIZE // 2)],
                       timeout=TIMEOUT, version=VERSION,
                       received=lambda offset, length: received.append((offset, length)))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    # The bytes, not ``received``: a fetch tells arrivals in steps, the last one at its end.
    wait_for(lambda: view[:5 * MiB] == data[:5 * MiB], "the 5 MiB that arrived")
    copy.close()  # its own fetch failed: nothing more is sent
    thread.join(TIMEOUT * 2)
    # the cut connection is retried once: that one finds the copy gone
    assert errors and isinstance(errors[0], (Unavailable, NotFound))
    assert sum(n for _, n in received) == 5 * MiB
    assert view[:5 * MiB].tobytes() == data[:5 * MiB]


def test_a_relay_refuses_another_version_or_id(relayed):
    server, copy, data, fd, _ = relayed
    copy.opened(VERSION)
    copy.complete()
    for version, segment in ((VERSION + 1, SEGMENT), (VERSION - 1, SEGMENT),
                             (VERSION, SEGMENT + 1)):
        with pytest.raises(NotFound, match="relays no copy"):
            bulk.fetch(f"127.0.0.1:{server.port}", segment, memoryview(bytearray(4096)),
                       [(0, 4096)], timeout=TIMEOUT, version=version)


def test_memory_is_released_after_the_last_request(relayed):
    server, copy, data, fd, released = relayed
    copy.opened(VERSION)
    _arrive(fd, copy, data, 0, MiB)
    view, outcome, thread = _fetch_async(server, parts=[(0, 2 * MiB)])
    wait_for(lambda: copy._serving, "the request being served")
    copy.release(released.set)  # evicted while serving: not freed yet
    assert not released.is_set()
    thread.join(TIMEOUT * 2)  # the closed copy ends the request
    assert isinstance(outcome.get("error"), (Unavailable, NotFound))
    wait_for(released.is_set, "the memory released after the request ended")


def test_quiesce_cuts_requests_waiting_for_bytes(relayed):
    server, copy, data, fd, _ = relayed
    copy.opened(VERSION)
    view, outcome, thread = _fetch_async(server, parts=[(0, MiB)])
    wait_for(lambda: copy._serving, "the request waiting for bytes")
    copy.quiesce(TIMEOUT)  # returns once no request is served any more
    assert not copy._serving
    thread.join(TIMEOUT * 2)
    assert "error" in outcome
